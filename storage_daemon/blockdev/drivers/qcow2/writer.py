"""Guest writes, zero writes and discards of a qcow2 image, one cluster at a time.

Domain ring; runs under the driver's metadata lock, except `write_in_place` and
`write_in_place_now` (data only, into clusters needing no metadata change; awaited, or done
inline on tmpfs or started on the file's writer thread when the L2 table is cached;
`Metadata.inflight` keeps their refcounts up meanwhile)
and the data of runs of new clusters (`PendingAlloc`: reserved in the refcounts under the
lock, written by the driver without it, then linked in L2 under it again, while requests on
their guest clusters wait). Order per cluster: allocate (refcount in the cache), write the
data (with the copy-on-write head and tail), then update the cached L2 entry;
`Metadata.writeback` later makes refblocks and data stable before the L2 table and applies
the refcount drops of replaced clusters last. In copy-up mode (`copy_range.copy_up_active()`,
block-stream's copies) only the parts that read from the backing file are written.
Invariant: a host cluster is written in place only when its L2 entry carries COPIED
(refcount exactly 1). blkdebug events follow qsd's order (allocation, zero-fill or
copy-on-write read, data write).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from storage_daemon.blockdev import io
from storage_daemon.blockdev.copy_range import copy_up_active
from storage_daemon.blockdev.drivers.blkdebug import debug_event
from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.alloc import (
    FREE_OTHER,
    FREE_REQUEST,
    Corruption,
    Metadata,
)
from storage_daemon.blockdev.drivers.qcow2.format import ClusterType
from storage_daemon.blockdev.drivers.qcow2.inflight import AllocTracker, PendingAlloc
from storage_daemon.blockdev.drivers.qcow2.mapping import Mapper

if TYPE_CHECKING:
    from storage_daemon.blockdev.drivers.qcow2.driver import Qcow2Driver

# Cached metadata and page-cache hits complete without suspending: long loops yield to the
# event loop every this many clusters.
YIELD_EVERY = 32
# New clusters taking at least this much guest data are written outside the metadata lock
# (they overlap with other requests, as qsd's); below it, under the lock (cheaper).
DEFER_MIN_BYTES = 64 * 1024
_ZEROES = bytes(512)


class Writer:
    def __init__(self, driver: Qcow2Driver, meta: Metadata, mapper: Mapper) -> None:
        self.driver = driver
        self.meta = meta
        self.mapper = mapper
        self.cs = meta.cluster_size
        self.cb = meta.cluster_bits
        self.ext = mapper.extended
        self.sc = self.cs // fmt.SUBCLUSTERS if self.ext else self.cs
        self.l2_entries = meta.hdr.l2_entries
        self.v3 = meta.hdr.version >= 3
        self.tracker = AllocTracker(self.cb)
        # The current lock holder's allocations, written by the driver once it let go.
        self.deferred: list[PendingAlloc] = []

    # --- L2 tables ----------------------------------------------------------------------

    async def _l2_for_write(self, cluster_index: int) -> tuple[int, bytearray]:
        meta = self.meta
        l1_index = cluster_index // self.l2_entries
        if l1_index >= len(meta.l1):
            raise Corruption(f"L1 index {l1_index} out of range")
        entry = meta.l1[l1_index]
        offset = entry & fmt.L1E_OFFSET_MASK
        if offset and entry & fmt.OFLAG_COPIED:
            return offset, await meta.load_l2(offset)
        template = await meta.load_l2(offset) if offset else None
        return await meta.new_l2(l1_index, template)

    def _host_of(self, entry: fmt.L2Entry, cluster_index: int) -> int:
        host = entry.offset
        if host & (self.cs - 1):
            raise Corruption(
                f"Cluster allocation offset {host:#x} unaligned (guest offset: "
                f"{cluster_index << self.cb:#x})",
                host,
                self.cs,
            )
        return host

    def _free_old(self, entry: fmt.L2Entry, kind: str) -> None:
        """Queue the release of the host clusters an entry referenced."""
        if self.mapper.has_data_file:
            return
        if entry.compressed:
            first, count = self.mapper.compressed_host_clusters(entry.raw)
            self.meta.queue_free(first, count, kind)
        elif entry.offset:
            self.meta.queue_free(entry.offset, 1, kind)

    async def _write_host(self, host: int, data: bytes | bytearray | memoryview) -> None:
        if not self.mapper.has_data_file:
            self.meta.check_overlap(host, len(data))
        await io.pwrite(self.mapper.data, host, data)

    def _event(self, event: str) -> None:
        debug_event(self.meta.file, event)

    async def _new_host(self, cluster_index: int) -> int:
        if self.mapper.has_data_file:
            return cluster_index << self.cb
        return await self.meta.alloc_clusters(1)

    # --- allocations written outside the lock ---------------------------------------------

    async def _place(self, alloc: PendingAlloc) -> None:
        """New clusters of at least DEFER_MIN_BYTES of data are registered at once (others
        touching their guest clusters wait) and written by the driver after it released the
        metadata lock, then linked (`link`, or `give_up`). Smaller ones are written and
        linked right here: a 4 KiB write is cheaper than a second trip through the lock."""
        if sum(len(chunk) for _, chunk in alloc.writes) >= DEFER_MIN_BYTES:
            self.tracker.add(alloc)
            self.deferred.append(alloc)
            return
        try:
            await self.write_data(alloc)
        except BaseException:
            self.meta.queue_free(alloc.host, alloc.count, FREE_OTHER)  # never referenced
            raise
        await self.link(alloc)

    def take_deferred(self) -> list[PendingAlloc]:
        deferred, self.deferred = self.deferred, []
        return deferred

    async def finish(
        self, lock: asyncio.Lock, deferred: list[PendingAlloc], check: Callable[[], None]
    ) -> None:
        """The driver, after releasing the metadata `lock`: the deferred allocations' data
        (in parallel with other requests, as qsd's), then their L2 entries under `lock`
        (`check` first: the node may have been fenced meanwhile). On failure or cancellation
        the clusters are given back, never referenced."""
        linked = False
        try:
            for alloc in deferred:
                await self.write_data(alloc)
            async with lock:
                check()
                for alloc in deferred:
                    await self.link(alloc)
            linked = True
        finally:
            if not linked:
                for alloc in deferred:
                    self.give_up(alloc)

    async def write_data(self, alloc: PendingAlloc) -> None:
        """Without the lock: the new clusters' data (refcounts are counted, nothing points
        at them yet, so a crash now only leaks them)."""
        data = self.mapper.data
        for at, chunk in alloc.writes:
            await io.pwrite(data, at, chunk)

    async def link(self, alloc: PendingAlloc) -> None:
        """Under the lock, after `write_data`: point the L2 entries at the new clusters (the
        table is looked up again: it may have left the cache meanwhile)."""
        cb = self.cb
        l2_offset, table = await self._l2_for_write(alloc.first)
        idx = alloc.first % self.l2_entries
        for i in range(alloc.count):
            if alloc.replace:
                self._free_old(fmt.l2_get(table, idx + i, False), FREE_OTHER)
            fmt.l2_set(table, idx + i, False, (alloc.host + (i << cb)) | fmt.OFLAG_COPIED)
        self.meta.l2_dirty(l2_offset, table)
        if self.tracker.pending:
            self.tracker.done(alloc)

    def give_up(self, alloc: PendingAlloc) -> None:
        """The data write failed or was cancelled: the clusters were never referenced."""
        if alloc in self.tracker.pending:
            self.meta.queue_free(alloc.host, alloc.count, FREE_OTHER)
        self.tracker.done(alloc)

    async def _zero_fill(self, host: int, span: int) -> None:
        """qsd zero-fills new clusters around a partial write with one fast zero write on
        the file (blkdebug hears pwritev_zero, its rules may fail it). The clusters read as
        zeroes already, so this is done only when a blkdebug node listens."""
        edge = self.mapper.data
        if getattr(edge.node.driver, "debug_event", None) is None:
            return
        try:
            await io.pwrite_zeroes(edge, host, span, fast_only=True)
        except OSError as err:
            if err.errno not in (errno.ENOTSUP, errno.EAGAIN):
                raise  # qsd goes on with an ordinary copy-on-write for these two only

    # --- writes -------------------------------------------------------------------------

    async def write_in_place(self, offset: int, data: bytes | memoryview) -> bool:
        """Without the metadata lock: write `data` where it lies when its clusters (within one
        L2 table) are allocated, writable in place (COPIED, in an L2 table with COPIED) and
        contiguous in the file, so no metadata changes; False (nothing done) otherwise. No
        await comes between the lookup and counting the write in `Metadata.inflight`, so the
        mapping is current when the write starts, and its clusters cannot be freed (and
        reused) before it ends."""
        if not self._may_write_in_place(offset, len(data)):
            return False
        _, table = await self.mapper.l2_for(offset >> self.cb)
        target = self._in_place(offset, len(data), table)
        if target is None:
            return False
        host, clusters = target
        self._count(clusters)
        try:
            self._event("write_aio")
            await io.pwrite(self.mapper.data, host, data)
        finally:
            self._uncount(clusters)
        return True

    def write_in_place_now(
        self, offset: int, data: bytes | memoryview, done: io.WriteDone | None
    ) -> bool:
        """`write_in_place` without waiting, when the L2 table is cached: done at once
        (`io.pwrite_now`: tmpfs) without `done`, or started (`io.pwrite_start`: the file's
        writer thread) with it, `done(error)` following once it ended. False: nothing was
        done (await `write_in_place`), as also with a blkdebug node listening for events.
        Corruption is left to the awaited path, which finds it again and reports it."""
        if not self._may_write_in_place(offset, len(data)):
            return False
        edge = self.mapper.data
        if getattr(edge.node.driver, "debug_event", None) is not None:
            return False  # it hears write_aio first, and takes no write without waiting
        meta = self.meta
        l1_entry = meta.l1[(offset >> self.cb) // self.l2_entries]
        table = meta.l2_cache.get(l1_entry & fmt.L1E_OFFSET_MASK)
        try:
            target = self._in_place(offset, len(data), table)
        except Corruption:
            return False
        if target is None:
            return False
        host, clusters = target
        self._count(clusters)
        if done is None:
            try:
                return io.pwrite_now(edge, host, data)
            finally:
                self._uncount(clusters)

        def written(error: BaseException | None) -> None:
            self._uncount(clusters)
            done(error)

        try:
            started = io.pwrite_start(edge, host, data, written)
        except BaseException:
            self._uncount(clusters)
            raise
        if not started:
            self._uncount(clusters)
        return started

    def _may_write_in_place(self, offset: int, length: int) -> bool:
        """What `write_in_place` checks before looking at the L2 table: one table, with
        COPIED in its L1 entry; no extended L2 entries, no copy-up."""
        if self.ext or not length or copy_up_active():
            return False  # a copy-up looks at the mapping under the lock
        first = offset >> self.cb
        l1_index = first // self.l2_entries
        if l1_index != ((offset + length - 1) >> self.cb) // self.l2_entries:
            return False
        l1 = self.meta.l1
        return l1_index < len(l1) and bool(l1[l1_index] & fmt.OFLAG_COPIED)

    def _in_place(
        self, offset: int, length: int, table: bytearray | None
    ) -> tuple[int, range] | None:
        """Where a write of `[offset, offset+length)` that `_may_write_in_place` lies in the
        file (host offset, host clusters), or None unless every cluster is NORMAL, COPIED
        and follows the previous one. Raises Corruption if it overlaps metadata."""
        if table is None:
            return None
        cb = self.cb
        first = offset >> cb
        last = (offset + length - 1) >> cb
        l2_entries = self.l2_entries
        has_df = self.mapper.has_data_file
        start = 0
        for index in range(first, last + 1):
            entry = fmt.l2_get(table, index % l2_entries, False)
            kind = fmt.cluster_type(entry, False, has_df)
            if kind != ClusterType.NORMAL or not (entry.copied or has_df):
                return None
            host = self._host_of(entry, index)
            if index == first:
                start = host
            elif host != start + ((index - first) << cb):
                return None
        if not has_df:
            self.meta.check_overlap(start, (last - first + 1) << cb)
        return start + (offset & (self.cs - 1)), range(
            start >> cb, (start >> cb) + last - first + 1
        )

    def _count(self, clusters: range) -> None:
        """The write into `clusters` is in flight: their refcounts stay up until `_uncount`."""
        inflight = self.meta.inflight
        for cluster in clusters:
            inflight[cluster] = inflight.get(cluster, 0) + 1

    def _uncount(self, clusters: range) -> None:
        meta = self.meta
        inflight = meta.inflight
        for cluster in clusters:
            left = inflight[cluster] - 1
            if left:
                inflight[cluster] = left
            else:
                del inflight[cluster]
        if not inflight and meta.inflight_waiters:
            meta.inflight_done()

    async def _unallocated(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The parts of a range whose reads come from the backing file (a copy-up may write
        there; what a guest wrote since the copy read it must stay)."""
        runs: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            ext = await self.mapper.extent(pos, end - pos)
            step = max(1, ext.length)
            if ext.kind in (ClusterType.UNALLOCATED, ClusterType.UNALLOCATED_ALLOC):
                if runs and runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], pos + step)
                else:
                    runs.append((pos, pos + step))
            pos += step
        return runs

    async def write(self, offset: int, data: memoryview) -> None:
        if copy_up_active():
            for start, stop in await self._unallocated(offset, len(data)):
                await self._write(start, data[start - offset : stop - offset])
            return
        await self._write(offset, data)

    async def _write(self, offset: int, data: memoryview) -> None:
        pos = offset
        end = offset + len(data)
        count = 0
        while pos < end:
            n = await self._write_fresh_run(pos, data[pos - offset :])
            if not n:
                n = await self._write_whole_run(pos, data[pos - offset :])
            if not n:
                n = min(end - pos, self.cs - (pos & (self.cs - 1)))
                await self._write_cluster(pos, data[pos - offset : pos - offset + n])
            pos += n
            count += 1
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    async def _write_fresh_run(self, pos: int, data: memoryview) -> int:
        """First allocation, the fast way: when the clusters from `pos` on read as zeroes
        (unallocated without a backing file, or zero clusters) and new clusters come from
        past everything the file ever held (so they read as zeroes already), allocate them
        as one contiguous run and write only the guest data there with one request, plus
        zeroes at the run's end so the file covers it; no zero-padded cluster buffers (on
        tmpfs filling 64 KiB of fresh pages costs ~50 us, a 4 KiB write ~5 us). The bytes
        written (within one L2 table), or 0 when this does not apply (nothing done then)."""
        meta = self.meta
        mapper = self.mapper
        if (
            self.ext
            or mapper.has_data_file
            or mapper.backing is not None
            or meta.free_hint < meta.end_cluster  # a freed cluster inside the file is next
        ):
            return 0
        cb = self.cb
        first = pos >> cb
        _, table = await self._l2_for_write(first)
        if meta.free_hint < meta.end_cluster:
            return 0  # making the L2 table changed that
        idx = first % self.l2_entries
        count = min(((pos + len(data) - 1) >> cb) - first + 1, self.l2_entries - idx)
        run = 0
        while run < count:
            kind = fmt.cluster_type(fmt.l2_get(table, idx + run, False), False, False)
            if kind != ClusterType.UNALLOCATED and kind != ClusterType.ZERO_PLAIN:
                break
            run += 1
        if not run:
            return 0
        fresh_from = meta.end_cluster
        host = await meta.alloc_clusters(run)
        assert host >> cb >= fresh_from  # allocation starts at the free hint
        in_off = pos & (self.cs - 1)
        span = run << cb
        n = min(len(data), span - in_off)
        tail = max(in_off + n, span - 512)
        writes: list[tuple[int, bytes | bytearray | memoryview]] = []
        try:
            if in_off or in_off + n < span:
                # qsd zeroes the run before a partial write (zero copy-on-write areas); here
                # the space reads as zeroes already, and the file must only reach its end.
                self._event("cluster_alloc_space")
                await self._zero_fill(host, span)
                if tail < span and self.mapper.data.node.driver.getlength() < host + span:
                    writes.append((host + tail, _ZEROES[: span - tail]))
            self._event("write_aio")
            writes.append((host + in_off, data[:n]))
            for at, chunk in writes:
                meta.check_overlap(at, len(chunk))
        except BaseException:
            meta.queue_free(host, run, FREE_OTHER)  # never referenced: give it back
            raise
        await self._place(PendingAlloc(first, run, host, writes, False))
        return n

    async def _write_whole_run(self, pos: int, data: memoryview) -> int:
        """Whole clusters that need new host clusters (unallocated, zero, shared or
        compressed: nothing of their old content survives a full overwrite), the way qsd
        allocates them: one contiguous run, one data write straight from the caller's buffer
        (no cluster-sized copy), then the L2 entries. The bytes written (whole clusters
        within one L2 table), or 0 when `pos` is not at a cluster start, less than a cluster
        is left, or the first cluster is written in place (nothing done then)."""
        cb = self.cb
        if self.ext or self.mapper.has_data_file or pos & (self.cs - 1) or len(data) < self.cs:
            return 0
        first = pos >> cb
        _, table = await self._l2_for_write(first)
        idx = first % self.l2_entries
        count = min(len(data) >> cb, self.l2_entries - idx)
        entries: list[fmt.L2Entry] = []
        while len(entries) < count:
            entry = fmt.l2_get(table, idx + len(entries), False)
            kind = fmt.cluster_type(entry, False, False)
            if kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and entry.copied:
                break  # written in place by the per-cluster path, as before
            entries.append(entry)
        run = len(entries)
        if not run:
            return 0
        host = await self.meta.alloc_clusters(run)
        span = run << cb
        try:
            self.meta.check_overlap(host, span)
        except BaseException:
            self.meta.queue_free(host, run, FREE_OTHER)  # never referenced: give it back
            raise
        self._event("write_aio")
        await self._place(PendingAlloc(first, run, host, [(host, data[:span])], True))
        return span

    async def _guest_fill(self, buf: bytearray, base: int, start: int, stop: int) -> None:
        """Copy the current guest content of [start, stop) into buf (which holds base...)."""
        if stop > start:
            buf[start - base : stop - base] = await self.mapper.read(start, stop - start)

    async def _write_cluster(self, pos: int, data: memoryview) -> None:
        cs = self.cs
        cluster_index = pos >> self.cb
        cstart = cluster_index << self.cb
        in_off = pos - cstart
        n = len(data)
        l2_offset, table = await self._l2_for_write(cluster_index)
        idx = cluster_index % self.l2_entries
        entry = fmt.l2_get(table, idx, self.ext)
        if self.ext:
            await self._write_extended(pos, data, cstart, l2_offset, table, idx, entry)
            return
        kind = fmt.cluster_type(entry, False, self.mapper.has_data_file)
        in_place = kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and (
            entry.copied or self.mapper.has_data_file
        )
        if in_place and kind == ClusterType.NORMAL:
            host = self._host_of(entry, cluster_index)
            self._event("write_aio")
            await self._write_host(host + in_off, data)
            return
        # The whole cluster is (re)written: head and tail keep what reads return now.
        if in_place:
            host = self._host_of(entry, cluster_index)
        else:
            host = await self._new_host(cluster_index)
        try:
            buf = bytearray(cs)
            partial = in_off > 0 or n < cs
            if not partial:
                self._event("write_aio")
            elif kind in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC) or (
                kind == ClusterType.UNALLOCATED and self.mapper.backing is None
            ):
                self._event("cluster_alloc_space")  # qsd: zero-fill, then the data write
                await self._zero_fill(host, cs)
                self._event("write_aio")
            else:
                await self._cow_read(buf, cstart, pos, n, kind)
                self._event("write_aio")
                self._event("cow_write")
            buf[in_off : in_off + n] = data
            await self._write_host(host, buf)
        except BaseException:
            if not in_place and not self.mapper.has_data_file:
                self.meta.queue_free(host, 1, FREE_OTHER)  # never referenced: give it back
            raise
        fmt.l2_set(table, idx, False, host | fmt.OFLAG_COPIED)
        self.meta.l2_dirty(l2_offset, table)
        if not in_place and kind in (
            ClusterType.NORMAL,
            ClusterType.ZERO_ALLOC,
            ClusterType.COMPRESSED,
        ):
            self._free_old(entry, FREE_OTHER)

    async def _cow_read(
        self, buf: bytearray, cstart: int, pos: int, n: int, kind: ClusterType
    ) -> None:
        """Head and tail of a copied cluster, as qsd reads them: one read over both when
        they are close, else one each (events only for zero kinds, which read nothing)."""
        head = pos - cstart
        tail = cstart + self.cs - (pos + n)
        zero = kind in (ClusterType.ZERO_ALLOC, ClusterType.ZERO_PLAIN)
        if head and tail and n <= 16384:
            self._event("cow_read")
            if not zero:  # the middle is read too (and overwritten): one request
                await self._guest_fill(buf, cstart, cstart, cstart + self.cs)
            return
        if head:
            self._event("cow_read")
            if not zero:
                await self._guest_fill(buf, cstart, cstart, pos)
        if tail:
            self._event("cow_read")
            if not zero:
                await self._guest_fill(buf, cstart, pos + n, cstart + self.cs)

    async def _write_extended(
        self,
        pos: int,
        data: memoryview,
        cstart: int,
        l2_offset: int,
        table: bytearray,
        idx: int,
        entry: fmt.L2Entry,
    ) -> None:
        sc = self.sc
        cluster_index = cstart >> self.cb
        in_off = pos - cstart
        n = len(data)
        first_sc = in_off // sc
        last_sc = (in_off + n - 1) // sc
        touched = ((1 << (last_sc + 1)) - 1) & ~((1 << first_sc) - 1)
        has_df = self.mapper.has_data_file
        host_kind = fmt.cluster_type(entry, True, has_df)
        for sc_index in (first_sc, last_sc):
            self.mapper.unit(entry, sc_index)  # validates the bitmap
        alloc_bits = entry.bitmap & fmt.ALL_SUBCLUSTERS
        zero_bits = entry.bitmap >> 32
        if host_kind == ClusterType.NORMAL and (entry.copied or has_df):
            host = self._host_of(entry, cluster_index)
            span_start = in_off
            span_end = in_off + n
            if in_off % sc and not alloc_bits >> first_sc & 1:
                span_start = first_sc * sc
            if (in_off + n) % sc and not alloc_bits >> last_sc & 1:
                span_end = (last_sc + 1) * sc
            if (span_start, span_end) == (in_off, in_off + n):
                self._event("write_aio")
                await self._write_host(host + in_off, data)
            else:
                buf = bytearray(span_end - span_start)
                await self._guest_fill(buf, cstart + span_start, cstart + span_start, pos)
                await self._guest_fill(buf, cstart + span_start, pos + n, cstart + span_end)
                buf[in_off - span_start : in_off - span_start + n] = data
                self._event("write_aio")
                await self._write_host(host + span_start, buf)
            new_bitmap = (alloc_bits | touched) | ((zero_bits & ~touched) << 32)
            if new_bitmap != entry.bitmap:
                fmt.l2_set(table, idx, True, entry.raw, new_bitmap)
                self.meta.l2_dirty(l2_offset, table)
            return
        host = await self._new_host(cluster_index)
        if host_kind in (ClusterType.NORMAL, ClusterType.COMPRESSED):
            # Replacing a shared or compressed cluster: copy all of it.
            buf = bytearray(self.cs)
            await self._guest_fill(buf, cstart, cstart, pos)
            await self._guest_fill(buf, cstart, pos + n, cstart + self.cs)
            buf[in_off : in_off + n] = data
            self._event("write_aio")
            await self._write_host(host, buf)
            if host_kind == ClusterType.COMPRESSED:
                new_alloc, new_zero = fmt.ALL_SUBCLUSTERS, 0
            else:
                new_alloc, new_zero = alloc_bits | touched, zero_bits & ~touched
            self._free_old(entry, FREE_OTHER)
        else:
            span_start = first_sc * sc
            span_end = (last_sc + 1) * sc
            buf = bytearray(span_end - span_start)
            await self._guest_fill(buf, cstart + span_start, cstart + span_start, pos)
            await self._guest_fill(buf, cstart + span_start, pos + n, cstart + span_end)
            buf[in_off - span_start : in_off - span_start + n] = data
            self._event("write_aio")
            await self._write_host(host + span_start, buf)
            new_alloc, new_zero = touched, zero_bits & ~touched
        fmt.l2_set(table, idx, True, host | fmt.OFLAG_COPIED, new_alloc | (new_zero << 32))
        self.meta.l2_dirty(l2_offset, table)

    # --- zeroes and discard -------------------------------------------------------------

    async def zero(self, offset: int, length: int, unmap: bool) -> None:
        if copy_up_active():
            for start, stop in await self._unallocated(offset, length):
                await self._zero(start, stop - start, unmap)
            return
        await self._zero(offset, length, unmap)

    async def _zero(self, offset: int, length: int, unmap: bool) -> None:
        size = self.mapper.size
        unit = self.sc
        pos = offset
        end = offset + length
        count = 0
        while pos < end:
            count += 1
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            cluster_end = ((pos >> self.cb) + 1) << self.cb
            stop = min(end, cluster_end)
            unit_start = -(-pos // unit) * unit
            unit_stop = (stop // unit) * unit
            if stop == size and stop % unit:
                unit_stop = -(-stop // unit) * unit  # the image's last partial unit
            if unit_start >= unit_stop:
                await self._zero_partial(pos, stop)
            else:
                if pos < unit_start:
                    await self._zero_partial(pos, unit_start)
                await self._zero_units(unit_start, min(unit_stop, cluster_end), unmap)
                tail = min(unit_stop, stop)
                if tail < stop:
                    await self._zero_partial(tail, stop)
            pos = stop

    async def _zero_partial(self, start: int, stop: int) -> None:
        """Zero part of a unit. As qsd (v3): a unit that holds no data and reads as zeroes
        (unallocated without backing, or zero) gets the zero flag whole; otherwise zeroes are
        written, unless the range reads as zeroes already (a fast-only zero write: ENOTSUP)."""
        unit = self.sc
        ustart = start - start % unit
        if self.v3 and await self._reads_zero(ustart, min(ustart + unit, self.mapper.size)):
            await self._zero_units(ustart, ustart + unit, False)
            return
        if not io.zero_fallback_allowed():  # FAST_ZERO: writing zeroes is the slow path
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        if not await self._reads_zero(start, stop):
            await self._write(start, memoryview(bytes(stop - start)))

    async def _reads_zero(self, start: int, stop: int) -> bool:
        """[start, stop) holds no data in this image and reads as zeroes (nothing below)."""
        pos = start
        while pos < stop:
            ext = await self.mapper.extent(pos, stop - pos)
            kind = ext.kind
            if not (
                kind in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC)
                or (kind == ClusterType.UNALLOCATED and self.mapper.backing is None)
            ):
                return False
            pos += ext.length
        return True

    async def _zero_units(self, start: int, stop: int, unmap: bool) -> None:
        """Make whole units (clusters or subclusters) of one cluster read as zeroes."""
        cluster_index = start >> self.cb
        cstart = cluster_index << self.cb
        whole = start == cstart and stop - cstart >= self.cs
        no_backing = self.mapper.backing is None
        if not self.ext and not self.v3:
            # v2 has no zero flag: skip clusters that read as zeroes without an L2 table.
            l2_offset, table0 = await self.mapper.l2_for(cluster_index)
            if table0 is None and no_backing:
                return
        l2_offset, table = await self._l2_for_write(cluster_index)
        idx = cluster_index % self.l2_entries
        entry = fmt.l2_get(table, idx, self.ext)
        has_df = self.mapper.has_data_file
        if not self.ext:
            kind = fmt.cluster_type(entry, False, has_df)
            if kind == ClusterType.ZERO_PLAIN or (kind == ClusterType.ZERO_ALLOC and not unmap):
                return
            if not self.v3:
                if kind == ClusterType.UNALLOCATED and no_backing:
                    return
                # v2 has no zero flag; without a backing file an unallocated cluster reads
                # as zeroes (the driver refuses zero writes of v2 images with a backing file).
                self._free_old(entry, FREE_REQUEST if unmap else FREE_OTHER)
                fmt.l2_set(table, idx, False, 0)
                self.meta.l2_dirty(l2_offset, table)
                return
            keep = (
                kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC)
                and (entry.copied or has_df)
                and not unmap
            )
            if keep:
                new = entry.offset | fmt.OFLAG_COPIED | fmt.OFLAG_ZERO
            else:
                new = fmt.OFLAG_ZERO
                if has_df and kind != ClusterType.UNALLOCATED:
                    new = fmt.OFLAG_ZERO
                self._free_old(entry, FREE_REQUEST if unmap else FREE_OTHER)
            fmt.l2_set(table, idx, False, new)
            self.meta.l2_dirty(l2_offset, table)
            return
        first_sc = (start - cstart) // self.sc
        last_sc = min((stop - cstart + self.sc - 1) // self.sc, fmt.SUBCLUSTERS) - 1
        mask = ((1 << (last_sc + 1)) - 1) & ~((1 << first_sc) - 1)
        for sc_index in (first_sc, last_sc):
            self.mapper.unit(entry, sc_index)
        host_kind = fmt.cluster_type(entry, True, has_df)
        alloc_bits = entry.bitmap & fmt.ALL_SUBCLUSTERS
        zero_bits = entry.bitmap >> 32
        if host_kind == ClusterType.COMPRESSED or (
            host_kind == ClusterType.NORMAL and not entry.copied and not has_df
        ):
            if not whole:
                # Partial zeroing of a shared cluster: copy it first through a write.
                await self._write(start, memoryview(bytes(stop - start)))
                return
            self._free_old(entry, FREE_OTHER)
            fmt.l2_set(table, idx, True, 0, fmt.ALL_SUBCLUSTERS << 32)
        elif whole and unmap and host_kind == ClusterType.NORMAL and not has_df:
            self._free_old(entry, FREE_REQUEST)
            fmt.l2_set(table, idx, True, 0, fmt.ALL_SUBCLUSTERS << 32)
        else:
            new_bitmap = (alloc_bits & ~mask) | ((zero_bits | mask) << 32)
            fmt.l2_set(table, idx, True, entry.raw, new_bitmap)
        self.meta.l2_dirty(l2_offset, table)

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate whole clusters; they read as zeroes afterwards (v3 with a backing file:
        zero clusters, so the backing file does not show through)."""
        pos = -(-offset // self.cs) * self.cs
        end = offset + length
        size = self.mapper.size
        if end == size:
            end = -(-end // self.cs) * self.cs
        end = (end // self.cs) * self.cs
        has_backing = self.mapper.backing is not None
        if has_backing and not self.v3 and not self.ext:
            return  # v2 has no zero clusters: deallocating would expose the backing file
        count = 0
        while pos < end:
            count += 1
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            cluster_index = pos >> self.cb
            pos += self.cs
            _, existing = await self.mapper.l2_for(cluster_index)
            if existing is None and not has_backing:
                continue
            l2_offset, table = await self._l2_for_write(cluster_index)
            idx = cluster_index % self.l2_entries
            entry = fmt.l2_get(table, idx, self.ext)
            if self.ext:
                new_raw, new_bitmap = 0, (fmt.ALL_SUBCLUSTERS << 32) if has_backing else 0
            else:
                new_raw, new_bitmap = (fmt.OFLAG_ZERO if has_backing and self.v3 else 0), 0
            if (entry.raw, entry.bitmap) == (new_raw, new_bitmap):
                continue
            if not self.mapper.has_data_file:
                self._free_old(entry, FREE_REQUEST)
            fmt.l2_set(table, idx, self.ext, new_raw, new_bitmap)
            self.meta.l2_dirty(l2_offset, table)
