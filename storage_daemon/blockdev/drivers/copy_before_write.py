"""The `copy-before-write` filter and the copy state it shares with a backup job.

Domain ring. Before a write (or zero write, or discard) reaches a cluster of the source whose
point-in-time data the target does not hold yet, the filter copies that cluster's old data to
the target; a backup job copies the remaining clusters through the same `BlockCopyState`
(claimed synchronously, copied as tasks; between plain files by the kernel, `copy_range`).
Invariant: a cluster is copied at most once, and no write reaches a cluster while its copy
(or a snapshot read of its old data) is in flight, so the target holds exactly the source's
data as it was when the filter was inserted.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.bitmaps import registry
from storage_daemon.blockdev.bitmaps.core import Bits
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.copy_range import copy_range
from storage_daemon.blockdev.driver import BlockStatus, ChildOpener
from storage_daemon.blockdev.drivers import compress
from storage_daemon.blockdev.drivers.throttle import FilterDriver
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.qapi.runtime import to_wire

MIN_CLUSTER = 64 * 1024  # QEMU's BLOCK_COPY_CLUSTER_SIZE_DEFAULT
MAX_CHUNK = 1024 * 1024  # QEMU's BLOCK_COPY_MAX_BUFFER: the largest buffered copy request


class CopyFailed(Exception):
    """A copy failed reading the source (`is_read`) or writing the target."""

    def __init__(self, err: OSError, is_read: bool) -> None:
        super().__init__(str(err))
        self.err = err
        self.is_read = is_read


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def cluster_size_for(target: Any) -> int:
    """The copy granularity: the target's cluster size, at least 64 KiB (QEMU's rule, which
    keeps a copy from ever writing part of a target cluster)."""
    info = target.driver.image_info_extra()
    size = info.get("cluster-size")
    return max(MIN_CLUSTER, int(size)) if isinstance(size, int) and size > 0 else MIN_CLUSTER


class BlockCopyState:
    """Which clusters still have to be copied (QEMU's copy bitmap), which are on the target
    already, and the copies in flight. The filter and a backup job both copy through it."""

    def __init__(self, source: BdrvChild, target: BdrvChild, cluster_size: int) -> None:
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        self.length = io.length(source)
        self.clusters = -(-self.length // cluster_size)
        self.dirty = bytearray(b"\x01") * self.clusters  # 1: still to copy
        self.done = bytearray(self.clusters)  # 1: the target holds the point-in-time data
        self.access = bytearray(b"\x01") * self.clusters  # 0: discarded by a snapshot reader
        self.max_chunk = max(cluster_size, MAX_CHUNK - MAX_CHUNK % cluster_size)
        self.skip_unallocated = False  # sync=top: leave what the top does not allocate
        self.compress = False
        self.use_copy_range = True  # copy in the kernel where both ends are plain files
        # Hooks a backup job sets: bytes copied, bytes dropped without copying (sync=top).
        self.on_progress: Callable[[int], None] | None = None
        self.on_reset: Callable[[int], None] | None = None
        self._inflight: dict[int, asyncio.Future[None]] = {}  # cluster -> its copy's end
        self._known: dict[int, tuple[str, int]] = {}  # claimed first cluster -> its extent
        self._readers: dict[int, int] = {}  # cluster -> snapshot reads of the source
        self._reader_done: asyncio.Event | None = None

    # --- bitmap arithmetic ----------------------------------------------------------------

    def _bytes(self, first: int, end: int) -> int:
        """Bytes of clusters [first, end), the last cluster clipped at the source's end."""
        return min(end * self.cluster_size, self.length) - first * self.cluster_size

    def dirty_bytes(self) -> int:
        count = self.dirty.count(1)
        if count and self.dirty[-1]:
            return count * self.cluster_size - (self.clusters * self.cluster_size - self.length)
        return count * self.cluster_size

    def next_dirty(self, start: int) -> int:
        """The first cluster from `start` on still to copy, or -1."""
        return self.dirty.find(1, start)

    def idle(self) -> bool:
        return not self._inflight

    def only_dirty_in(self, bits: Bits) -> None:
        """Copy only the clusters that some dirty granule of `bits` touches (qsd's block-copy
        takes a bitmap's dirty bits, rounded out to its clusters)."""
        cs = self.cluster_size
        dirty = bytearray(self.clusters)
        for offset, length in bits.dirty_runs():
            first, end = offset // cs, min(self.clusters, -(-(offset + length) // cs))
            dirty[first:end] = b"\x01" * max(0, end - first)
        self.dirty[:] = dirty

    def mark_uncopied(self, bits: Bits) -> None:
        """Mark in `bits` every cluster still to copy (a failed backup's mode `always`)."""
        cs = self.cluster_size
        c = self.dirty.find(1)
        while c >= 0:
            end = self.dirty.find(0, c)
            if end < 0:
                end = self.clusters
            bits.set(c * cs, self._bytes(c, end))
            c = self.dirty.find(1, end)

    async def wait_idle(self) -> None:
        """Until no copy is in flight (a failed one leaves its clusters dirty again)."""
        while self._inflight:
            await asyncio.shield(next(iter(self._inflight.values())))

    def reset(self, first: int, end: int) -> None:
        """Drop clusters [first, end) from the copy set without copying them."""
        dropped = 0
        for c in range(first, end):
            if self.dirty[c]:
                self.dirty[c] = 0
                dropped += self._bytes(c, c + 1)
        if dropped and self.on_reset is not None:
            self.on_reset(dropped)

    async def reset_unallocated(self, c: int) -> int:
        """sync=top: drop the clusters from `c` on that the top image does not allocate;
        returns the next cluster to look at."""
        kind, n = await self.extent(c, self.clusters)
        if kind == "skip":
            self.reset(c, c + n)
        return c + n

    # --- copying --------------------------------------------------------------------------

    async def copy(self, offset: int, length: int) -> None:
        """Make sure the target holds the old data of every cluster of the range (CopyFailed
        if a copy fails; the clusters stay to copy)."""
        if length <= 0:
            return
        cs = self.cluster_size
        c = offset // cs
        last = min((offset + length - 1) // cs, self.clusters - 1)
        while c <= last:
            pending = self._inflight.get(c)
            if pending is not None:
                await asyncio.shield(pending)
                continue  # look at the cluster again: a failed copy left it dirty
            if not self.dirty[c]:
                c += 1
                continue
            end = c + 1
            limit = min(last + 1, c + self.max_chunk // cs)
            while end < limit and self.dirty[end] and end not in self._inflight:
                end += 1
            await self.copy_clusters(c, end)
            c = end

    async def copy_clusters(self, first: int, end: int) -> int:
        """Copy clusters [first, end), all dirty and none in flight; returns the bytes copied
        (0 for clusters sync=top drops as unallocated)."""
        return await self.copy_claimed(first, end, self.claim(first, end))

    def claim(
        self, first: int, end: int, known: tuple[str, int] | None = None
    ) -> asyncio.Future[None]:
        """Take clusters [first, end) (all dirty, none in flight) for a copy that follows
        with `copy_claimed`: from now on nobody else copies them, and a write to them waits
        for the returned future. Synchronous, so a job can claim a range and start its copy
        as a task without anyone taking the range in between. `known`: the `extent` of
        `first` the caller asked for before it claimed (not asked again)."""
        if known is not None:
            self._known[first] = known
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        inflight = self._inflight
        dirty = self.dirty
        for c in range(first, end):
            inflight[c] = waiter
        dirty[first:end] = bytes(end - first)
        return waiter

    async def copy_claimed(self, first: int, end: int, waiter: asyncio.Future[None]) -> int:
        """Copy the clusters `claim` took; on failure those not copied are dirty again."""
        cursor = [first]  # clusters below it are copied (or dropped) for good
        try:
            return await self._copy_run(first, end, cursor, self._known.pop(first, None))
        except BaseException:
            self.dirty[cursor[0] : end] = b"\x01" * (end - cursor[0])
            raise
        finally:
            for c in range(first, end):
                self._inflight.pop(c, None)
            waiter.set_result(None)

    async def extent(self, c: int, end: int) -> tuple[str, int]:
        """How to copy the clusters from `c` on (below `end`), and how many the answer holds
        for: "data", "zero" (a zero write, nothing read), or "skip" (sync=top: the top image
        does not allocate them). As QEMU's block-copy, a status extent shorter than a cluster
        or a failed status query means one cluster of data."""
        cs = self.cluster_size
        offset = c * cs
        span = self._bytes(c, end)
        try:
            st = await io.block_status(self.source, offset, span)
        except OSError:
            return "data", 1
        stop = offset + min(max(st.length, 0), span)
        n = -(-(stop - offset) // cs) if stop >= self.length else (stop - offset) // cs
        if n <= 0:
            return "data", 1
        if self.skip_unallocated and st.depth != 1:
            return "skip", n
        return ("zero" if st.zero else "data"), n

    async def _copy_run(
        self, first: int, end: int, cursor: list[int], known: tuple[str, int] | None
    ) -> int:
        copied = 0
        c = first
        while c < end:
            cursor[0] = c
            if known is not None:
                kind, n = known[0], min(known[1], end - c)
                known = None
            else:
                kind, n = await self.extent(c, end)
            nbytes = self._bytes(c, c + n)
            if kind == "skip":
                if self.on_reset is not None:
                    self.on_reset(nbytes)
                c += n
                continue
            await self._copy_data(c, c + n, kind == "zero")
            self.done[c : c + n] = b"\x01" * n
            copied += nbytes
            if self.on_progress is not None:
                self.on_progress(nbytes)
            c += n
        return copied

    async def _copy_data(self, first: int, end: int, zero: bool) -> None:
        offset = first * self.cluster_size
        length = self._bytes(first, end)
        data: Any = b""
        if not zero and not self.compress and self.use_copy_range:
            # The kernel copies between plain files. Any failure falls back to reading and
            # writing for good (as QEMU's block-copy), which then tells source and target
            # errors apart for the on-error policies.
            try:
                if await copy_range(self.source, offset, self.target, offset, length):
                    return
            except OSError:
                self.use_copy_range = False
        if not zero:
            try:
                data = await io.pread(self.source, offset, length)
            except OSError as err:
                raise CopyFailed(err, True) from err
        try:
            # Data is written as read, zeroes too (as qsd's block-copy: only what block
            # status reports as zero becomes a zero write, so the target's allocation
            # follows the source's).
            if zero:
                await io.pwrite_zeroes(self.target, offset, length)
            elif self.compress:
                await self._write_compressed(offset, data)
            else:
                await io.pwrite(self.target, offset, data)
        except OSError as err:
            raise CopyFailed(err, False) from err

    async def _write_compressed(self, offset: int, data: Any) -> None:
        drv: Any = self.target.node.driver
        view = memoryview(data)
        size = drv.image_info_extra().get("cluster-size")
        cs = size if isinstance(size, int) and size > 0 else self.cluster_size
        for pos in range(0, len(view), cs):
            # Through the edge: permission checks, stats and detect-zeroes as any write.
            await compress.pwrite_compressed(self.target, offset + pos, view[pos : pos + cs])

    # --- snapshot reads (snapshot-access) -------------------------------------------------

    def snapshot_read_begin(self, first: int, end: int) -> None:
        for c in range(first, end):
            self._readers[c] = self._readers.get(c, 0) + 1

    def snapshot_read_end(self, first: int, end: int) -> None:
        for c in range(first, end):
            left = self._readers[c] - 1
            if left:
                self._readers[c] = left
            else:
                del self._readers[c]
        if self._reader_done is not None:
            self._reader_done.set()
            self._reader_done = None

    async def wait_cluster(self, c: int) -> None:
        pending = self._inflight.get(c)
        if pending is not None:
            await asyncio.shield(pending)

    async def wait_readers(self, offset: int, length: int) -> None:
        """Until no snapshot read of the source's old data overlaps the range."""
        cs = self.cluster_size
        first, end = offset // cs, -(-(offset + length) // cs)
        while any(c in self._readers for c in range(first, min(end, self.clusters))):
            if self._reader_done is None:
                self._reader_done = asyncio.Event()
            await self._reader_done.wait()


class CopyBeforeWriteDriver(FilterDriver):
    name = "copy-before-write"
    passes_filename = True

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self._target: BdrvChild | None = None
        self.bcs: BlockCopyState | None = None
        self.on_cbw_error = "break-guest-write"
        self.timeout = 0  # seconds; 0: none
        self.snapshot_broken = False
        # Clusters a guest write had copied first (qsd's done bitmap; the job's copies do not
        # count), and the anonymous bitmaps query-named-block-nodes lists while we are open.
        self.written = bytearray()
        self._anonymous: list[tuple[Any, registry.AnonymousBitmap]] = []

    async def open(self, options: Any, opener: ChildOpener) -> None:
        file = await self.open_filtered(options.file, opener)
        target = await opener.open_child(self.node, options.target, "target", ChildRole.DATA)
        self._target = target
        bits: Bits | None = None
        if options.bitmap is not None:
            bitmap = registry.lookup(self.node.graph, options.bitmap.node, options.bitmap.name)[1]
            bitmap.check_usable(allow_ro=True)
            bits = bitmap.bits
        if options.on_cbw_error is not None:
            self.on_cbw_error = str(to_wire(options.on_cbw_error))
        if options.cbw_timeout is not None:
            self.timeout = int(options.cbw_timeout)
        self.bcs = BlockCopyState(file, target, cluster_size_for(target.node))
        if bits is not None:
            # Only the bitmap's clusters, as it is now, are copied before a write, and only
            # they can be read through the snapshot (qsd's access bitmap starts as a copy).
            self.bcs.only_dirty_in(bits)
            self.bcs.access[:] = self.bcs.dirty
        self.written = bytearray(self.bcs.clusters)
        self._show_bitmaps(self.bcs)

    def _show_bitmaps(self, bcs: BlockCopyState) -> None:
        """As qsd: block-copy's copy bitmap on the source, then the filter's done and access
        bitmaps on the filter node, all anonymous, disabled, of the copy's cluster size."""
        cs = bcs.cluster_size

        def counted(bits: bytearray) -> Callable[[], dict[str, Any]]:
            return lambda: registry.anonymous_info(False, cs, bits.count(1) * cs)

        for node, bits in (
            (bcs.source.node, bcs.dirty),
            (self.node, self.written),
            (self.node, bcs.access),
        ):
            self._anonymous.append((node, registry.attach_anonymous(node, counted(bits))))

    async def close(self) -> None:
        for node, bitmap in self._anonymous:
            registry.release_anonymous(node, bitmap)
        self._anonymous.clear()
        await super().close()

    def target(self) -> BdrvChild:
        if self._target is None:
            raise _error(errno.ENOTSUP)
        return self._target

    def child_perm(self, child: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        if child.name == "target":
            # Others may write the target (it may be a backing of the source), but nobody
            # may resize it: its size was checked once, up front.
            return Perm.WRITE, PERM_ALL & ~Perm.RESIZE
        if not self.node.parents and not perm:
            return perm, shared  # being inserted: the source's users are still on it
        if perm & Perm.WRITE:
            perm |= Perm.CONSISTENT_READ  # old data is read before every write
        return perm, shared & ~(Perm.WRITE | Perm.RESIZE)

    # --- the write path -------------------------------------------------------------------

    async def _before_write(self, offset: int, length: int) -> None:
        bcs = self.bcs
        if bcs is None or self.snapshot_broken:
            return
        try:
            if self.timeout:
                async with asyncio.timeout(self.timeout):
                    await bcs.copy(offset, length)
            else:
                await bcs.copy(offset, length)
        except (CopyFailed, TimeoutError) as failure:
            if self.on_cbw_error == "break-guest-write":
                if isinstance(failure, CopyFailed):
                    raise failure.err from None
                raise _error(errno.ETIMEDOUT) from None
            # break-snapshot: the write goes through; the point-in-time view is lost.
            self.snapshot_broken = True
            return
        cs = bcs.cluster_size
        first, end = offset // cs, min(-(-(offset + length) // cs), bcs.clusters)
        if end > first:
            self.written[first:end] = b"\x01" * (end - first)
        await bcs.wait_readers(offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._before_write(offset, len(data))
        await io.pwrite(self.child(), offset, data, fua=fua)

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        await self._before_write(offset, length)
        await super().pwrite_zeroes(offset, length, unmap, fua)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._before_write(offset, length)
        await io.pdiscard(self.child(), offset, length)

    async def flush(self) -> None:
        await io.flush(self.child())

    # --- the point-in-time view (snapshot-access) ---------------------------------------

    def _snapshot_check(self, offset: int, length: int) -> BlockCopyState:
        bcs = self.bcs
        if bcs is None or self.snapshot_broken:
            raise _error(errno.EACCES)
        cs = bcs.cluster_size
        first, end = offset // cs, min(-(-(offset + length) // cs), bcs.clusters)
        if bcs.access.find(0, first, end) >= 0:
            raise _error(errno.EACCES)  # discarded through the snapshot
        return bcs

    def _run_of(self, bcs: BlockCopyState, c: int, end: int) -> int:
        """The clusters from `c` whose data is in the same place (target or source)."""
        state = bcs.done[c]
        n = c + 1
        while n < end and bcs.done[n] == state and n not in bcs._inflight:
            n += 1
        return n

    async def snapshot_preadv(self, offset: int, length: int) -> bytearray:
        """Read the data as it was when the filter was inserted: from the target where it
        was copied there, else from the source (holding off writes meanwhile)."""
        bcs = self._snapshot_check(offset, length)
        cs = bcs.cluster_size
        out = bytearray(length)
        pos, stop = offset, offset + length
        while pos < stop:
            c = pos // cs
            await bcs.wait_cluster(c)
            run_end = self._run_of(bcs, c, min(-(-stop // cs), bcs.clusters))
            n = min(stop, run_end * cs) - pos
            if bcs.done[c]:
                data = await io.pread(bcs.target, pos, n)
            else:
                bcs.snapshot_read_begin(c, run_end)
                try:
                    data = await io.pread(bcs.source, pos, n)
                finally:
                    bcs.snapshot_read_end(c, run_end)
            out[pos - offset : pos - offset + n] = data
            if self.snapshot_broken:
                raise _error(errno.EACCES)
            pos += n
        return out

    async def snapshot_block_status(self, offset: int, length: int) -> BlockStatus:
        bcs = self._snapshot_check(offset, length)
        cs = bcs.cluster_size
        c = offset // cs
        run_end = self._run_of(bcs, c, min(-(-(offset + length) // cs), bcs.clusters))
        n = min(offset + length, run_end * cs) - offset
        edge = bcs.target if bcs.done[c] else bcs.source
        st = await io.block_status(edge, offset, n)
        return BlockStatus(length=st.length, data=st.data, zero=st.zero)

    def snapshot_discard(self, offset: int, length: int) -> None:
        """The reader no longer needs these clusters: nothing is copied for them any more,
        and reading them fails."""
        bcs = self.bcs
        if bcs is None:
            return
        cs = bcs.cluster_size
        first = -(-offset // cs)
        end = bcs.clusters if offset + length >= bcs.length else (offset + length) // cs
        for c in range(first, end):
            bcs.access[c] = 0
        bcs.reset(first, end)
