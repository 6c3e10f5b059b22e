"""The `copy-on-read` filter: data read from the backing chain is written into the top image.

Domain ring. Reads ask the child for allocation depth per extent: depth 1 is the top image's
own data, deeper data (down to `bottom`, inclusive) is read and then written into the top as an
unchanged-data write. Invariant: the copy writes exactly the bytes the read returned.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.driver import ChildOpener
from storage_daemon.blockdev.drivers.throttle import FilterDriver
from storage_daemon.blockdev.perm import Perm
from storage_daemon.errors import QmpError


class CopyOnReadDriver(FilterDriver):
    name = "copy-on-read"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.bottom: str | None = None
        self.max_depth = 0  # 0: the whole chain

    async def open(self, options: Any, opener: ChildOpener) -> None:
        file = await self.open_filtered(options.file, opener)
        if options.bottom is not None:
            depth, node = 1, file.node
            while node.name != options.bottom:
                backing = node.child("backing") or (node.primary if node.driver.is_filter else None)
                if backing is None:
                    raise QmpError(f"Bottom node '{options.bottom}' not found")
                if backing.name == "backing":
                    depth += 1
                node = backing.node
            self.bottom = options.bottom
            self.max_depth = depth

    def child_perm(self, child: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # Copying up rewrites data the guest already sees: WRITE_UNCHANGED.
        return perm | Perm.WRITE_UNCHANGED, shared

    def strong_options(self) -> dict[str, Any]:
        return {"bottom": self.bottom} if self.bottom is not None else {}

    async def preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        file = self.child()
        if self.node.read_only:
            return await io.pread(file, offset, length)
        buf = bytearray(length)
        pos, end = offset, offset + length
        while pos < end:
            count, depth = await io.allocation_depth(file, pos, end - pos)
            count = max(1, min(count, end - pos))
            data = await io.pread(file, pos, count)
            buf[pos - offset : pos - offset + count] = data
            if depth > 1 and (not self.max_depth or depth <= self.max_depth):
                await self._copy_up(file, pos, data)
            pos += count
        return buf

    async def _copy_up(self, file: BdrvChild, offset: int, data: Any) -> None:
        # Our generic path wants WRITE for any write; QEMU's copy-on-read writes need only
        # WRITE_UNCHANGED, so when no parent writes, call the child's driver directly.
        if file.perm & Perm.WRITE:
            await io.pwrite(file, offset, data)
            return
        drv = file.node.driver
        align = drv.request_alignment
        if align > 1 and (offset % align or len(data) % align):
            return  # an unaligned extent is simply not copied; the data was read all the same
        await drv.pwritev(offset, data, False)
        file.node.stats.wr_operations += 1
        file.node.stats.wr_bytes += len(data)
