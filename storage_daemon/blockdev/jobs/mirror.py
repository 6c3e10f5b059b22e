"""blockdev-mirror and drive-mirror: keep a target equal to a source, then maybe replace it.

Domain ring. The job puts a `mirror_top` filter above the source (its users move onto it), so
every client write is either marked in the job's dirty bitmap (background) or also written to
the target (write-blocking). The job copies dirty granules with several requests in flight
(in the kernel between plain files), becomes READY when the bitmap is clean, and on
job-complete converges with client writes held at the filter, then moves the users of
`replaces` onto the target (qsd's pivot) and removes the filter; a soft cancel in READY
converges the same way without the pivot. Active commit (commit_active.py) is this job in
commit mode. Invariant: a granule is never copied by two requests at once, and nothing dirty
is left when READY ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from typing import TYPE_CHECKING, Any, ClassVar

from storage_daemon.blockdev import chain, io
from storage_daemon.blockdev.backend import UnnamedBackend
from storage_daemon.blockdev.bitmaps import registry as bitmap_registry
from storage_daemon.blockdev.child import ROLE_FILTERED, BdrvChild, ChildRole
from storage_daemon.blockdev.copy_range import copy_range
from storage_daemon.blockdev.drivers.mirror_top import MirrorTopDriver, SourceWrite, WriteKind
from storage_daemon.blockdev.jobs.block_job import BlockJob
from storage_daemon.blockdev.jobs.filters import move_parents
from storage_daemon.blockdev.jobs.fsm import READY_STATES
from storage_daemon.blockdev.jobs.job import SLICE_NS
from storage_daemon.blockdev.jobs.mirror_bitmap import DirtyBitmap, InFlight
from storage_daemon.blockdev.jobs.writeback import WritebackAhead
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph, FrozenLinks
    from storage_daemon.blockdev.node import BlockNode
    from storage_daemon.daemon import Daemon

DEFAULT_BUF_SIZE = 16 << 20  # QEMU's DEFAULT_MIRROR_BUF_SIZE
MAX_IN_FLIGHT = 16  # QEMU's MAX_IN_FLIGHT
CHUNKS_PER_BUFFER = 2
"""QEMU cuts its buffer in MAX_IN_FLIGHT requests (16 of 1 MiB); ours in 2 of 8 MiB, so a
contiguous copy keeps 2 pool threads copying in the kernel, not 16 (scattered short runs still
go up to 16 at once). On 2 cores the 16 kept the event loop thread waiting for a CPU: query-jobs
p99 during a mirror and an NBD reader (bench/README.md, job_bench), for no throughput gain."""
MAX_IO_BYTES = 1 << 20  # QEMU's: a copy request moves at least this much (buffer allowing)
DEFAULT_GRANULARITY = 65536
GRANULARITY_MIN = 512
GRANULARITY_MAX = 64 << 20
JOB_SHARED = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED
FOREVER_NS = 3600 * 10**9


def wire(value: Any) -> Any:
    return getattr(value, "value", value)


# --- argument checks, in qsd's order ----------------------------------------------------------


def root_node(graph: BlockGraph, name: str) -> BlockNode:
    """qsd's qmp_get_root_bs: a node that no other node or job uses."""
    node = graph.lookup(name)
    for edge in node.parents:
        if edge.parent_node is not None or isinstance(edge.parent, BlockJob):
            raise QmpError("Need a root block node")
    return node


def check_granularity(granularity: int | None) -> None:
    if granularity is None or granularity == 0:
        return
    if granularity < GRANULARITY_MIN or granularity > GRANULARITY_MAX:
        raise QmpError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise QmpError("Parameter 'granularity' expects a power of 2")


def can_replace(source: BlockNode, node: BlockNode) -> bool:
    """QEMU's bdrv_recurse_can_replace: `node` is the source or under it through filters."""
    current: BlockNode | None = source
    while current is not None:
        if current is node:
            return True
        if not chain.is_filter(current):
            return False
        current = chain.below(current)
    return False


