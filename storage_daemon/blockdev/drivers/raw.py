"""The `raw` format driver: the child's bytes, optionally a window of them (domain ring).

Without `offset`/`size` it is a pass-through and shows its child's filename; with them it
presents `size` bytes starting at `offset` of the child.
"""

from __future__ import annotations

import errno
from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import ROLE_FILTERED, BdrvChild
from storage_daemon.blockdev.driver import BlockDriver, BlockStatus, ChildOpener, ReopenChange
from storage_daemon.blockdev.perm import Perm
from storage_daemon.errors import QmpError


class RawDriver(BlockDriver):
    name = "raw"
    passes_filename = True

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.offset = 0
        self.size: int | None = None
        self._file: BdrvChild | None = None

    async def open(self, options: Any, opener: ChildOpener) -> None:
        # The window is known before the child is attached: it decides the child's perms.
        self.offset = int(options.offset or 0)
        if options.size is not None:
            self.size = int(options.size)
        self._file = await opener.open_child(self.node, options.file, "file", ROLE_FILTERED)
        self._check_window(self.offset, self.size)

    def _check_window(self, offset: int, size: int | None) -> None:
        """qsd's checks of a window against the child's current length."""
        child_len = self._primary().driver.getlength()
        if offset > child_len:
            raise QmpError(
                f"Offset ({offset}) cannot be greater than size of the containing "
                f"file ({child_len})"
            )
        if size is not None:
            if offset + size > child_len:
                raise QmpError(
                    f"The sum of offset ({offset}) and size ({size}) has to be "
                    f"smaller or equal to the  actual size of the containing file ({child_len})"
                )
            if size % 512:
                raise QmpError("Specified size is not multiple of 512")

    # --- blockdev-reopen: qsd moves the window of a live node ---------------------------

    reopen_mutable = frozenset({"offset", "size"})

    def reopen_check(self, options: Any) -> None:
        for key in ("offset", "size"):
            value = getattr(options, key)
            if value is not None and value < 0:
                raise QmpError(f"Parameter '{key}' expects a non-negative number below 2^64")
        size = None if options.size is None else int(options.size)
        self._check_window(int(options.offset or 0), size)

    def reopen_prepare(self, change: ReopenChange) -> None:
        # Before the permission update: the child's perms follow the new window.
        change.saved = (self.offset, self.size)
        options = change.options
        self.offset = int(options.offset or 0)
        self.size = None if options.size is None else int(options.size)

    def reopen_abort(self, change: ReopenChange) -> None:
        self.offset, self.size = change.saved

    def child_perm(self, child: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # A window into the child must not see the child resized under it.
        if self.offset or self.size is not None:
            return perm, shared & ~Perm.RESIZE
        return perm, shared

    def strong_options(self) -> dict[str, Any]:
        strong: dict[str, Any] = {}
        if self.offset:
            strong["offset"] = self.offset
        if self.size is not None:
            strong["size"] = self.size
        return strong

    def format_name(self) -> str:
        return "raw"

    def image_info_extra(self) -> dict[str, Any]:
        # qsd asks the child for image info; a file child reports a clean dirty flag.
        child = self._primary().driver.image_info_extra()
        return {"dirty-flag": child["dirty-flag"]} if "dirty-flag" in child else {}

    def _child(self) -> BdrvChild:
        # Requests to the child go through the generic I/O path, so the child's alignment,
        # options and accounting apply to them as to any other user's.
        if self._file is None:
            raise OSError(errno.ENOTSUP, "operation not supported")
        return self._file

    def getlength(self) -> int:
        if self.size is not None:
            return self.size
        return self._child().node.driver.getlength() - self.offset

    async def preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return await io.pread(self._child(), self.offset + offset, length)

    def preadv_now(
        self, offset: int, length: int, live: bool
    ) -> bytes | bytearray | memoryview | None:
        file = self._file
        if file is None:
            return None
        return io.pread_now(file, self.offset + offset, length, live=live)

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await io.pwrite(self._child(), self.offset + offset, data, fua=fua)

    def pwritev_now(self, offset: int, data: bytes | memoryview, fua: bool) -> bool:
        file = self._file
        if file is None:
            return False
        return io.pwrite_now(file, self.offset + offset, data, fua=fua)

    def pwritev_start(
        self, offset: int, data: bytes | memoryview, fua: bool, done: io.WriteDone
    ) -> bool:
        file = self._file
        if file is None or fua:
            return False
        return io.pwrite_start(file, self.offset + offset, data, done)

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        await io.pwrite_zeroes(
            self._child(), self.offset + offset, length, may_unmap=unmap, fua=fua
        )

    async def pdiscard(self, offset: int, length: int) -> None:
        await io.pdiscard(self._child(), self.offset + offset, length)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await io.block_status(self._child(), self.offset + offset, length)

    def block_status_now(self, offset: int, length: int) -> BlockStatus | None:
        file = self._file
        if file is None:
            return None
        return io.block_status_now(file, self.offset + offset, length)

    async def truncate(self, size: int) -> None:
        if self.size is not None:
            raise QmpError("Cannot resize fixed-size raw disks")
        await io.truncate(self._child(), self.offset + size)
