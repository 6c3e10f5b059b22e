"""blockdev-backup and drive-backup: copy a node's data, as it is when the job starts, to a target.

Domain ring. The job puts a copy-before-write filter above the source and moves the source's
users (exports, parent nodes) onto it, so a client's write first copies the old data of the
clusters it hits to the target; the job copies every other cluster through the filter's copy
state, several chunks at once (the kernel copies between plain files), then (in clean) moves
the users back and deletes the filter. With a sync bitmap the job copies only its clusters
(sync=bitmap/incremental) and holds the bitmap (busy, new writes to its successor) until
commit or abort settles it by bitmap mode. Arguments are checked with qsd's texts, in qsd's
order, before the job exists. Invariant: once the job has concluded, whatever its outcome, no
filter is left, every user is back on the source, and the sync bitmap is no longer busy.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import re
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.bitmaps import registry as bitmap_registry
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.copy_before_write import (
    MAX_CHUNK,
    BlockCopyState,
    CopyBeforeWriteDriver,
    CopyFailed,
    cluster_size_for,
)
from storage_daemon.blockdev.graph import NODE_NAME_MAX
from storage_daemon.blockdev.jobs.block_job import BlockJob
from storage_daemon.blockdev.jobs.filters import check_not_busy, move_parents
from storage_daemon.blockdev.jobs.job import JobCancelled, JobTxn
from storage_daemon.blockdev.jobs.writeback import WritebackAhead
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph
    from storage_daemon.daemon import Daemon

log = logging.getLogger(__name__)

FOREVER_NS = 3600 * 10**9
INT_MAX = 2**31 - 1
DEFAULT_MAX_WORKERS = 64
# Chunks in flight at once (at most max-workers): a few keep reads and writes overlapping;
# more only add Python overhead on the two or so cores this runs on.
MAX_IN_FLIGHT = 8
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


def wire(value: Any) -> Any:
    return getattr(value, "value", value)


def check_bitmap_args(
    args: Any, source: BlockNode
) -> tuple[bitmap_registry.DirtyBitmap | None, str | None]:
    """The sync/bitmap combinations, in qsd's order; returns the bitmap to sync by (if any)
    and its bitmap mode (`incremental` means `on-success`)."""
    sync = wire(args.sync)
    if sync in ("bitmap", "incremental") and args.bitmap is None:
        raise QmpError(f"must provide a valid bitmap name for '{sync}' sync mode")
    mode = wire(args.bitmap_mode)
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise QmpError(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
            )
        mode = "on-success"
    if args.bitmap is not None:
        bitmap = bitmap_registry.find(source, args.bitmap)
        if bitmap is None:
            raise QmpError(f"Bitmap '{args.bitmap}' could not be found")
        if mode is None:
            raise QmpError("Bitmap sync mode must be given when providing a bitmap")
        bitmap.check_usable(allow_ro=True)
        if sync == "none":
            raise QmpError(f"sync mode '{sync}' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise QmpError(
                f"Bitmap sync mode '{mode}' has no meaningful effect when combined with "
                f"sync mode '{sync}'"
            )
        return bitmap, mode
    if args.bitmap_mode is not None:
        raise QmpError("Cannot specify bitmap sync mode without a bitmap")
    return None, None


class BackupJob(BlockJob):
    """A backup of `args.device` to the node `args.target` (typed BlockdevBackup arguments).

    The constructor makes every check qsd makes before its job exists, then creates the job;
    `setup()` (run by `JobManager.launch`, or earlier by a transaction; it runs once) inserts
    the copy-before-write filter, which becomes the job's main node."""

    job_type = "backup"
    can_complete = False

    def __init__(self, daemon: Daemon, args: Any, txn: JobTxn | None = None) -> None:
        graph = daemon.graph
        source = graph.lookup(args.device)
        target = self._find_target(daemon, args)
        self.sync_bitmap, self.bitmap_mode = check_bitmap_args(args, source)
        self._frozen = False
        self.daemon = daemon
        self.args = args
        self.source = source
        self.owns_target = False
        self.sync: str = wire(args.sync)
        self.compress = bool(args.compress)
        self.filter_node_name: str | None = args.filter_node_name
        self.on_source_error: str = wire(args.on_source_error) or "report"
        self.on_target_error: str = wire(args.on_target_error) or "report"
        self.max_chunk = 0
        self.max_workers = DEFAULT_MAX_WORKERS
        self.use_copy_range = True
        self.cbw: BlockNode | None = None
        self.bcs: BlockCopyState | None = None
        self._set_up = False
        self._target: BlockNode | None = None
        if target is not None:
            self._check_target(target)
        # The source stands in as main node until setup() puts the filter in its place.
        super().__init__(
            daemon.jobs,
            args.job_id,
            graph,
            source,
            perm=PERM_NONE,
            shared=PERM_ALL,
            speed=args.speed or 0,
            auto_finalize=args.auto_finalize is not False,
            auto_dismiss=args.auto_dismiss is not False,
            txn=txn,
        )

    def _find_target(self, daemon: Daemon, args: Any) -> BlockNode | None:
        return daemon.graph.lookup(args.target)

    @property
    def target(self) -> BlockNode:
        assert self._target is not None
        return self._target

    def _check_target(self, target: BlockNode) -> None:
        """qsd's checks of a source and target pair, in qsd's order; then the target is set."""
        source, args = self.source, self.args
        if source is target:
            raise QmpError("Source and target cannot be the same")
        if args.compress and getattr(target.driver, "pwritev_compressed", None) is None:
            # qsd names the target's device here, which a node never has.
            raise QmpError("Compression is not supported for this drive ")
        check_not_busy(source, self)
        check_not_busy(target, self)
        perf = args.x_perf
        max_workers = DEFAULT_MAX_WORKERS
        max_chunk = 0
        if perf is not None:
            if perf.max_workers is not None:
                max_workers = perf.max_workers
            if perf.max_chunk is not None:
                max_chunk = perf.max_chunk
            if perf.use_copy_range is not None:
                self.use_copy_range = bool(perf.use_copy_range)
        if not 1 <= max_workers <= INT_MAX:
            raise QmpError(f"max-workers must be between 1 and {INT_MAX}")
        if max_chunk < 0:
            raise QmpError("max-chunk must be zero (which means no limit) or positive")
        if source.driver.getlength() != target.driver.getlength():
            raise QmpError("Source and target image have different sizes")
        self._precheck_filter(self.daemon.graph, args.filter_node_name, target)
        cluster_size = cluster_size_for(target)
        if max_chunk and max_chunk < cluster_size:
            raise QmpError(
                f"Required max-chunk ({max_chunk}) is less than backup cluster size "
                f"({cluster_size})"
            )
        self.max_chunk = max_chunk
        self.max_workers = max_workers
        self._target = target

    @staticmethod
    def _precheck_filter(graph: BlockGraph, name: str | None, target: BlockNode) -> None:
        """The failures of creating the filter that qsd reports before its job exists."""
        if name is not None:
            if not _NODE_NAME.match(name):
                raise QmpError(f"Could not create node: Invalid node-name: '{name}'")
            if graph.find(name) is not None:
                raise QmpError(f"Could not create node: Duplicate nodes with node-name='{name}'")
            if len(name) > NODE_NAME_MAX:
                raise QmpError("Could not create node: Node name too long")
        if target.read_only:
            raise QmpError("Could not create node: Block node is read-only")

    # --- the filter -----------------------------------------------------------------------

    async def setup(self) -> None:
        if self._set_up:
            return
        self._set_up = True
        from storage_daemon.qapi.runtime import visit_input

        graph = self.graph
        spec: dict[str, Any] = {
            "driver": "copy-before-write",
            "file": self.source.name,
            "target": self.target.name,
        }
        if self.filter_node_name is not None:
            spec["node-name"] = self.filter_node_name
        # qsd makes the sync bitmap's successor before the filter's bitmaps.
        successor_seq = bitmap_registry.next_seq()
        try:
            cbw = await graph.add(visit_input("BlockdevOptions", spec), monitor_owned=False)
        except QmpError as err:
            raise QmpError(f"Could not create node: {err.desc}", err.error_class) from err
        self.cbw = cbw
        # The source stays held (as the stand-in main node) until the filter is in place, so
        # that a failure can let go of the filter and the target and leave the graph as it was.
        held: list[BdrvChild] = []
        try:
            own_edge = cbw.primary
            try:
                move_parents(
                    graph,
                    self.source,
                    cbw,
                    lambda edge: edge is own_edge or edge.parent is self,
                )
            except QmpError as err:
                raise QmpError(f"Could not replace node: {err.desc}", err.error_class) from err
            held.append(graph.attach(self, cbw, "main node", ChildRole(0), PERM_NONE, PERM_ALL))
            held.append(self.add_node("target", self.target, PERM_NONE, PERM_ALL))
            graph.refresh_perms(cbw)  # the filter has users now: it unshares writes
        except BaseException:
            for edge in reversed(held):  # as clean(): the job's nodes first, then the filter
                if edge in self.edges:
                    self.edges.remove(edge)
                graph.detach(edge)
            await self._drop_filter()
            raise
        stand_in = self.edges[0]
        self.edges[0] = held[0]
        graph.detach(stand_in)
        driver = cbw.driver
        assert isinstance(driver, CopyBeforeWriteDriver) and driver.bcs is not None
        bcs = self.bcs = driver.bcs
        bcs.skip_unallocated = self.sync == "top"
        bcs.compress = self.compress
        bcs.use_copy_range = self.use_copy_range
        chunk = min(self.max_chunk or MAX_CHUNK, MAX_CHUNK)
        bcs.max_chunk = max(bcs.cluster_size, chunk - chunk % bcs.cluster_size)
        bcs.on_progress = self.progress_update
        bcs.on_reset = self._drop_remaining
        bitmap = self.sync_bitmap
        if bitmap is not None:
            if self.sync in ("bitmap", "incremental"):
                bcs.only_dirty_in(bitmap.bits)
            # As qsd: busy until the job ends, the writes meanwhile going to a successor.
            bitmap_registry.freeze(bitmap, successor_seq)
            self._frozen = True
        self.progress_set_remaining(bcs.dirty_bytes())

    def _drop_remaining(self, nbytes: int) -> None:
        self.progress_increase_remaining(-nbytes)

    async def _drop_filter(self) -> None:
        """Move the filter's users to the node below it and delete it (QEMU's bdrv_cbw_drop)."""
        cbw, self.cbw = self.cbw, None
        if cbw is None:
            return
        below = cbw.primary
        if below is not None:
            try:
                move_parents(self.graph, cbw, below.node, lambda edge: edge.parent is self)
            except QmpError:
                log.exception("backup %s: could not move users back from %s", self.id, cbw.name)
        if not cbw.parents:
            await self.graph.remove(cbw)

    # --- the work -------------------------------------------------------------------------

    async def run(self) -> None:
        bcs = self.bcs
        assert bcs is not None
        await io.settled(self.source)  # writes begun before the filter land before any copy
        if self.sync == "top":
            c = 0
            while c < bcs.clusters:
                if self.is_cancelled:
                    raise JobCancelled
                c = await bcs.reset_unallocated(c)
            bcs.skip_unallocated = False
        if self.sync == "none":
            # Nothing to copy in the background: the filter copies what clients overwrite,
            # until the job is cancelled.
            while True:
                await self.sleep(FOREVER_NS)
        await self._copy_loop(bcs)
        await io.flush(bcs.target)

    async def _copy_loop(self, bcs: BlockCopyState) -> None:
        """Copy every dirty cluster through the copy state, several chunks in flight (qsd's
        block-copy runs up to max-workers). As in qsd, after a failure nothing new starts
        until the copies in flight have ended; the error then goes through the policy once,
        and the clusters not copied are tried again (after a pause for "stop")."""
        cursor = 0
        per_chunk = max(1, bcs.max_chunk // bcs.cluster_size)
        tasks: set[asyncio.Task[None]] = set()
        extents = _Extents(bcs)
        writeback = WritebackAhead()
        flushes = writeback.tasks
        failures: list[CopyFailed] = []
        fatal: list[Exception] = []  # not an I/O error: the job fails with it, no retry
        # The job ends with a flush of the target; its image file is flushed in the
        # background (outside a format's metadata lock) as the copy goes, so that last flush
        # finds little left to write.
        file = bcs.target.node.child("file") or bcs.target

        async def copy(first: int, end: int, waiter: asyncio.Future[None]) -> None:
            try:
                copied = await bcs.copy_claimed(first, end, waiter)
            except CopyFailed as failure:
                failures.append(failure)
                return
            except Exception as exc:  # a bug, not an I/O error: ends the job below
                fatal.append(exc)
                return
            self.ratelimit_processed(copied)
            writeback.copied(copied, file)

        try:
            while True:
                limit = 1 if self.speed else min(self.max_workers, MAX_IN_FLIGHT)
                busy = tasks | flushes
                if busy and (
                    failures
                    or fatal
                    or self.should_pause()
                    or self.is_cancelled
                    or len(tasks) >= limit
                ):
                    # Pause points only with nothing in flight: a paused job does no I/O.
                    await asyncio.wait(busy, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if fatal:
                    raise fatal[0]
                if failures:
                    failure = failures[0]
                    failures.clear()
                    policy = self.on_source_error if failure.is_read else self.on_target_error
                    err = failure.err
                    if self.error_action(policy, failure.is_read, err.errno or errno.EIO) == (
                        "report"
                    ):
                        raise err from None
                    cursor = 0  # "stop" parks at the next pause point; both copy again
                    continue
                c = bcs.next_dirty(cursor)
                if c >= 0 and not busy:
                    # A pause point, and the rate limit's wait, only before a request (qsd's
                    # block-copy: a job whose last request is done ends without a sleep).
                    await self.ratelimit_sleep()
                    c = bcs.next_dirty(cursor)
                if c < 0:
                    if busy:
                        await asyncio.wait(busy, return_when=asyncio.FIRST_COMPLETED)
                    elif cursor:
                        cursor = 0  # clusters a failed copy of the filter left behind
                    elif bcs.idle():
                        return
                    else:
                        await bcs.wait_idle()
                    continue
                # As qsd's block-copy, a request covers one block-status extent (one layer's
                # data, or zeroes) of at most a chunk: the progress (and the rate limit)
                # moves in the same steps.
                kind, n = await extents.at(c)
                if not bcs.dirty[c]:
                    continue  # the filter took it meanwhile
                known = (kind, min(n, per_chunk))
                end = c + 1
                stop = c + known[1]
                while end < stop and bcs.dirty[end]:
                    end += 1
                waiter = bcs.claim(c, end, known)  # taken now: the filter's copies wait
                task = asyncio.get_running_loop().create_task(copy(c, end, waiter))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                cursor = end
        finally:
            await _settle(tasks, flushes)

    # --- completion -----------------------------------------------------------------------

    async def commit(self) -> None:
        self._settle_bitmap(True)

    async def abort(self) -> None:
        self._settle_bitmap(False)

    def _settle_bitmap(self, success: bool) -> None:
        """The sync bitmap at the job's end, by bitmap mode: `on-success` keeps only the
        writes made meanwhile if the job succeeded, and everything otherwise; `never` keeps
        everything; `always` drops what was copied, whatever the outcome."""
        bitmap = self.sync_bitmap
        if bitmap is None or not self._frozen:
            return
        self._frozen = False
        mode = self.bitmap_mode
        if mode == "never" or (not success and mode != "always"):
            bitmap_registry.reclaim(bitmap)
            return
        bitmap_registry.abdicate(bitmap)
        if not success and self.bcs is not None:
            self.bcs.mark_uncopied(bitmap.bits)

    async def clean(self) -> None:
        bcs = self.bcs
        if bcs is not None:
            bcs.on_progress = bcs.on_reset = None
            try:
                await io.flush(bcs.target)
            except OSError:
                pass
        # qsd drops the job's nodes first, then the filter.
        for edge in list(self.edges):
            self.remove_node(edge)
        await self._drop_filter()
        if self.owns_target and self._target is not None and not self._target.parents:
            await self.graph.remove(self._target)

    def release(self) -> None:
        super().release()
        if self._frozen and self.sync_bitmap is not None:
            self._frozen = False  # gone without commit or abort: nothing was consumed
            bitmap_registry.reclaim(self.sync_bitmap)
        if self.cbw is not None:
            # Only reached when the job goes away without its clean step: leave the users on
            # the source at least (the filter node itself needs an await to close).
            cbw = self.cbw
            below = cbw.primary
            if below is not None:
                try:
                    move_parents(self.graph, cbw, below.node, lambda edge: False)
                except QmpError:
                    log.exception("backup %s: could not move users back", self.id)


class _Extents:
    """The source's block-status extents from some cluster on, read ahead a batch at a time.

    qsd's block-copy asks the status of each request before it starts it, without yielding:
    its requests start back to back. Ours are answered on the thread pool, so a batch read
    ahead lets the job start its requests back to back as well (an error in one of them is
    then seen only after the others have started, as on qsd). The clusters still to copy
    cannot change on the source meanwhile: every write to them goes through the filter,
    which copies them first."""

    BATCH = 16

    def __init__(self, bcs: BlockCopyState) -> None:
        self.bcs = bcs
        self.starts: list[int] = []  # contiguous extents: starts[i] .. starts[i + 1]
        self.kinds: list[str] = []
        self.end = 0

    async def at(self, c: int) -> tuple[str, int]:
        """The kind of the extent holding cluster `c` and how many clusters of it remain."""
        if not self.starts or not self.starts[0] <= c < self.end:
            await self._scan(c)
        i = bisect.bisect_right(self.starts, c) - 1
        stop = self.starts[i + 1] if i + 1 < len(self.starts) else self.end
        return self.kinds[i], stop - c

    async def _scan(self, c: int) -> None:
        bcs = self.bcs
        self.starts, self.kinds = [], []
        while c < bcs.clusters and len(self.starts) < self.BATCH:
            kind, n = await bcs.extent(c, bcs.clusters)
            self.starts.append(c)
            self.kinds.append(kind)
            c += n
        self.end = c


async def _settle(*groups: set[asyncio.Task[None]]) -> None:
    """Until the tasks of every group have ended; a cancelled job cancels them first."""
    try:
        while any(groups):
            await asyncio.wait(set().union(*groups))
    except asyncio.CancelledError:
        pending = set().union(*groups)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise


QCOW2_MAGIC = b"QFI\xfb"


class DriveBackupJob(BackupJob):
    """drive-backup (typed DriveBackup arguments): the target is an image file that `setup()`
    creates (mode absolute-paths, the default, as qsd: in the source's format, recording the
    source's backing file, or the source itself for sync=none) or opens (mode existing), and
    that is closed again when the job ends.

    The checks that need the target therefore come after the job's `created` event, where
    qsd makes them before it."""

    def _find_target(self, daemon: Daemon, args: Any) -> BlockNode | None:
        return None

    async def setup(self) -> None:
        if self._target is None:
            target = await self._open_target()
            self.owns_target = True
            try:
                self._check_target(target)
            except BaseException:
                await self.graph.remove(target)
                raise
        try:
            await super().setup()
        except BaseException:
            if self._target is not None and not self._target.parents:
                await self.graph.remove(self._target)
            raise

    async def _open_target(self) -> BlockNode:
        from storage_daemon.blockdev import chain
        from storage_daemon.blockdev.jobs.mirror_drive import create_image
        from storage_daemon.qapi.runtime import visit_input

        args, source = self.args, self.source
        mode = wire(args.mode) or "absolute-paths"
        fmt: str | None = args.format
        if fmt is None and mode != "existing":
            fmt = source.driver.format_name()
        check_not_busy(source, self)  # before anything is created, as qsd
        backing: BlockNode | None = None
        if self.sync == "top":
            unfiltered = chain.skip_filters(source) or source
            backing_edge = chain.cow_child(unfiltered)
            backing = backing_edge.node if backing_edge is not None else None
            if backing is None:
                self.sync = "full"
        attach_source = self.sync == "none"
        if attach_source:
            backing = source
        if mode != "existing":
            assert fmt is not None
            await create_image(self.daemon, args.target, fmt, source.driver.getlength(), backing)
        file_spec: dict[str, Any] = {"driver": "file", "filename": args.target}
        if fmt is None:
            fmt = await self._probe(visit_input("BlockdevOptions", file_spec))
        # qsd opens the target with discard=unmap and detect-zeroes=unmap.
        spec: dict[str, Any] = {
            "driver": fmt,
            "file": file_spec,
            "discard": "unmap",
            "detect-zeroes": "unmap",
        }
        if attach_source:
            spec["backing"] = None
        target = await self.graph.add(visit_input("BlockdevOptions", spec), monitor_owned=False)
        if attach_source and target.driver.supports_backing:
            try:
                await chain.set_backing(self.graph, target, source)
            except BaseException:
                await self.graph.remove(target)
                raise
        return target

    async def _probe(self, options: Any) -> str:
        """The image format, from its first bytes (qcow2 or raw: the formats we have)."""
        node = await self.graph.add(options, monitor_owned=False)
        edge = self.graph.attach(self, node, "probe", ChildRole(0), PERM_NONE, PERM_ALL)
        try:
            head = await io.pread(edge, 0, min(4, io.length(edge)))
        finally:
            self.graph.detach(edge)
            await self.graph.remove(node)
        return "qcow2" if bytes(head) == QCOW2_MAGIC else "raw"
