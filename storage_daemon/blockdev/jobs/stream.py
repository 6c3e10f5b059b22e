"""block-stream: copy the data of a backing chain into the image above it, then relink.

Domain ring. Arguments are resolved with qsd's checks and texts before the job exists (no
events for those failures). As in qsd, a copy-on-read filter (implicit `#blockNNN`, or named by
`filter-node-name`, with `bottom` = `base_overlay`) goes above the top for the job's lifetime
and the top's users move onto it. The job copies the ranges the top does not hold and some
layer down to `base_overlay` does, as the filter would (read below the top, copy-up write into
it), several chunks at once; as in qsd, where the copy-on-read happens at the device, each
copy's read and write pass the limits of the throttle filters from the device down to the top.
Prepare flushes the top, rewrites its header and makes the node below `above_base` its new
backing; clean unplugs the filter, which (as the job's other nodes) the job holds until it
is freed. Invariants: nothing in the chain or a header changes until the copy has finished
without error and is stable; a copy-up never overwrites what a client wrote into the top; no
copy is in flight while the job is paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev import chain, io
from storage_daemon.blockdev.backend import UnnamedBackend
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.copy_range import copy_up_write, copy_up_zeroes
from storage_daemon.blockdev.drivers.copy_on_read import CopyOnReadDriver
from storage_daemon.blockdev.drivers.throttle import ThrottleDriver
from storage_daemon.blockdev.jobs.block_job import BlockJob
from storage_daemon.blockdev.jobs.filters import (
    check_not_busy,
    drained,
    drop_filter,
    insert_filter,
    move_parents,
)
from storage_daemon.blockdev.jobs.writeback import WritebackAhead
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.node import BlockNode
    from storage_daemon.daemon import Daemon

CHUNK = 512 * 1024  # QEMU's STREAM_BUFFER_SIZE: the chunk of a rate-limited job
# Without a speed limit: larger chunks, several in flight (qsd copies one at a time, but its
# per-request cost is a fraction of ours; while one chunk is written the next ones are read).
# 2 MiB: 4 MiB buffers would come from mmap (the file driver keeps heap buffers up to 4 MiB)
# and cost a page fault per page each time; measured 2.7 s of CPU per GiB against 1.0 s.
BIG_CHUNK = 2 * 1024 * 1024
MAX_IN_FLIGHT = 4
# The job ends with a flush that makes the copy stable before the header changes; the image
# file is flushed in the background meanwhile (outside the format's metadata lock, see
# jobs/writeback.py), so that last flush finds little left to write.
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


def overlay_of(device: BlockNode, base: BlockNode) -> BlockNode | None:
    """The first non-filter node above `base` in `device`'s chain, filters skipped on both
    sides (QEMU's bdrv_find_overlay); None when `base` is the device's own image."""
    target = chain.skip_filters(base)
    active = chain.skip_filters(device)
    while active is not None:
        nxt = chain.skip_filters(chain.below(active))
        if nxt is target:
            return active
        active = nxt
    return None


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


class _Copier:
    """The stream job's copies in flight: tasks it owns and always awaits (`settle`), the
    ranges to copy again after an on-error "stop", and the error that fails the job."""

    def __init__(self, job: StreamJob) -> None:
        self.job = job
        self.tasks: set[asyncio.Task[None]] = set()
        self.file = job.top.child("file")  # the image file, flushed ahead (None: not a format)
        self.writeback = WritebackAhead()  # background flushes of the file
        self.flushes = self.writeback.tasks
        self.retry: list[tuple[int, int]] = []
        self.failure: OSError | None = None
        source = chain.cow_child(job.top)
        assert source is not None and job.filter is not None and job.filter.primary is not None
        self.source = source
        # The edge above the top holds WRITE_UNCHANGED, which QEMU's copy-on-read write
        # needs; the generic path checks WRITE, so a stand-in edge that has it writes
        # (never attached: the graph and its permissions do not see it).
        edge = job.writer_edge
        assert edge is not None
        self.writer = BdrvChild(
            parent=edge.parent,
            node=edge.node,
            name=edge.name,
            role=edge.role,
            perm=edge.perm | Perm.WRITE,
            shared=edge.shared,
        )

    @property
    def busy(self) -> bool:
        """Copies or flushes in flight (a paused job has neither)."""
        return bool(self.tasks or self.flushes)

    @property
    def full(self) -> bool:
        # Under a throttle filter one copy at a time, as qsd's stream (sequential always):
        # more in flight would only queue in the filter, ahead of the device's own I/O.
        return len(self.tasks) >= (1 if self.job.throttles else MAX_IN_FLIGHT)

    def start(self, offset: int, n: int) -> None:
        task = asyncio.get_running_loop().create_task(self._one(offset, n))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, offset: int, n: int) -> None:
        job = self.job
        try:
            await job._copy_up(self.source, self.writer, offset, n)
        except OSError as err:
            if self.failure is not None:
                return  # the job fails already
            # As in qsd every failure counts as a read error for the on-error policy.
            action = job.error_action(job.on_error, True, err.errno or errno.EIO)
            if action == "report":
                self.failure = err
                return
            if action == "stop":
                self.retry.append((offset, n))  # copied again once the job is resumed
                return
        job.progress_update(n)
        job.ratelimit_account(n)  # only what was copied counts against the speed
        self.writeback.copied(n, self.file)

    async def wait_one(self) -> None:
        await asyncio.wait(self.tasks | self.flushes, return_when=asyncio.FIRST_COMPLETED)

    async def settle(self) -> None:
        """Until no copy is in flight; a cancelled job cancels its copies first."""
        try:
            while self.tasks or self.flushes:
                await asyncio.wait(self.tasks | self.flushes)
        except asyncio.CancelledError:
            for task in self.tasks | self.flushes:
                task.cancel()
            await asyncio.gather(*self.tasks, *self.flushes, return_exceptions=True)
            raise

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


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
        # None for a job's filter that was dropped from the graph while the job still holds
        # it (a cancelled job not yet dismissed): refused as busy below.
        top = chain.skip_filters(device)
        if args.base is not None:
            # Only the backing images of the first non-filter node (bdrv_find_backing_image).
            # (qsd 7.2 aborts on a filter without its child here.)
            base = chain.find_by_filename(top, args.base) if top is not None else None
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
        if bottom is not None:
            base_overlay = bottom
        elif base is not None:
            found = overlay_of(device, base)
            if found is None:
                # A base-node that is the device's own (filtered) image.
                raise QmpError(f"'{base.name}' is not in the backing chain of '{device.name}'")
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
        assert top is not None  # a filter without its child is the busy filter of a job
        if base is None and args.backing_file is not None:
            raise QmpError("backing file specified, but streaming the entire chain")
        self.device = device  # qsd's job target: the filter goes above it, even a filter
        self.top = top  # the first non-filter node from the device down: what is copied into
        self.base_overlay = base_overlay
        self.above_base = above_base
        self.backing_file: str | None = args.backing_file
        self.on_error: str = wire(args.on_error) or "report"
        self.filter_node_name: str | None = args.filter_node_name
        self.layers: list[BdrvChild] = []
        self.top_edge: BdrvChild | None = None
        self.blk: BdrvChild | None = None  # the job's own backend on the filter
        self.filter: BlockNode | None = None
        self.copier: _Copier | None = None  # the copies in flight, while run() runs
        self.block_graph = graph
        # qsd reopens the device read-write when it is read-only (not the node below its
        # filters): a filter over a read-only node then fails to take the filter's writes.
        self.grant = chain.WritableGrant(graph, device)
        self.writer_edge: BdrvChild | None = None  # the edge above the top (copy-up writes)
        # The throttle filters from the device down to the top, outermost first.
        self.throttles: list[ThrottleDriver] = []

    @classmethod
    async def create(cls, daemon: Daemon, args: Any) -> StreamJob:
        """Check the arguments, put the copy-on-read filter above the top (its name errors
        come before the job exists, as in qsd), then create the job on the filter."""
        job = cls(daemon, args)
        if job.device.read_only:
            # qsd holds the chain frozen while it reopens a read-only device read-write.
            daemon.graph.unfreeze(daemon.graph.freeze_chain(job.device, job.above_base))
        await job.grant.grant()  # qsd reopens a read-only device read-write for the job
        try:
            async with drained(job.device):  # qsd's bdrv_insert_node drains the top
                await job._insert_filter()
        except BaseException:
            await job.grant.restore()
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
            await job.grant.restore()
            raise
        return job

    async def _insert_filter(self) -> None:
        spec: dict[str, Any] = {
            "driver": "copy-on-read",
            "file": self.device.name,
            "bottom": self.base_overlay.name,
        }
        if self.filter_node_name is not None:
            spec["node-name"] = self.filter_node_name
        self.filter = await insert_filter(self.block_graph, spec, self.device, lambda edge: False)

    def _unfreeze_filter(self) -> None:
        """The filter freezes the chain down to `base_overlay` (its `bottom`) while it lives;
        qsd's bdrv_cor_filter_drop unfreezes it first."""
        driver = self.filter.driver if self.filter is not None else None
        if isinstance(driver, CopyOnReadDriver):
            driver.unfreeze()

    async def _drop_filter(self) -> None:
        """The filter's users back onto the top, the job's edges on it gone, the filter closed."""
        self._unfreeze_filter()
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

    async def _unplug_filter(self) -> None:
        """qsd's end of the job (bdrv_cor_filter_drop): the filter's users back onto the top
        and the job's own backend gone; the filter loses its child but stays in the graph,
        held as the job's main node (with the job's other edges) until the job is freed."""
        self._unfreeze_filter()
        cor = self.filter
        if cor is None:
            return
        if self.blk is not None:
            self.block_graph.detach(self.blk)
            self.blk = None
        move_parents(self.block_graph, cor, self.device, lambda edge: edge.parent is self)
        for edge in list(cor.children):
            self.block_graph.detach(edge)

    async def setup(self) -> None:
        try:
            self._take_nodes()
        except BaseException:
            await self._drop_filter()
            await self.grant.restore()
            raise

    def _take_nodes(self) -> None:
        graph = self.graph
        assert self.filter is not None
        self.blk = graph.attach(
            UnnamedBackend(), self.filter, "root", ChildRole(0), Perm.CONSISTENT_READ, BLK_SHARED
        )
        # As qsd: the device is the "active node", every node below it down to the new
        # base an "intermediate node" (the top itself too when the device is a filter).
        self.top_edge = self.add_node("active node", self.device, PERM_NONE, BLK_SHARED)
        new_base = chain.below(self.above_base)
        node = chain.below(self.device)
        while node is not None and node is not new_base:
            edge = self.add_node("intermediate node", node, PERM_NONE, INTERMEDIATE_SHARED)
            if node is self.top:
                self.top_edge = edge
            elif not chain.is_filter(node):
                self.layers.append(edge)
            node = chain.below(node)
        # Copy-ups are written into the top through the edge of the node right above it
        # (qsd writes them through the device's filters, throttled by a throttle filter).
        above: BdrvChild | None = self.filter.primary
        while above is not None and above.node is not self.top:
            if isinstance(above.node.driver, ThrottleDriver):
                self.throttles.append(above.node.driver)
            above = chain.filtered_child(above.node)
        self.writer_edge = above

    async def run(self) -> None:
        top_edge = self.top_edge
        assert top_edge is not None
        if self.top is self.base_overlay:
            return  # nothing to stream (qsd: len 0)
        length = io.length(top_edge)
        self.progress_set_remaining(length)
        # Only layers down to base_overlay count (filters above the base hold nothing).
        layers = self.layers[: self._overlay_index(self.layers) + 1]
        copier = self.copier = _Copier(self)
        offset = 0
        if length:
            # Before the first pause point, where the command that started the job returns:
            # the metadata the first ranges' status needs is read now, so that ranges which
            # need no copy then go by without an I/O wait a command could slip into (qsd's
            # take microseconds). An error shows again in the loop.
            with contextlib.suppress(OSError):
                await self._to_copy(top_edge, layers, 0, min(CHUNK, length))
        try:
            while (offset < length or copier.busy or copier.retry) and copier.failure is None:
                if copier.busy and (
                    self.speed
                    or self.should_pause()
                    or self.is_cancelled
                    or copier.full
                    or (offset >= length and not copier.retry)
                ):
                    # Pause points and rate-limit sleeps only with nothing in flight: a
                    # paused (or drained) job does no I/O.
                    await copier.wait_one()
                    continue
                if not copier.busy:
                    # qsd 7.2's stream_run: one sleep of the delay the last copy asked for,
                    # cut short by anything that wakes the job (a drain, a resume, a faster
                    # speed); none after a range that was not copied.
                    await self.ratelimit_sleep_once()
                if copier.retry:
                    copier.start(*copier.retry.pop(0))
                    continue
                # qsd's chunk where a limit sees each copy (speed, throttle filters).
                chunk = CHUNK if self.speed or self.throttles else BIG_CHUNK
                copy, n = await self._to_copy(top_edge, layers, offset, min(chunk, length - offset))
                if copy:
                    copier.start(offset, n)
                else:
                    self.progress_update(n)
                offset += n
        finally:
            await copier.settle()
        copier.raise_failure()

    async def _to_copy(
        self, top_edge: BdrvChild, layers: list[BdrvChild], offset: int, n: int
    ) -> tuple[bool, int]:
        """Whether the range at `offset` needs a copy, and for how many bytes (at most `n`)
        the answer holds: only what the top does not hold and a layer down to base_overlay
        does (QEMU's stream_run)."""
        st = await io.block_status(top_edge, offset, n, want_zero=False)
        n = max(1, min(st.length, n))
        if st.depth == 1:
            return False, n
        return await allocated_above(layers, offset, n)

    async def _copy_up(self, source: BdrvChild, writer: BdrvChild, offset: int, n: int) -> None:
        """Copy a range the top does not hold from the layers below into the top, as the
        copy-on-read filter would (all-zero data as a zero write), never over what a client
        wrote into the top meanwhile (copy_range.copy_up_*)."""
        for throttle in self.throttles:
            await throttle.throttle(False, n)
        data = await io.pread(source, offset, n)
        for throttle in self.throttles:
            await throttle.throttle(True, n)
        if io.is_zero(data):
            await copy_up_zeroes(writer, offset, n)
        else:
            await copy_up_write(writer, offset, data)

    def _overlay_index(self, layers: list[BdrvChild]) -> int:
        for i, edge in enumerate(layers):
            if edge.node is self.base_overlay:
                return i
        return len(layers) - 1

    async def prepare(self) -> None:
        self._unfreeze_filter()  # the top's backing link changes below
        top = self.top
        if chain.cow_child(top) is None:
            return
        new_base = chain.below(self.above_base)
        name, fmt = chain.backing_name_for(new_base)
        if name is not None and self.backing_file is not None:
            name = self.backing_file
        if self.auto_dismiss:
            # Freed right after this: the old chain can close now (awaited, so nothing of it
            # is left open once the job has gone). Without auto-dismiss the job keeps its
            # edges, and with them the old chain's nodes, until it is dismissed, as qsd.
            self.remove_all_nodes()
        try:
            # What the job copied, with the tables naming it, is stable before the header
            # stops naming the layers it came from (qsd leaves that to chance).
            await io.flush(self._flush_edge())
            await chain.write_backing_name(top, name, fmt)
        except OSError as err:
            raise QmpError(f"Could not change the backing file: {err.strerror}") from err
        # qsd drains the subtree from `above_base` around the change, and
        # bdrv_set_backing_hd the top once more: two sections as another job sees them.
        async with drained(self.above_base):
            pass
        async with drained(top):
            await chain.set_backing(self.graph, top, new_base)

    def _flush_edge(self) -> BdrvChild:
        return BdrvChild(self, self.top, "flush", ChildRole(0))  # never attached

    async def clean(self) -> None:
        # qsd drops the filter whatever the outcome, after the graph change of prepare:
        # bdrv_cor_filter_drop drains the top, then its bdrv_replace_node the filter.
        async with drained(self.device):
            pass
        if self.filter is not None:
            async with drained(self.filter):
                pass
        if self.auto_dismiss:
            await self._drop_filter()
            self.remove_all_nodes()
        else:
            await self._unplug_filter()
        if self.grant.granted:
            # Back to read-only (qsd's reopen): what the job wrote must be on disk first.
            with contextlib.suppress(OSError):
                await io.flush(self._flush_edge())
        await self.grant.restore()

    def release(self) -> None:
        """The job is freed (dismissed): its edges go, and with them the filter and the
        implicit nodes of the old chain that nobody else uses."""
        held = [edge.node for edge in self.edges]
        self._unfreeze_filter()
        super().release()
        cor, self.filter = self.filter, None
        if cor is not None and cor.children:
            # Only reached when the job goes away without its clean step: users back on
            # the top.
            if self.blk is not None:
                self.block_graph.detach(self.blk)
                self.blk = None
            with contextlib.suppress(QmpError):
                move_parents(self.block_graph, cor, self.device, lambda edge: False)
            if not cor.parents:
                self.block_graph.remove_internal(cor)
        self.block_graph.free_orphans(held)  # the childless filter, the old chain
