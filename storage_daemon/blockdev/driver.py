"""The block driver interface (domain ring).

A driver implements the data operations for one node. The generic I/O path (`io.py`) checks
bounds, alignment and permissions before calling it, so drivers assume valid requests.
Optional operations have defaults that either pass through to the primary child (filters,
`raw`) or fail with ENOTSUP, as QEMU's block layer falls back.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.perm import Perm
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.node import BlockNode, NodeOptions


class ChildOpener(Protocol):
    """What a driver uses to open its children (the graph)."""

    async def open_child(
        self, parent: BlockNode, ref: Any, name: str, role: ChildRole
    ) -> BdrvChild: ...


class BlockStatus(NamedTuple):
    """One extent's allocation state, as block status reports it (a tuple: built per
    request on the NBD hot path, where a frozen dataclass costs several times more)."""

    length: int
    data: bool  # not a hole: reads may return nonzero data
    zero: bool  # reads return zeroes
    depth: int = 1  # allocation depth in the backing chain (0: unallocated)


@dataclass(eq=False)
class ReopenChange:
    """One node's part of a blockdev-reopen, as its driver sees it.

    `options` are the new typed BlockdevOptions (the node's own driver type); `saved` is the
    driver's own undo data, set in `reopen_prepare` and read in commit or abort."""

    old: NodeOptions
    new: NodeOptions
    options: Any
    saved: Any = None


class BlockDriver(ABC):
    """Base class of every driver; one instance per node."""

    name: ClassVar[str]
    # raw and filters show their child's filename when they add no strong options.
    passes_filename: ClassVar[bool] = False
    is_filter: ClassVar[bool] = False
    # Formats that can have a backing file (qcow2): block status reads their unallocated
    # ranges as zeroes when no backing child is attached.
    supports_backing: ClassVar[bool] = False
    # Driver options blockdev-reopen may change or drop; every other one must keep its value.
    reopen_mutable: ClassVar[frozenset[str]] = frozenset()
    # Limits the generic I/O path honours; a driver may set them per instance (O_DIRECT).
    request_alignment: int = 1
    max_transfer: int = 0  # 0: unlimited

    def __init__(self, node: BlockNode) -> None:
        self.node = node

    @abstractmethod
    async def open(self, options: Any, opener: ChildOpener) -> None:
        """Open the driver with its typed options; open children through `opener`."""

    async def close(self) -> None:
        """Release what `open` acquired. Children are detached by the graph."""

    # --- blockdev-reopen ----------------------------------------------------------------
    # The order (reopen.py): reopen_check for every node; then node.options become the new
    # ones and reopen_prepare runs; the permission update; await reopen_ready; then either
    # reopen_commit, or (any failure) the old options and permissions and reopen_abort.

    def reopen_check(self, options: Any) -> None:
        """Refuse (QmpError, qsd's text) new driver options; no side effects."""

    async def reopen_flush(self, change: ReopenChange) -> None:
        """Turning read-only, before anything changes: what must be written while the node
        may still write (qcow2 stores its persistent bitmaps here)."""

    def reopen_flush_abort(self, change: ReopenChange) -> None:
        """`reopen_flush` ran but the reopen failed before `reopen_prepare`."""

    def reopen_prepare(self, change: ReopenChange) -> None:
        """Before the permission update (the node's options already are `change.new`)."""

    async def reopen_ready(self, change: ReopenChange) -> None:
        """After the permission update: I/O the new options need first (may raise)."""

    def reopen_commit(self, change: ReopenChange) -> None:
        """Apply the new driver options for good; cannot fail."""

    def reopen_abort(self, change: ReopenChange) -> None:
        """Undo `reopen_prepare`/`reopen_ready` (old options and permissions are back)."""

    def backing_changed(self, edge: BdrvChild | None) -> None:
        """The backing link is now `edge` (None: no backing); formats with one follow it."""

    # --- drained sections -------------------------------------------------------------
    # QEMU's bdrv_drained_begin/end as the driver sees them (transaction.DrainedSection
    # calls them on the drained node and every node above it; they nest).

    def drained_begin(self) -> None:
        """A drained section reaches this node: let queued requests go (no I/O may wait)."""

    def drained_end(self) -> None:
        """A drained section that reached this node ended."""

    # --- permissions ------------------------------------------------------------------

    def child_perm(self, child: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """The permissions this node needs on `child`, given what its own users need."""
        return perm, shared

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """Refuse (QmpError) a cumulative permission set the node cannot grant."""

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Commit a checked permission set (file locks follow it)."""

    def abort_perm(self) -> None:
        """Undo what `check_perm` prepared."""

    # --- naming and info --------------------------------------------------------------

    def exact_filename(self) -> str | None:
        return None

    def strong_options(self) -> dict[str, Any]:
        """Options that change the data the node presents; they appear in `json:` names."""
        return {}

    def format_name(self) -> str:
        return self.name

    async def actual_size(self) -> int:
        return 0

    def driver_specific_stats(self) -> dict[str, Any] | None:
        """The `driver-specific` member of query-blockstats (BlockStatsSpecific), if any."""
        return None

    def image_info_extra(self) -> dict[str, Any]:
        """Extra ImageInfo members (cluster-size, format-specific, dirty-flag...)."""
        return {}

    # --- blockdev-set-active (QEMU 10.0) ---------------------------------------------------

    async def inactivate(self) -> None:
        """The node goes inactive (its caches were flushed): leave the image in a state
        another process can take over (raise OSError to refuse)."""

    async def activate(self) -> None:
        """The node is active again: drop what was cached about the image (another process
        may have written it) and take it over."""

    # --- persistent dirty bitmaps (qcow2 stores them) --------------------------------------

    def check_can_store_bitmap(self, name: str, granularity: int) -> None:
        """block-dirty-bitmap-add persistent=true: refuse (QmpError, qsd's text) when the
        image cannot store the bitmap."""
        raise QmpError(
            f"Can't store persistent bitmaps to {self.node.name}: Operation not supported"
        )

    async def remove_stored_bitmap(self, name: str) -> None:
        """block-dirty-bitmap-remove of a persistent bitmap: drop it from the image now."""

    # --- data path --------------------------------------------------------------------

    def _primary(self) -> BlockNode:
        edge = self.node.primary
        if edge is None:
            raise OSError(errno.ENOTSUP, "operation not supported")
        return edge.node

    def getlength(self) -> int:
        return self._primary().driver.getlength()

    async def preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return await self._primary().driver.preadv(offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._primary().driver.pwritev(offset, data, fua)

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        await self.pwritev(offset, bytes(length), fua)

    async def pdiscard(self, offset: int, length: int) -> None:
        raise OSError(errno.ENOTSUP, "discard not supported")

    async def flush(self) -> None:
        edge = self.node.primary
        if edge is not None:
            await edge.node.driver.flush()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(length=length, data=True, zero=False)

    async def truncate(self, size: int) -> None:
        raise QmpError("Image format driver does not support resize")
