"""block-stream: copy the data of a backing chain into the image above it, then relink.

Domain ring. Arguments are resolved with qsd's checks and texts before the job exists (no
events for those failures). As in qsd, a copy-on-read filter (implicit `#blockNNN`, or named by
`filter-node-name`, with `bottom` = `base_overlay`) goes above the top for the job's lifetime
and the top's users move onto it; the job reads the ranges the top does not hold and some
layer down to `base_overlay` does through the filter, which copies them up. Prepare rewrites
the top's header and makes the node below `above_base` its new backing; clean drops the
filter. Invariant: nothing in the chain or a header changes until the copy has finished
without error, and no filter is left once the job has concluded.
"""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev import chain, io
from storage_daemon.blockdev.backend import UnnamedBackend
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.jobs.block_job import BlockJob
from storage_daemon.blockdev.jobs.filters import (
    check_not_busy,
    drop_filter,
    insert_filter,
    move_parents,
)
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.node import BlockNode
    from storage_daemon.daemon import Daemon

CHUNK = 512 * 1024  # QEMU's STREAM_BUFFER_SIZE
INTERMEDIATE_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
# What the job's backend on the filter (and its hold on the top) lets others do.
BLK_SHARED = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED


def wire(value: Any) -> Any:
    return getattr(value, "value", value)


async def allocated_above(layers: list[BdrvChild], offset: int, length: int) -> tuple[bool, int]:
    """Whether any of `layers` (top to bottom) holds data at `offset`, and for how many bytes
    the answer stays the same (QEMU's bdrv_is_allocated_above, bounds included)."""
    n = length
    for edge in layers:
        eof = edge.node.driver.getlength()
        if offset >= eof:
            # A shorter layer reads as zeroes past its end: that hides what lies below.
            return True, n
        st = await io.block_status(edge, offset, min(n, eof - offset), want_zero=False)
        if st.depth == 1:
            return True, max(1, min(st.length, n))
        n = max(1, min(n, st.length))
    return False, n


async def copy_range(src: BdrvChild, dst: BdrvChild, offset: int, length: int) -> None:
    """Read through `src`, write into `dst`; all-zero data becomes a zero write."""
    data = await io.pread(src, offset, length)
    if io.is_zero(data):
        await io.pwrite_zeroes(dst, offset, length)
    else:
        await io.pwrite(dst, offset, data)


class CopyError(Exception):
    def __init__(self, err: OSError, is_read: bool) -> None:
        super().__init__(str(err))
        self.err = err
        self.is_read = is_read


async def copy_with_policy(
    job: BlockJob, on_error: Any, src: BdrvChild, dst: BdrvChild, offset: int, length: int
) -> bool:
    """Copy one chunk under the job's error policy: an error is reported (raised), ignored
    (True, as if copied) or stops the job (False: the caller retries the chunk)."""
    try:
        await copy_checked(src, dst, offset, length)
    except CopyError as failure:
        action = job.error_action(on_error, failure.is_read, failure.err.errno or errno.EIO)
        if action == "report":
            raise failure.err from None
        if action == "stop":
            return False
    return True


async def copy_checked(src: BdrvChild, dst: BdrvChild, offset: int, length: int) -> None:
    try:
        data = await io.pread(src, offset, length)
    except OSError as err:
        raise CopyError(err, True) from err
    try:
        if io.is_zero(data):
            await io.pwrite_zeroes(dst, offset, length)
        else:
            await io.pwrite(dst, offset, data)
    except OSError as err:
        raise CopyError(err, False) from err