def resolve_replaces(graph: BlockGraph, source: BlockNode, replaces: str | None) -> str | None:
    """The node name to replace on completion (None: the source), checked as qsd does."""
    if replaces is None:
        # Keep implicit filters on top: replace the first node below them.
        node: BlockNode | None = source
        while node is not None and node.implicit and chain.is_filter(node):
            node = chain.below(node)
        if node is None or node is source:
            return None
        replaces = node.name
    found = graph.find(replaces)
    if found is None:
        raise QmpError(f"Failed to find node with node-name='{replaces}'")
    if not can_replace(source, found):
        raise QmpError(
            f"Cannot replace '{replaces}' by a node mirrored from '{source.name}', because it "
            "cannot be guaranteed that doing so would not lead to an abrupt change of visible "
            "data"
        )
    if found.driver.getlength() != source.driver.getlength():
        raise QmpError("cannot replace image with a mirror image of different size")
    return replaces


def check_sync(sync: str) -> None:
    if sync in ("incremental", "bitmap"):
        raise QmpError(f"Sync mode '{sync}' not supported")


def check_buf_size(buf_size: int | None) -> None:
    if buf_size is not None and buf_size < 0:
        raise QmpError("Invalid parameter 'buf-size'")


def default_granularity(target: BlockNode) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity: the target's cluster size in [4k, 64k]."""
    cluster = target.driver.image_info_extra().get("cluster-size")
    if isinstance(cluster, int) and cluster > 0:
        return min(65536, max(4096, cluster))
    return DEFAULT_GRANULARITY


