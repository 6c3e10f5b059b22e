"""qcow2 metadata state: tables, caches, refcounts, cluster allocation and ordered write-back.

Domain ring: all file I/O goes through `io.*` on the `file` edge. Invariant kept on disk at
every instant (so a crash leaks clusters but never corrupts): refcount >= references, and no
table entry points at data or tables that are not yet stable. Hence: refblocks are written
and synced before any L2 table that relies on them; new L2 tables, refblocks and grown tables
are written and synced before the pointer to them; refcount decreases are applied only after
the table change that dropped the reference is stable (`queue_free` + `writeback`). Until
then the allocator never hands out a cluster with a free queued, even at refcount 0 (a
corrupt refblock): the late free would take the reference of its new user.
A refcount leaving its range is not corruption to qsd: an increase fails its operation with
EINVAL, a free that would go below zero is logged and skipped (`writeback`).
blkdebug events (`debug_event` on the file edge) are raised where qsd 7.2 raises them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.drivers.blkdebug import debug_event
from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.cache import TableCache

# Names QEMU uses for metadata structures in overlap messages; bit order is QEMU's.
OL_MAIN_HEADER = "qcow2_header"
OL_ACTIVE_L1 = "active L1 table"
OL_ACTIVE_L2 = "active L2 table"
OL_REFCOUNT_TABLE = "refcount table"
OL_REFCOUNT_BLOCK = "refcount block"
OL_SNAPSHOT_TABLE = "snapshot table"
OL_INACTIVE_L1 = "inactive L1 table"
OL_INACTIVE_L2 = "inactive L2 table"
OL_BITMAP_DIRECTORY = "bitmap directory"
OL_ORDER = [
    OL_MAIN_HEADER,
    OL_ACTIVE_L1,
    OL_ACTIVE_L2,
    OL_REFCOUNT_TABLE,
    OL_REFCOUNT_BLOCK,
    OL_SNAPSHOT_TABLE,
    OL_INACTIVE_L1,
    OL_INACTIVE_L2,
    OL_BITMAP_DIRECTORY,
]
OL_OPTION_NAMES = {
    "main-header": OL_MAIN_HEADER,
    "active-l1": OL_ACTIVE_L1,
    "active-l2": OL_ACTIVE_L2,
    "refcount-table": OL_REFCOUNT_TABLE,
    "refcount-block": OL_REFCOUNT_BLOCK,
    "snapshot-table": OL_SNAPSHOT_TABLE,
    "inactive-l1": OL_INACTIVE_L1,
    "inactive-l2": OL_INACTIVE_L2,
    "bitmap-directory": OL_BITMAP_DIRECTORY,
}
OL_TEMPLATES = {
    "none": frozenset[str](),
    "constant": frozenset(
        {OL_MAIN_HEADER, OL_ACTIVE_L1, OL_REFCOUNT_TABLE, OL_SNAPSHOT_TABLE, OL_BITMAP_DIRECTORY}
    ),
    "cached": frozenset(set(OL_ORDER) - {OL_INACTIVE_L2}),
    "all": frozenset(OL_ORDER),
}

FREE_REQUEST = "request"
FREE_SNAPSHOT = "snapshot"
FREE_OTHER = "other"
FREE_ALWAYS = "always"  # discarded whatever pass-discard-* say (bitmap tables and data)


class Corruption(Exception):
    """Metadata found inconsistent; the driver marks the image corrupt and fences the node."""

    def __init__(self, msg: str, offset: int = -1, size: int = -1, fatal: bool = True) -> None:
        super().__init__(msg)
        self.msg = msg
        self.offset = offset
        self.size = size
        self.fatal = fatal


@dataclass
class PendingFree:
    host_cluster: int
    count: int
    kind: str


def _out_of_range() -> OSError:
    """qsd's answer to a refcount leaving its range: EINVAL for the operation, no corrupt
    mark (with refcount_bits=1 a valid image reaches it on its first internal snapshot)."""
    return OSError(errno.EINVAL, os.strerror(errno.EINVAL))


class Metadata:
    """The live metadata of one open image."""

    def __init__(
        self,
        file: BdrvChild,
        hdr: fmt.Header,
        l1: list[int],
        reftable: list[int],
        l2_capacity: int,
        rb_capacity: int,
        overlap_checks: frozenset[str],
    ) -> None:
        self.file = file
        self.hdr = hdr
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = hdr.cluster_size
        self.l1 = l1
        self.reftable = reftable
        self.l2_cache = TableCache(l2_capacity)
        self.rb_cache = TableCache(rb_capacity)
        self.overlap_checks = overlap_checks
        self.rb_entries = fmt.refblock_entries(hdr.cluster_bits, hdr.refcount_order)
        self.order = hdr.refcount_order
        self.rc_max = fmt.refcount_max(hdr.refcount_order)
        self.pending_frees: list[PendingFree] = []
        # cluster -> frees queued on it: `_find_free` skips these whatever their refcount.
        self.pending_clusters: dict[int, int] = {}
        # host cluster -> guest writes in flight outside the lock (Writer.write_in_place):
        # their refcounts must not fall (the cluster could be reused) until they are done.
        self.inflight: dict[int, int] = {}
        self.inflight_waiters: list[asyncio.Future[None]] = []  # for `wait_no_inflight`
        self.free_hint = 0
        # Compressed writes pack byte-granular: the next free byte in the partly used host
        # cluster they last wrote to (0: none). Reset when that cluster's refcount falls to
        # 0, so a freed and reused cluster is never appended to.
        self.free_byte_offset = 0
        self.discard_kinds: set[str] = {FREE_SNAPSHOT}
        # cluster index -> structure name, for overlap checks.
        self.meta: dict[int, str] = {}
        self.snapshot_l1s: list[tuple[int, int]] = []
        self.bitmap_directory = (0, 0)  # (offset, size) of the persistent bitmaps' directory
        self.inactive_l2: set[int] = set()
        self.end_cluster = 0  # one past the last cluster the image may use
        self.on_dirty: Callable[[], None] | None = None
        # Lazy refcounts: sets the dirty bit (synced) before the first L2 write-back.
        self.before_l2_writeback: Callable[[], Awaitable[None]] | None = None

    # --- overlap map --------------------------------------------------------------------

    def _mark(self, offset: int, size: int, name: str) -> None:
        first = offset >> self.cluster_bits
        last = (offset + max(size, 1) - 1) >> self.cluster_bits
        for cluster in range(first, last + 1):
            self.meta[cluster] = name

    def _unmark(self, offset: int, size: int, name: str) -> None:
        first = offset >> self.cluster_bits
        last = (offset + max(size, 1) - 1) >> self.cluster_bits
        for cluster in range(first, last + 1):
            if self.meta.get(cluster) == name:
                del self.meta[cluster]

    def claim(self, offset: int, size: int, name: str) -> None:
        """Mark freshly allocated clusters as the metadata `name`, after checking that no
        live structure sits there: refcounts that call a header or table cluster free
        (a corrupt image) would otherwise let the new mark hide it from `check_overlap`."""
        self.check_overlap(offset, size)
        self._mark(offset, size, name)

    def build_overlap_map(self) -> None:
        hdr = self.hdr
        self.meta.clear()
        self._mark(0, self.cluster_size, OL_MAIN_HEADER)
        self._mark(hdr.l1_table_offset, hdr.l1_size * 8, OL_ACTIVE_L1)
        for entry in filter(None, self.l1):
            if entry & fmt.L1E_OFFSET_MASK:
                self._mark(entry & fmt.L1E_OFFSET_MASK, self.cluster_size, OL_ACTIVE_L2)
        self._mark(
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters << self.cluster_bits,
            OL_REFCOUNT_TABLE,
        )
        for entry in filter(None, self.reftable):
            if entry & fmt.REFT_OFFSET_MASK:
                self._mark(entry & fmt.REFT_OFFSET_MASK, self.cluster_size, OL_REFCOUNT_BLOCK)
        for l1_offset, l1_size in self.snapshot_l1s:
            self._mark(l1_offset, l1_size * 8, OL_INACTIVE_L1)
        if self.bitmap_directory[1]:
            self._mark(*self.bitmap_directory, OL_BITMAP_DIRECTORY)
        for l2_offset in self.inactive_l2:
            if self.meta.get(l2_offset >> self.cluster_bits) is None:
                self._mark(l2_offset, self.cluster_size, OL_INACTIVE_L2)

    def set_bitmap_directory(self, offset: int, size: int) -> None:
        """The bitmap directory moved (size 0: the image has none any more)."""
        if self.bitmap_directory[1]:
            self._unmark(*self.bitmap_directory, OL_BITMAP_DIRECTORY)
        self.bitmap_directory = (offset, size)
        if size:
            self._mark(offset, size, OL_BITMAP_DIRECTORY)

    def mark_snapshot_table(self, offset: int, size: int) -> None:
        if size:
            self._mark(offset, size, OL_SNAPSHOT_TABLE)

    def check_overlap(self, offset: int, size: int, ignore: str | None = None) -> None:
        """Raise Corruption when [offset, offset+size) touches live metadata."""
        checks = self.overlap_checks
        if not checks or size <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + size - 1) >> self.cluster_bits
        meta = self.meta
        for cluster in range(first, last + 1):
            name = meta.get(cluster)
            if name is not None and name != ignore and name in checks:
                raise Corruption(
                    f"Preventing invalid write on metadata (overlaps with {name})", offset, size
                )

    # --- raw metadata I/O ---------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytearray:
        data = await io.pread(self.file, offset, size)
        return data if isinstance(data, bytearray) else bytearray(data)

    async def write(self, offset: int, data: bytes | bytearray, ignore: str | None) -> None:
        self.check_overlap(offset, len(data), ignore)
        await io.pwrite(self.file, offset, data)

    async def sync(self) -> None:
        await io.flush(self.file)

    async def write_header_field(self, offset: int, data: bytes, sync: bool = True) -> None:
        await io.pwrite(self.file, offset, data)
        if sync:
            await self.sync()

    # --- L2 tables ----------------------------------------------------------------------

    async def load_l2(self, offset: int) -> bytearray:
        """An L2 table through the cache. Only clean tables are evicted here: readers run
        beside writers and must not start a write-back (writers call `trim`)."""
        table = self.l2_cache.get(offset)
        if table is not None:
            return table
        if offset & (self.cluster_size - 1):
            raise Corruption(f"L2 table offset {offset:#x} unaligned", offset, self.cluster_size)
        debug_event(self.file, "l2_load")
        table = await self.read(offset, self.cluster_size)
        cached = self.l2_cache.get(offset)
        if cached is not None:
            return cached  # a concurrent load (or a writer) got there first
        self.l2_cache.put(offset, table)
        self.l2_cache.evict_clean()
        return table

    async def trim(self) -> None:
        """Bring the caches back within capacity, writing dirty tables back if needed."""
        await self._trim_l2()

    async def _trim_l2(self) -> None:
        if not self.l2_cache.over_capacity():
            return
        self.l2_cache.evict_clean()
        if self.l2_cache.over_capacity():
            await self.writeback()
            self.l2_cache.evict_clean()

    def l2_dirty(self, offset: int, table: bytearray) -> None:
        """Mark a modified L2 table dirty (re-inserting it if the cache let it go)."""
        self.l2_cache.put(offset, table, dirty=True)
        if self.on_dirty is not None:
            self.on_dirty()

    async def write_l1_entry(self, index: int, value: int, event: str = "l1_update") -> None:
        """Update one L1 entry on disk (the 512-byte sector holding it), then in memory."""
        self.l1[index] = value
        debug_event(self.file, event)
        sector = index & ~63
        chunk = fmt.pack_u64s(self.l1[sector : min(sector + 64, len(self.l1))])
        await self.write(self.hdr.l1_table_offset + sector * 8, chunk, OL_ACTIVE_L1)

    async def new_l2(self, l1_index: int, template: bytearray | None) -> tuple[int, bytearray]:
        """Allocate an L2 table (zeroed or a copy of `template`), stable before L1 points at it."""
        offset = await self.alloc_clusters(1)
        if offset == 0:  # qsd's own check, whatever the overlap-check option says
            raise Corruption("Preventing invalid allocation of L2 table at offset 0", -1, -1)
        table = bytearray(template) if template is not None else bytearray(self.cluster_size)
        await self.write_refblocks()
        self.claim(offset, self.cluster_size, OL_ACTIVE_L2)
        if template is not None:
            debug_event(self.file, "l2_alloc_cow_read")
        debug_event(self.file, "l2_alloc_write")
        debug_event(self.file, "l2_update")
        await self.write(offset, table, OL_ACTIVE_L2)
        await self.sync()
        old = self.l1[l1_index] & fmt.L1E_OFFSET_MASK
        await self.write_l1_entry(l1_index, offset | fmt.OFLAG_COPIED)
        if old:
            self.l2_cache.drop(old)
            self._unmark(old, self.cluster_size, OL_ACTIVE_L2)
            if old in self.inactive_l2:
                self._mark(old, self.cluster_size, OL_INACTIVE_L2)
            self.queue_free(old, 1, FREE_OTHER)
        self.l2_cache.put(offset, table)
        self.l2_cache.evict_clean()
        return offset, table

    # --- refcounts ----------------------------------------------------------------------

    async def _refblock(self, block_index: int) -> tuple[int, bytearray] | None:
        if block_index >= len(self.reftable):
            return None
        offset = self.reftable[block_index] & fmt.REFT_OFFSET_MASK
        if not offset:
            return None
        block = self.rb_cache.get(offset)
        if block is None:
            if offset & (self.cluster_size - 1):
                raise Corruption(
                    f"Refblock offset {offset:#x} unaligned (reftable index: {block_index:#x})",
                    offset,
                    self.cluster_size,
                )
            block = await self.read(offset, self.cluster_size)
            self.rb_cache.put(offset, block)
            if self.rb_cache.over_capacity():
                self.rb_cache.evict_clean()
                if self.rb_cache.over_capacity():
                    await self.write_refblocks()
                    self.rb_cache.evict_clean()
                    self.rb_cache.put(offset, block)
        return offset, block

    async def get_refcount(self, cluster: int) -> int:
        found = await self._refblock(cluster // self.rb_entries)
        if found is None:
            return 0
        return fmt.refcount_get(found[1], cluster % self.rb_entries, self.order)

    async def update_refcount(self, cluster: int, delta: int, announce: bool = False) -> int:
        """Add `delta` to a cluster's refcount (in the cache); the new value. `announce`:
        raise the events qsd raises on reaching a refblock (once per refblock and request)."""
        block_index = cluster // self.rb_entries
        if announce:
            debug_event(self.file, "refblock_alloc")
        found = await self._refblock(block_index)
        if found is None:
            if delta < 0:
                raise _out_of_range()
            await self._new_refblock(block_index)
            if announce:  # qsd retries the allocation once the new refblock is hooked up
                debug_event(self.file, "refblock_alloc")
            found = await self._refblock(block_index)
            assert found is not None
        if announce:
            debug_event(self.file, "refblock_load")
        offset, block = found
        slot = cluster % self.rb_entries
        value = fmt.refcount_get(block, slot, self.order) + delta
        if value < 0 or value > self.rc_max:
            raise _out_of_range()
        fmt.refcount_set(block, slot, self.order, value)
        self.rb_cache.mark_dirty(offset)
        if value == 0:
            if cluster < self.free_hint:
                self.free_hint = cluster
            if self.free_byte_offset >> self.cluster_bits == cluster:
                self.free_byte_offset = 0
        if value and cluster >= self.end_cluster:
            self.end_cluster = cluster + 1
        return value

    async def _new_refblock(self, block_index: int) -> None:
        """Create the refblock for `block_index` at the end of the image; it counts itself."""
        if block_index >= len(self.reftable):
            await self._grow_reftable(block_index + 1)
            if self.reftable[block_index] & fmt.REFT_OFFSET_MASK:
                return  # counting the grown table created this very refblock
        where = self.end_cluster
        self.end_cluster += 1
        offset = where << self.cluster_bits
        block = bytearray(self.cluster_size)
        self.rb_cache.put(offset, block, dirty=True)
        # Visible to lookups before the table on disk points at it; written below first.
        self.reftable[block_index] = offset
        self._mark(offset, self.cluster_size, OL_REFCOUNT_BLOCK)
        await self.update_refcount(where, 1)
        debug_event(self.file, "refblock_alloc_write")
        await self.write_refblocks()
        await self.sync()
        debug_event(self.file, "refblock_alloc_hookup")
        await self._write_reftable_entry(block_index)

    async def _write_reftable_entry(self, index: int) -> None:
        sector = index & ~63
        chunk = fmt.pack_u64s(self.reftable[sector : min(sector + 64, len(self.reftable))])
        await self.write(self.hdr.refcount_table_offset + sector * 8, chunk, OL_REFCOUNT_TABLE)

    async def _grow_reftable(self, min_entries: int) -> None:
        """Move the refcount table to the end of the image, larger; switch the header last."""
        debug_event(self.file, "reftable_grow")
        per_cluster = self.cluster_size // 8
        clusters = max(
            (min_entries * 3 // 2 + per_cluster - 1) // per_cluster,
            self.hdr.refcount_table_clusters + 1,
        )
        if clusters > fmt.MAX_REFTABLE_SIZE // self.cluster_size:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        old_offset = self.hdr.refcount_table_offset
        old_clusters = self.hdr.refcount_table_clusters
        where = self.end_cluster
        self.end_cluster += clusters
        new_offset = where << self.cluster_bits
        self.reftable.extend([0] * (clusters * per_cluster - len(self.reftable)))
        # Count the new table's clusters; this may create refblocks (past the new table),
        # whose entries land in the in-memory table written below.
        self.hdr.refcount_table_offset = new_offset
        self.hdr.refcount_table_clusters = clusters
        try:
            for cluster in range(where, where + clusters):
                await self.update_refcount(cluster, 1)
            debug_event(self.file, "refblock_alloc_write_blocks")
            await self.write_refblocks()
            self._mark(new_offset, clusters << self.cluster_bits, OL_REFCOUNT_TABLE)
            debug_event(self.file, "refblock_alloc_write_table")
            await self.write(new_offset, fmt.pack_u64s(self.reftable), OL_REFCOUNT_TABLE)
            await self.sync()
        except BaseException:
            self.hdr.refcount_table_offset = old_offset
            self.hdr.refcount_table_clusters = old_clusters
            raise
        # One 12-byte header write switches offset and size together.
        debug_event(self.file, "refblock_alloc_switch_table")
        await self.write_header_field(
            48, new_offset.to_bytes(8, "big") + clusters.to_bytes(4, "big")
        )
        self._unmark(old_offset, old_clusters << self.cluster_bits, OL_REFCOUNT_TABLE)
        self.queue_free(old_offset, old_clusters, FREE_OTHER)

    async def alloc_clusters(self, count: int) -> int:
        """A run of `count` free clusters, counted (refcount 1 in the cache); its offset."""
        debug_event(self.file, "cluster_alloc")
        start = await self._find_free(count)
        if start + count > self.end_cluster:
            self.end_cluster = start + count
        entries = self.rb_entries
        for cluster in range(start, start + count):
            announce = cluster == start or cluster % entries == 0
            await self.update_refcount(cluster, 1, announce)
        if count == 1 or start == self.free_hint:
            self.free_hint = start + count
        return start << self.cluster_bits

    async def alloc_bytes(self, size: int) -> int:
        """`size` bytes (at most a cluster) for a compressed cluster, packed after the last
        ones; they may spill into the next host cluster when that one is free. Each host
        cluster the bytes touch gains one reference (in the cache). Their byte offset."""
        cs = self.cluster_size
        assert 0 < size <= cs
        debug_event(self.file, "cluster_alloc_bytes")
        offset = self.free_byte_offset
        if offset and await self.get_refcount(offset >> self.cluster_bits) in (0, self.rc_max):
            offset = 0
        free_in_cluster = cs - (offset & (cs - 1)) if offset else 0
        if free_in_cluster < size:
            cluster = await self._find_free(1)
            if cluster == 0:
                raise Corruption(
                    "Preventing invalid allocation of compressed cluster at offset 0", 0, cs
                )
            if cluster + 1 > self.end_cluster:
                self.end_cluster = cluster + 1
            if cluster == self.free_hint:
                self.free_hint = cluster + 1
            if not offset or -(-offset // cs) != cluster:
                offset = cluster << self.cluster_bits  # not adjacent: start afresh
        first = offset >> self.cluster_bits
        last = (offset + size - 1) >> self.cluster_bits
        for cluster in range(first, last + 1):
            await self.update_refcount(
                cluster, 1, cluster == first or cluster % self.rb_entries == 0
            )
        end = offset + size
        self.free_byte_offset = end if end & (cs - 1) else 0
        return offset

    async def _find_free(self, count: int) -> int:
        """The first run of `count` clusters with refcount 0 and no free queued, from the
        free hint on. A queued free on a refcount-0 cluster only happens on a corrupt image,
        so the runs are checked after the scan rather than slowing the scan down."""
        start = await self._scan_free(self.free_hint, count)
        pending = self.pending_clusters
        while pending:
            busy = [c for c in range(start, start + count) if c in pending]
            if not busy:
                break
            start = await self._scan_free(busy[-1] + 1, count)
        return start

    async def _scan_free(self, cluster: int, count: int) -> int:
        """The first run of `count` clusters with refcount 0 from `cluster` on."""
        run_start = cluster
        entries = self.rb_entries
        while cluster - run_start < count:
            block_index = cluster // entries
            found = await self._refblock(block_index)
            if found is None:
                if block_index >= len(self.reftable) and cluster >= self.end_cluster:
                    return run_start  # nothing is counted past here
                cluster = (block_index + 1) * entries  # a missing refblock: all free
                continue
            slot = cluster % entries
            if fmt.refcount_get(found[1], slot, self.order) == 0:
                cluster += 1
                continue
            nxt = fmt.first_free(found[1], slot, self.order)
            cluster = block_index * entries + nxt if nxt >= 0 else (block_index + 1) * entries
            run_start = cluster
        return run_start

    def queue_free(self, host_offset: int, count: int, kind: str) -> None:
        """Drop one reference to `count` clusters once the change that unreferenced them is
        stable on disk (applied by `writeback`). The events are qsd's, which frees at once."""
        first = host_offset >> self.cluster_bits
        debug_event(self.file, "cluster_free")
        for _ in range(first // self.rb_entries, (first + count - 1) // self.rb_entries + 1):
            debug_event(self.file, "refblock_alloc")
            debug_event(self.file, "refblock_load")
        self.pending_frees.append(PendingFree(first, count, kind))
        pending = self.pending_clusters
        for cluster in range(first, first + count):
            pending[cluster] = pending.get(cluster, 0) + 1
        if self.on_dirty is not None:
            self.on_dirty()

    # --- write-back ---------------------------------------------------------------------

    async def write_refblocks(self) -> None:
        for count, (offset, block) in enumerate(self.rb_cache.dirty_items()):
            debug_event(self.file, "refblock_update_part")
            await self.write(offset, block, OL_REFCOUNT_BLOCK)
            self.rb_cache.mark_clean(offset)
            if count % 32 == 31:
                await asyncio.sleep(0)  # page-cache writes may complete without suspending

    async def writeback(self, data_edges: tuple[BdrvChild, ...] = ()) -> None:
        """Write all dirty metadata in crash-safe order, then apply queued frees."""
        if self.rb_cache.has_dirty:
            await self.write_refblocks()
        if self.l2_cache.has_dirty:
            if self.before_l2_writeback is not None:
                await self.before_l2_writeback()
            await self.sync()  # data and refcounts stable before the L2 entries naming them
            for edge in data_edges:
                await io.flush(edge)
            for count, (offset, table) in enumerate(self.l2_cache.dirty_items()):
                debug_event(self.file, "l2_update")
                await self.write(offset, table, OL_ACTIVE_L2)
                self.l2_cache.mark_clean(offset)
                if count % 32 == 31:
                    await asyncio.sleep(0)
        if self.pending_frees:
            await self.sync()  # the dropped references are stable before refcounts fall
            frees, self.pending_frees = self.pending_frees, []
            if self.inflight:
                # Clusters still being written in place wait for the next write-back.
                busy = [free for free in frees if self._busy(free)]
                if busy:
                    frees = [free for free in frees if not self._busy(free)]
                    self.pending_frees[:0] = busy
            discards: list[tuple[int, int]] = []
            try:
                for number, free in enumerate(frees):
                    if number % 64 == 63:
                        await asyncio.sleep(0)
                    for cluster in await self._apply_free(free):
                        self._forget(cluster)
                        if free.kind in self.discard_kinds or free.kind == FREE_ALWAYS:
                            discards.append((cluster, 1))
            finally:
                # Applied, skipped, or (after an I/O error) dropped: a leak at worst.
                for free in frees:
                    self._unqueue(free)
            await self.write_refblocks()
            for cluster, count in discards:
                try:
                    await io.pdiscard(
                        self.file, cluster << self.cluster_bits, count << self.cluster_bits
                    )
                except OSError:
                    pass  # discard is advisory

    def _unqueue(self, free: PendingFree) -> None:
        pending = self.pending_clusters
        for cluster in range(free.host_cluster, free.host_cluster + free.count):
            left = pending.pop(cluster, 1) - 1
            if left:
                pending[cluster] = left

    async def _apply_free(self, free: PendingFree) -> list[int]:
        """Drop one reference on each cluster of `free`; those now at refcount 0. All or
        nothing, as qsd's free: when a refcount would fall below zero (a corrupt refblock)
        nothing changes and qsd's line goes to stderr: the image stays usable, the clusters
        keep the refcount they had (check reports the error, no more harm is done)."""
        clusters = range(free.host_cluster, free.host_cluster + free.count)
        for cluster in clusters:
            if await self.get_refcount(cluster) < 1:
                print(f"qcow2_free_clusters failed: {os.strerror(errno.EINVAL)}", file=sys.stderr)
                # The allocator skipped the refcount-0 cluster while the free was queued;
                # it may hand it out again now.
                self.free_hint = min(self.free_hint, free.host_cluster)
                return []
        return [cluster for cluster in clusters if await self.update_refcount(cluster, -1) == 0]

    async def wait_no_inflight(self) -> None:
        """Until no guest write is in flight outside the lock. Once no new one can start
        (an internal snapshot cleared the COPIED flags), a cluster about to be shared must
        not still be changing: a later copy-on-write would miss the rest of that write."""
        while self.inflight:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.inflight_waiters.append(waiter)
            await waiter

    def inflight_done(self) -> None:
        """Writer.write_in_place ended its last write in flight: wake `wait_no_inflight`."""
        waiters, self.inflight_waiters = self.inflight_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _busy(self, free: PendingFree) -> bool:
        inflight = self.inflight
        return any(
            cluster in inflight
            for cluster in range(free.host_cluster, free.host_cluster + free.count)
        )

    def _forget(self, cluster: int) -> None:
        name = self.meta.get(cluster)
        if name in (OL_ACTIVE_L2, OL_INACTIVE_L2, OL_REFCOUNT_TABLE, OL_INACTIVE_L1):
            del self.meta[cluster]