class StreamJob(BlockJob):
    job_type = "stream"
    can_complete = False

    def __init__(self, daemon: Daemon, args: Any) -> None:
        graph = daemon.graph
        if args.base is not None and args.base_node is not None:
            raise QmpError("'base' and 'base-node' cannot be specified at the same time")
        if args.base is not None and args.bottom is not None:
            raise QmpError("'base' and 'bottom' cannot be specified at the same time")
        if args.bottom is not None and args.base_node is not None:
            raise QmpError("'bottom' and 'base-node' cannot be specified at the same time")
        device = graph.lookup(args.device)
        base: BlockNode | None = None
        bottom: BlockNode | None = None
        if args.base is not None:
            base = chain.find_by_filename(device, args.base)
            if base is None:
                raise QmpError(f"Can't find '{args.base}' in the backing chain")
        if args.base_node is not None:
            base = graph.lookup_node_name(args.base_node)
            if not chain.is_below(device, base):
                raise QmpError(f"Node '{args.base_node}' is not a backing image of '{args.device}'")
        if args.bottom is not None:
            bottom = graph.lookup_node_name(args.bottom)
            if chain.is_filter(bottom):
                raise QmpError(
                    f"Node '{args.bottom}' is a filter, use a non-filter node as 'bottom'"
                )
            if not chain.contains(device, bottom):
                raise QmpError(
                    f"Node '{args.bottom}' is not in a chain starting from '{args.device}'"
                )
        if base is None and args.backing_file is not None:
            raise QmpError("backing file specified, but streaming the entire chain")
        top = chain.skip_filters(device)
        assert top is not None
        if bottom is not None:
            base_overlay = bottom
        elif base is not None:
            found = chain.find_overlay(device, base)
            assert found is not None
            base_overlay = found
        else:
            base_overlay = chain.bottom(device)
        # The node right above the base: filters between base_overlay and base included.
        above_base = base_overlay
        nxt = chain.below(above_base)
        while nxt is not None and chain.is_filter(nxt) and nxt is not base:
            above_base = nxt
            nxt = chain.below(above_base)
        # qsd's op blockers: no node from the device down to the base may be a job's.
        node: BlockNode | None = device
        new_base = chain.below(above_base)
        while node is not None and node is not new_base:
            check_not_busy(node)
            node = chain.below(node)
        self.top = top
        self.base_overlay = base_overlay
        self.above_base = above_base
        self.backing_file: str | None = args.backing_file
        self.on_error: str = wire(args.on_error) or "report"
        self.filter_node_name: str | None = args.filter_node_name
        self.layers: list[BdrvChild] = []
        self.top_edge: BdrvChild | None = None
        self.blk: BdrvChild | None = None  # the job's own backend on the filter
        self.filter: BlockNode | None = None
        self.block_graph = graph
        self.grant = chain.WritableGrant(graph, top)

    @classmethod
    async def create(cls, daemon: Daemon, args: Any) -> StreamJob:
        """Check the arguments, put the copy-on-read filter above the top (its name errors
        come before the job exists, as in qsd), then create the job on the filter."""
        job = cls(daemon, args)
        job.grant.grant()  # qsd reopens a read-only top read-write for the job
        try:
            await job._insert_filter()
        except BaseException:
            job.grant.restore()
            raise
        assert job.filter is not None
        try:
            BlockJob.__init__(
                job,
                daemon.jobs,
                args.job_id,
                daemon.graph,
                job.filter,
                perm=PERM_NONE,
                shared=PERM_ALL,
                speed=args.speed or 0,
                auto_finalize=args.auto_finalize is not False,
                auto_dismiss=args.auto_dismiss is not False,
            )
        except BaseException:
            await job._drop_filter()
            job.grant.restore()
            raise
        return job

    async def _insert_filter(self) -> None:
        spec: dict[str, Any] = {
            "driver": "copy-on-read",
            "file": self.top.name,
            "bottom": self.base_overlay.name,
        }
        if self.filter_node_name is not None:
            spec["node-name"] = self.filter_node_name
        self.filter = await insert_filter(self.block_graph, spec, self.top, lambda edge: False)

    async def _drop_filter(self) -> None:
        """The filter's users back onto the top, the job's edges on it gone, the filter closed."""
        cor, self.filter = self.filter, None
        if cor is None:
            return
        mine = set(getattr(self, "edges", []))
        for edge in [e for e in cor.parents if e in mine]:
            self.remove_node(edge)
        if self.blk is not None:
            self.block_graph.detach(self.blk)
            self.blk = None
        await drop_filter(self.block_graph, cor, lambda edge: False)

    async def setup(self) -> None:
        try:
            self._take_nodes()
        except BaseException:
            await self._drop_filter()
            raise

    def _take_nodes(self) -> None:
        graph = self.graph
        assert self.filter is not None
        self.blk = graph.attach(
            UnnamedBackend(), self.filter, "root", ChildRole(0), Perm.CONSISTENT_READ, BLK_SHARED
        )
        self.top_edge = self.add_node("active node", self.top, PERM_NONE, BLK_SHARED)
        if self.top is self.base_overlay:
            return
        node = chain.below(self.top)
        while node is not None:
            edge = self.add_node("intermediate node", node, PERM_NONE, INTERMEDIATE_SHARED)
            if not chain.is_filter(node):
                self.layers.append(edge)
            if node is self.above_base:
                break
            node = chain.below(node)

    async def run(self) -> None:
        top_edge = self.top_edge
        assert top_edge is not None
        if self.top is self.base_overlay:
            return  # nothing to stream (qsd: len 0)
        length = io.length(top_edge)
        self.progress_set_remaining(length)
        # Only layers down to base_overlay count (filters above the base hold nothing).
        layers = self.layers[: self._overlay_index(self.layers) + 1]
        offset = 0
        while offset < length:
            await self.ratelimit_sleep()
            n = min(CHUNK, length - offset)
            st = await io.block_status(top_edge, offset, n, want_zero=False)
            if st.depth == 1:
                copy, n = False, max(1, min(st.length, n))
            else:
                copy, n = await allocated_above(layers, offset, n)
            if copy and not await self._populate(offset, n):
                continue  # retried after the pause the policy asked for
            offset += n
            self.progress_update(n)
            if copy:
                self.ratelimit_processed(n)

    async def _populate(self, offset: int, length: int) -> bool:
        """Read the range through the copy-on-read filter, which copies it into the top.
        As in qsd every failure counts as a read error for the on-error policy; False when
        the policy stopped the job (the caller retries the range)."""
        blk = self.blk
        assert blk is not None
        try:
            await io.pread(blk, offset, length)
        except OSError as err:
            action = self.error_action(self.on_error, True, err.errno or errno.EIO)
            if action == "report":
                raise
            if action == "stop":
                return False
        return True

    def _overlay_index(self, layers: list[BdrvChild]) -> int:
        for i, edge in enumerate(layers):
            if edge.node is self.base_overlay:
                return i
        return len(layers) - 1

    async def prepare(self) -> None:
        top = self.top
        if chain.cow_child(top) is None:
            return
        new_base = chain.below(self.above_base)
        name, fmt = chain.backing_name_for(new_base)
        if name is not None and self.backing_file is not None:
            name = self.backing_file
        self.remove_all_nodes()
        try:
            await chain.write_backing_name(top, name, fmt)
        except OSError as err:
            raise QmpError(f"Could not change the backing file: {err.strerror}") from err
        await chain.set_backing(self.graph, top, new_base)

    async def clean(self) -> None:
        # qsd drops the filter whatever the outcome, after the graph change of prepare.
        await self._drop_filter()
        self.remove_all_nodes()
        if self.grant.saved:
            # Back to read-only (qsd's reopen): what the job wrote must be on disk first.
            with contextlib.suppress(OSError):
                await io.flush(BdrvChild(self, self.top, "flush", ChildRole(0)))
        self.grant.restore()

    def release(self) -> None:
        super().release()
        cor, self.filter = self.filter, None
        if cor is None:
            self.grant.restore()
            return
        # Only reached when the job goes away without its clean step: users back on the top.
        if self.blk is not None:
            self.block_graph.detach(self.blk)
            self.blk = None
        with contextlib.suppress(QmpError):
            move_parents(self.block_graph, cor, self.top, lambda edge: False)
        if not cor.parents:
            self.block_graph.remove_internal(cor)
        self.grant.restore()