class MirrorJob(BlockJob):
    """One mirror of `source` onto `target`; arguments are the typed command arguments."""

    job_type = "mirror"
    can_complete = True
    # Active commit (commit_active.py) is this job in QEMU's commit mode: the target is the
    # source's own backing chain, nothing is replaced but the source, and the filter takes
    # the permissions a node above its own base may take.
    is_commit: ClassVar[bool] = False

    def __init__(
        self,
        daemon: Daemon,
        args: Any,
        source: BlockNode,
        target: BlockNode,
        *,
        zero_target: bool,
        unmap: bool = True,
        filter_node_name: str | None = None,
        owned_target: bool = False,
        target_backing: BlockNode | None = None,
    ) -> None:
        graph = daemon.graph
        sync = wire(args.sync)
        check_granularity(args.granularity)
        if sync == "top" and chain.below(chain.skip_filters(source) or source) is None:
            sync = "full"
        self.replaces = None if self.is_commit else resolve_replaces(graph, source, args.replaces)
        check_sync(sync)
        check_buf_size(args.buf_size)
        if chain.skip_filters(source) is chain.skip_filters(target):
            raise QmpError("Can't mirror node into itself")
        self.source = source
        self.target = target
        self.sync: str = sync
        self.zero_target = zero_target
        self.unmap = unmap
        self.owned_target = owned_target
        self.target_backing = target_backing  # drive-mirror: attached on success
        self.granularity: int = args.granularity or default_granularity(target)
        buf_size = args.buf_size or DEFAULT_BUF_SIZE
        self.buf_size = -(-buf_size // self.granularity) * self.granularity
        chunk = min(max(MAX_IO_BYTES, self.buf_size // CHUNKS_PER_BUFFER), self.buf_size)
        self.chunk = max(self.granularity, chunk - chunk % self.granularity)
        self.on_source_error: str = wire(args.on_source_error) or "report"
        self.on_target_error: str = wire(args.on_target_error) or "report"
        self.write_blocking = wire(args.copy_mode) == "write-blocking"
        self.bitmap = DirtyBitmap(source.driver.getlength(), self.granularity)
        self._shown_bitmap: bitmap_registry.AnonymousBitmap | None = None
        self.inflight = InFlight(self.bitmap.size)
        self.should_complete = False
        self.initialised = False  # the first scan is over: write-blocking may start
        self.target_edge: BdrvChild | None = None  # the unnamed backend writing the target
        self._ops: set[asyncio.Task[None]] = set()
        self.writeback = WritebackAhead()  # background flushes of the target as it fills
        self._bytes_in_flight = 0
        self._op_waiters: list[asyncio.Future[None]] = []
        self._error: BaseException | None = None
        self._cursor = 0
        # Active commit freezes the chain from its filter down to the base (commit_active.py)
        # until the job's exit (qsd's mirror_exit_common), before any pivot.
        self.frozen: FrozenLinks | None = None
        # The filter goes in before the job exists, as in qsd (its name errors come first).
        self.filter_node: BlockNode | None = graph.add_internal(filter_node_name, MirrorTopDriver)
        self.filter = self._filter_driver(self.filter_node)
        self.filter.is_commit = self.is_commit
        try:
            self._insert_filter(graph, self.filter_node)
        except BaseException:
            graph.remove_internal(self.filter_node)
            self.filter_node = None
            raise
        self.graph = graph
        try:
            super().__init__(
                daemon.jobs,
                args.job_id,
                graph,
                self.filter_node,
                perm=Perm.CONSISTENT_READ,
                shared=JOB_SHARED,
                speed=args.speed or 0,
                auto_finalize=args.auto_finalize is not False,
                auto_dismiss=args.auto_dismiss is not False,
            )
        except BaseException:
            self._remove_filter_now()
            raise
        self.filter.job = self

    @staticmethod
    def _filter_driver(node: BlockNode) -> MirrorTopDriver:
        driver = node.driver
        assert isinstance(driver, MirrorTopDriver)
        return driver

    def _insert_filter(self, graph: BlockGraph, node: BlockNode) -> None:
        edge = graph.attach(node, self.source, "backing", ROLE_FILTERED)
        self.filter.set_child(edge)
        move_parents(graph, self.source, node, lambda other: other is edge, old_first=False)

    # --- setup and teardown of the graph ------------------------------------------------

    async def setup(self) -> None:
        perm, shared = self._target_perms()
        self.target_edge = self.graph.attach(
            UnnamedBackend(), self.target, "root", ChildRole(0), perm, shared
        )
        self.add_node("source", self.source, PERM_NONE, JOB_SHARED)
        self.add_node("target", self.target, PERM_NONE, PERM_ALL)
        # qsd lists the job's dirty bitmap among the source's, by creation order, for as
        # long as the job holds the source.
        self._shown_bitmap = bitmap_registry.attach_anonymous(self.source, self.dirty_info)

    def remove_node(self, edge: BdrvChild) -> None:
        super().remove_node(edge)
        if edge.name == "source" and self._shown_bitmap is not None:
            bitmap_registry.release_anonymous(self.source, self._shown_bitmap)
            self._shown_bitmap = None

    def _target_perms(self) -> tuple[Perm, Perm]:
        """What the job's backend on the target takes and shares (no resize, and while the
        copy runs the target is not consistent for others to read)."""
        return Perm.WRITE, Perm.WRITE_UNCHANGED

    async def _check_target_length(self, target: BdrvChild, length: int) -> None:
        if length != io.length(target):
            raise QmpError("Source and target image have different sizes")

    def _drop_target_edge(self) -> None:
        if self.target_edge is not None:
            self.graph.detach(self.target_edge)
            self.target_edge = None

    def _switch_graph(self, pivot: bool) -> None:
        """Take the filter out (users back onto what it filters), after moving the users of
        `replaces` onto the target when `pivot`. Client writes held at the filter then go to
        the node below it."""
        node = self.filter_node
        if node is None:
            return
        graph = self.graph
        self.filter.job = None
        self._drop_target_edge()
        if pivot:
            to_replace = self.source
            if self.replaces is not None:
                found = graph.find(self.replaces)
                if found is not None:
                    to_replace = found
            if can_replace(self.source, to_replace):
                mine = set(self.edges)
                target = self.target
                move_parents(
                    graph,
                    to_replace,
                    target,
                    lambda edge: edge in mine or edge.parent_node is target,
                    old_first=False,
                )
            else:
                raise QmpError(
                    f"Can no longer replace '{to_replace.name}' by '{self.target.name}', "
                    "because it can no longer be guaranteed that doing so would not lead to "
                    "an abrupt change of visible data"
                )
        # As qsd: the job lets go of every node before the filter goes (what it unshares
        # on the chain, as a commit does, must not stand in the way of the filter's users;
        # a job waiting for job-finalize or job-dismiss holds none).
        for edge in list(self.edges):
            self.remove_node(edge)
        below = self.filter.child().node
        # The filter keeps its child edge (and its permissions) until held writes are done.
        move_parents(graph, node, below, lambda edge: False, refresh_old=False)

    async def _finish_filter(self) -> None:
        node = self.filter_node
        if node is None:
            return
        self.filter.job = None
        self.filter.open_gate()
        await self.filter.wait_idle()
        self._remove_filter_now()

    def _remove_filter_now(self) -> None:
        """Synchronous last resort (and the early-failure path): users back, filter gone."""
        node = self.filter_node
        if node is None:
            return
        self.filter.job = None
        self.filter.open_gate()
        edge = self.filter.child()
        keep: set[BdrvChild] = set(getattr(self, "edges", []))
        if node.parents and any(e not in keep for e in node.parents):
            with contextlib.suppress(QmpError):
                move_parents(self.graph, node, edge.node, lambda e: e in keep, refresh_old=False)
        for job_edge in [e for e in node.parents if e in keep]:
            self.remove_node(job_edge)
        self.graph.remove_internal(node)
        self.filter_node = None

    async def prepare(self) -> None:
        self.graph.unfreeze(self.frozen)
        if self.target_backing is not None:
            await chain.set_backing(self.graph, self.target, self.target_backing)
        self._switch_graph(pivot=self.should_complete)
        await self._finish_filter()

    async def abort(self) -> None:
        self.graph.unfreeze(self.frozen)
        self._switch_graph(pivot=False)
        await self._finish_filter()

    async def clean(self) -> None:
        self._drop_target_edge()
        if self.owned_target:
            for edge in [e for e in self.edges if e.node is self.target]:
                self.remove_node(edge)
            if not self.target.parents and not self.target.monitor_owned:
                await self.graph.remove(self.target)

    def release(self) -> None:
        self.graph.unfreeze(self.frozen)
        self._remove_filter_now()
        self._drop_target_edge()
        super().release()

    # --- verbs --------------------------------------------------------------------------

    def complete(self) -> None:
        if self.replaces is not None and self.graph.find(self.replaces) is None:
            raise QmpError(f"Node name '{self.replaces}' not found")
        self.should_complete = True
        self._enter(only_if=lambda: not self.paused)

    def cancel_hook(self, force: bool) -> bool:
        # Before READY every cancel is a real one; in READY a soft cancel completes the job
        # without the pivot (the target is left consistent).
        return force or self.status not in READY_STATES

    # --- client writes (called by the filter) -------------------------------------------

    async def client_write(
        self, offset: int, length: int, kind: WriteKind, source_write: SourceWrite
    ) -> None:
        if not (self.write_blocking and self.initialised and self.target_edge is not None):
            try:
                await source_write()
            finally:
                self.bitmap.set(offset, length)
            return
        first, last = self.bitmap.span(offset, length)
        while self.inflight.busy(first, last):
            await self._wait_op()
        self.inflight.mark(first, last)
        try:
            try:
                await source_write()
            except BaseException:
                self.bitmap.set(offset, length)
                raise
            await self._active_target_write(offset, length, kind)
        finally:
            self.inflight.clear(first, last)
            self._notify_ops()

    async def _active_target_write(self, offset: int, length: int, kind: WriteKind) -> None:
        edge = self.target_edge
        if edge is None or (kind.data is None and not kind.zero):
            self.bitmap.set(offset, length)  # a discard: let the copy decide what to do
            return
        try:
            if kind.data is not None:
                await io.pwrite(edge, offset, kind.data)
            else:
                await io.pwrite_zeroes(edge, offset, length, may_unmap=self.unmap)
        except OSError as err:
            self.bitmap.set(offset, length)
            self._io_error(err, is_read=False)
            return
        self.bitmap.reset_covered(offset, length)

    # --- copying ------------------------------------------------------------------------

    def _notify_ops(self) -> None:
        waiters, self._op_waiters = self._op_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_op(self) -> None:
        """Until some copy or write-blocking client write ends."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._op_waiters.append(waiter)
        await waiter

    async def _drain_ops(self) -> None:
        while self._ops:
            await self._wait_op()
        if self.writeback.tasks:
            await asyncio.gather(*self.writeback.tasks, return_exceptions=True)

    def _io_error(self, err: OSError, *, is_read: bool) -> None:
        policy = self.on_source_error if is_read else self.on_target_error
        action = self.error_action(policy, is_read, err.errno or errno.EIO)
        if action == "report" and self._error is None:
            self._error = err
            self._enter(only_if=lambda: not self.paused)

    def _start_iteration(self) -> int:
        """QEMU's mirror_iteration: requests for the run of dirty granules at the cursor, as
        far as the buffer and the request slots allow; the bytes started."""
        total = self._start_copy()
        while (
            total
            and self._cursor < self.bitmap.size
            and self.bitmap.is_dirty(self._cursor)
            and len(self._ops) < MAX_IN_FLIGHT
            and self._bytes_in_flight < self.buf_size
        ):
            started = self._start_copy()
            if not started:
                break
            total += started
        return total

    def _start_copy(self) -> int:
        """Start copying the next run of dirty granules; 0 if the next one is busy."""
        first = self.bitmap.next_dirty(self._cursor)
        if first < 0 or self.inflight.busy(first, first + 1):
            return 0
        count = self.bitmap.run(first, self.chunk // self.granularity)
        count = self.inflight.first_busy(first, first + count) - first
        offset, length = self.bitmap.granule_bytes(first, count)
        self.bitmap.reset(offset, length)
        self.inflight.mark(first, first + count)
        self._bytes_in_flight += length
        self._cursor = first + count
        task = asyncio.get_running_loop().create_task(self._copy(first, count, offset, length))
        self._ops.add(task)
        return length

    async def _copy(self, first: int, count: int, offset: int, length: int) -> None:
        try:
            source = self.filter.child()
            target = self.target_edge
            assert target is not None
            pos, end = offset, offset + length
            while pos < end:
                try:
                    status = await io.block_status(source, pos, end - pos)
                except OSError as err:
                    self.bitmap.set(offset, length)
                    self._io_error(err, is_read=True)
                    return
                n = max(1, min(status.length, end - pos))
                if not await self._copy_extent(source, target, pos, n, status.data):
                    self.bitmap.set(offset, length)
                    return
                pos += n
            self.progress_update(length)
        except asyncio.CancelledError:
            self.bitmap.set(offset, length)
            raise
        finally:
            self.inflight.clear(first, first + count)
            self._bytes_in_flight -= length
            current = asyncio.current_task()
            if current is not None:
                self._ops.discard(current)
            self._notify_ops()

    async def _copy_extent(
        self, source: BdrvChild, target: BdrvChild, pos: int, n: int, data: bool
    ) -> bool:
        """Copy one extent of one block status (as qsd: data is copied as it is, what reads
        as zeroes is zeroed); False after an I/O error, which the error policy handled."""
        if not data:
            try:
                await self._zero_target(target, pos, n)
            except OSError as err:
                self._io_error(err, is_read=False)
                return False
            return True
        try:
            # Between plain files the kernel copies (copy_file_range); on an error the copy
            # is done again by hand, which tells a read error from a write error.
            if await copy_range(source, pos, target, pos, n):
                self.writeback.copied(n, target)
                return True
        except OSError:
            pass
        try:
            buf = await io.pread(source, pos, n)
        except OSError as err:
            self._io_error(err, is_read=True)
            return False
        try:
            await io.pwrite(target, pos, buf)
        except OSError as err:
            self._io_error(err, is_read=False)
            return False
        self.writeback.copied(n, target)
        return True

    async def _zero_target(self, target: BdrvChild, offset: int, length: int) -> None:
        """Make the range read as zeroes, leaving alone what already does (a sparse target
        stays sparse, as with qsd)."""
        pos, end = offset, offset + length
        while pos < end:
            status = await io.block_status(target, pos, end - pos)
            n = max(1, min(status.length, end - pos))
            if not status.zero:
                await io.pwrite_zeroes(target, pos, n, may_unmap=self.unmap)
            pos += n

    async def _scan(self) -> None:
        """The first dirty bitmap: what `sync` says the target lacks."""
        source = self.filter.child()
        length = self.bitmap.length
        if self.sync == "none":
            return
        if self.sync == "full" and self.zero_target and self.target.options.discard != "unmap":
            self.bitmap.set_all()
            return
        if self.sync == "full" and self.zero_target:
            target = self.target_edge
            assert target is not None
            pos = 0
            while pos < length:
                await self.pause_point()
                n = min(self.chunk, length - pos)
                await io.pwrite_zeroes(target, pos, n, may_unmap=True)
                pos += n
        pos = 0
        while pos < length:
            await self.pause_point()
            status = await io.block_status(source, pos, length - pos, want_zero=False)
            n = max(1, status.length)
            allocated = status.depth == 1 if self.sync == "top" else status.depth >= 1
            if allocated:
                self.bitmap.set(pos, n)
            pos += n

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            for task in self._ops:
                task.cancel()
            raise
        finally:
            # Requests in flight end first (qsd waits for them too, even when cancelled).
            tasks = [*self._ops, *self.writeback.tasks]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        target = self.target_edge
        assert target is not None
        length = self.bitmap.length
        await self._check_target_length(target, length)
        if length == 0:
            self.initialised = True
            self.set_ready()
            while not (self.should_complete or self.cancel_requested):
                await self.sleep(FOREVER_NS)
            return
        # qsd's job first waits in its first scan or copy: the command returns here.
        self.release_start()
        await io.settled(
            self.source
        )  # writes begun before the filter went in are in the first scan
        await self._scan()
        self.initialised = True
        ready = False
        while True:
            if self._error is not None:
                raise self._error
            if self.should_pause():
                await self._drain_ops()
            await self.pause_point()
            dirty = self.bitmap.dirty_bytes
            self.progress_set_remaining(self._bytes_in_flight + dirty)
            full = len(self._ops) >= MAX_IN_FLIGHT or self._bytes_in_flight >= self.buf_size
            if full or (not dirty and self._ops):
                await self._wait_op()
                continue
            if dirty:
                started = self._start_iteration()
                if not started:
                    await self._wait_op()
                    continue
                if self.speed:
                    # As qsd's mirror: one sleep for as long as the speed asks, which a pause,
                    # a resume or a new speed cuts short (the job then just goes on). The
                    # request is finished first, so the progress shown while asleep is whole;
                    # a speed set meanwhile (no sleep to cut short yet) counts from then on.
                    delay = self.limit.delay_ns(started, self._now_ns())
                    if delay:
                        await self._drain_ops()
                        delay = self.limit.delay_ns(0, self._now_ns())
                    if delay:
                        await self.sleep(delay)
                continue
            if not ready:
                if not await self._flush_target():
                    continue
                if self.bitmap.count or self._ops:
                    continue
                ready = True
                self.set_ready()
            if self.should_complete or self.cancel_requested:
                if await self._converge():
                    return
                continue
            await self.sleep(SLICE_NS)

    async def _flush_target(self) -> bool:
        target = self.target_edge
        assert target is not None
        try:
            await io.flush(target)
        except OSError as err:
            self._io_error(err, is_read=False)
            return False
        return True

    async def _converge(self) -> bool:
        """Hold client writes; True when nothing is left to copy (writes stay held until the
        graph is switched), False to go on copying."""
        self.filter.close_gate()
        await self.filter.wait_idle()
        if self.bitmap.count or self._ops or not await self._flush_target():
            self.filter.open_gate()
            return False
        if self.bitmap.count:
            self.filter.open_gate()
            return False
        return True

    # --- queries ------------------------------------------------------------------------

    def dirty_info(self) -> dict[str, Any]:
        """The source's dirty bitmap as query-named-block-nodes shows it (BlockDirtyInfo)."""
        return {
            "recording": True,
            "persistent": False,
            "busy": False,
            "granularity": self.granularity,
            "count": self.bitmap.dirty_bytes,
        }
