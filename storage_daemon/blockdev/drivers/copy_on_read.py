"""The `copy-on-read` filter: data read from the backing chain is written into the top image.

Domain ring. Reads ask the child for allocation depth per extent: depth 1 is the top image's
own data, deeper data (down to `bottom`, inclusive) is read and then written into the top as an
unchanged-data write (zeroes as a zero write). block-stream puts one above its top for the
job's lifetime. Invariant: the copy writes exactly the bytes the read returned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.copy_range import copy_up_write, copy_up_zeroes
from storage_daemon.blockdev.driver import ChildOpener
from storage_daemon.blockdev.drivers.throttle import FilterDriver
from storage_daemon.blockdev.perm import Perm
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import FrozenLinks


class CopyOnReadDriver(FilterDriver):
    name = "copy-on-read"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.bottom: str | None = None
        self.max_depth = 0  # 0: the whole chain
        self.frozen: FrozenLinks | None = None  # with `bottom`: the links down to it

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
            # As qsd: the links from the filter down to its bottom are frozen while it lives.
            self.frozen = self.node.graph.freeze_chain(self.node, node)

    def unfreeze(self) -> None:
        """The chain is free again (qsd's bdrv_cor_filter_drop does this first)."""
        frozen, self.frozen = self.frozen, None
        if frozen is not None:
            self.node.graph.unfreeze(frozen)

    async def close(self) -> None:
        self.unfreeze()
        await super().close()

    @property
    def passes_filename(self) -> bool:  # type: ignore[override]
        # QEMU names an implicit node (block-stream's filter) after its child.
        return bool(self.node.implicit)

    def child_perm(self, child: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # Copying up rewrites data the guest already sees: WRITE_UNCHANGED.
        return perm | Perm.WRITE_UNCHANGED, shared

    def strong_options(self) -> dict[str, Any]:
        # qsd 7.2 leaves `bottom` out of the node's json: filename.
        return {}

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
        # A copy-up writes data the guest already sees, which QEMU allows with WRITE_UNCHANGED
        # alone; our generic path checks WRITE, so the write goes through a stand-in edge that
        # has it (never attached: the graph and its permissions do not see it). All-zero data
        # becomes a zero write, as in QEMU. A guest write that lands between our read and
        # this write wins: copy-up writes skip what the node allocated meanwhile.
        writer = BdrvChild(
            parent=file.parent,
            node=file.node,
            name=file.name,
            role=file.role,
            perm=file.perm | Perm.WRITE,
            shared=file.shared,
        )
        if io.is_zero(data):
            await copy_up_zeroes(writer, offset, len(data))
        else:
            await copy_up_write(writer, offset, data)
