"""A least-recently-used cache of qcow2 metadata tables (L2 tables, refblocks) and L2 slices.

Pure core: keys are host offsets, values the tables' bytes; it never writes anything. The
owner writes dirty tables back in its own order (refblocks before the L2 tables that rely on
them) and only then marks them clean. Invariants: a dirty table is never dropped by
`evict_clean` or `clean_unused`; slices (parts of an L2 table, `l2-cache-entry-size`) are
read-only copies, never dirty, and never coexist with the whole table they are part of.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# QEMU's defaults and bounds for the metadata caches (Linux).
DEFAULT_L2_CACHE_MAX = 32 << 20
DEFAULT_SLICE_SIZE = 4096
MIN_L2_ENTRIES = 2
MIN_REFCOUNT_ENTRIES = 4
DEFAULT_CLEAN_INTERVAL_S = 600
INT_MAX = (1 << 31) - 1


class CacheSizeError(Exception):
    """Cache options qsd refuses; `str()` is qsd's text."""


@dataclass(frozen=True)
class CacheConfig:
    l2_bytes: int
    l2_slice_size: int  # l2-cache-entry-size
    l2_entries: int  # capacity of the L2 cache, in slices
    refcount_bytes: int
    refcount_entries: int  # capacity of the refblock cache, in clusters


def cache_config(
    *,
    cluster_size: int,
    virtual_size: int,
    l2_entry_size: int,
    cache_size: int | None,
    l2_cache_size: int | None,
    l2_cache_entry_size: int | None,
    refcount_cache_size: int | None,
    memory_limit: int,
) -> CacheConfig:
    """The cache sizes qsd derives from the options, already checked for conflicts (the
    caller raises qsd's texts for those first). By default the L2 cache covers the whole
    image up to 32 MiB; when it covers less, its entries default to 4 KiB slices. An explicit
    size beyond what the image can use is cut down to that. `memory_limit` stands for the
    allocation that fails in qsd ("Could not allocate metadata caches")."""
    cs = cluster_size
    guest_clusters = -(-virtual_size // cs)
    max_l2 = -(-guest_clusters * l2_entry_size // cs) * cs
    min_refcount = MIN_REFCOUNT_ENTRIES * cs
    l2 = min(max_l2, DEFAULT_L2_CACHE_MAX if l2_cache_size is None else l2_cache_size)
    refcount = refcount_cache_size or 0
    if cache_size is not None:
        if l2_cache_size is not None:
            refcount = cache_size - l2
        elif refcount_cache_size is not None:
            l2 = cache_size - refcount
        elif cache_size >= max_l2 + min_refcount:
            l2 = max_l2
            refcount = cache_size - l2
        else:
            refcount = min(cache_size, min_refcount)
            l2 = cache_size - refcount
    slice_size = cs if l2_cache_entry_size is None else l2_cache_entry_size
    if l2 < max_l2 and l2_cache_entry_size is None:
        slice_size = min(cs, DEFAULT_SLICE_SIZE)
    l2_entries = max(MIN_L2_ENTRIES, l2 // slice_size)
    if l2_entries > INT_MAX:
        raise CacheSizeError("L2 cache size too big")
    refcount_entries = max(MIN_REFCOUNT_ENTRIES, refcount // cs)
    if refcount_entries > INT_MAX:
        raise CacheSizeError("Refcount cache size too big")
    if max(l2_entries * slice_size, refcount_entries * cs) > memory_limit:
        raise CacheSizeError("Could not allocate metadata caches")
    return CacheConfig(l2, slice_size, l2_entries, refcount, refcount_entries)


class TableCache:
    """Whole tables keyed by their offset; with `slice_size` < `table_size`, also slices
    keyed by `offset | 1` (offsets are 512-aligned, so bit 0 is free and one LRU order covers
    both). Capacity and occupancy count in slices: a whole table is `table_size //
    slice_size` of them, as QEMU counts a cache of l2-cache-entry-size entries."""

    def __init__(self, capacity: int, table_size: int = 0, slice_size: int = 0) -> None:
        self.table_size = table_size
        self.slice_size = slice_size if table_size and slice_size else table_size
        self.per_table = table_size // self.slice_size if table_size else 1
        self.capacity = max(2 * self.per_table, capacity)
        self._tables: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self._units = 0
        self._slices = 0  # how many slices are held (0: the slice paths cost nothing)
        self._used: set[int] = set()  # keys used since the last `clean_unused`
        self._track_use = False
        # Bumped whenever a table changes or goes: a slice read from disk meanwhile may be
        # stale, and is then not kept.
        self.epoch = 0

    @property
    def sliced(self) -> bool:
        return self.per_table > 1

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    @property
    def units(self) -> int:
        """Occupancy in slices (whole tables count `per_table`)."""
        return self._units

    # --- whole tables -------------------------------------------------------------------

    def get(self, offset: int) -> bytearray | None:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            if self._track_use:
                self._used.add(offset)
        return table

    def put(self, offset: int, table: bytearray, dirty: bool = False) -> None:
        if offset not in self._tables:
            self._units += self.per_table
            if self._slices:
                self._drop_slices(offset)
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        if self._track_use:
            self._used.add(offset)
        if dirty:
            self._dirty.add(offset)
            self.epoch += 1

    def mark_dirty(self, offset: int) -> None:
        if offset in self._tables:
            self._dirty.add(offset)
            self.epoch += 1

    def mark_clean(self, offset: int) -> None:
        self._dirty.discard(offset)

    def is_dirty(self, offset: int) -> bool:
        return offset in self._dirty

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def dirty_items(self) -> list[tuple[int, bytearray]]:
        return [(off, self._tables[off]) for off in sorted(self._dirty)]

    def drop(self, offset: int) -> None:
        if self._tables.pop(offset, None) is not None:
            self._units -= self.per_table
        self._dirty.discard(offset)
        self._used.discard(offset)
        if self._slices:
            self._drop_slices(offset)
        self.epoch += 1

    # --- slices -------------------------------------------------------------------------

    def get_slice(self, offset: int, index: int) -> tuple[bytearray, bool] | None:
        """Slice `index` of the table at `offset`, as (buffer, whole): the whole table when
        it is held (whole=True), else the slice's own bytes."""
        table = self.get(offset)
        if table is not None:
            return table, True
        if not self._slices:
            return None
        key = (offset + index * self.slice_size) | 1
        part = self._tables.get(key)
        if part is None:
            return None
        self._tables.move_to_end(key)
        if self._track_use:
            self._used.add(key)
        return part, False

    def put_slice(self, offset: int, index: int, data: bytearray) -> None:
        """Keep a slice read from disk (never while its whole table is held)."""
        if offset in self._tables:
            return
        key = (offset + index * self.slice_size) | 1
        if key not in self._tables:
            self._units += 1
            self._slices += 1
        self._tables[key] = data
        self._tables.move_to_end(key)
        if self._track_use:
            self._used.add(key)

    def _drop_slices(self, offset: int) -> None:
        tables = self._tables
        for pos in range(offset, offset + self.table_size, self.slice_size):
            if tables.pop(pos | 1, None) is not None:
                self._units -= 1
                self._slices -= 1
                self._used.discard(pos | 1)

    # --- capacity -----------------------------------------------------------------------

    def over_capacity(self) -> bool:
        return self._units > self.capacity

    def _forget(self, key: int) -> None:
        del self._tables[key]
        if key & 1:
            self._units -= 1
            self._slices -= 1
        else:
            self._units -= self.per_table
        self._used.discard(key)

    def evict_clean(self) -> None:
        """Drop least recently used clean tables until within capacity (dirty ones stay)."""
        if self._units <= self.capacity:
            return
        for key in list(self._tables):
            if self._units <= self.capacity:
                break
            if key not in self._dirty:
                self._forget(key)

    def watch_use(self) -> None:
        """Start noting which entries are used, for `clean_unused` (off by default: it costs
        a set insertion per lookup)."""
        if not self._track_use:
            self._track_use = True
            self._used = set(self._tables)

    def clean_unused(self) -> int:
        """Drop every clean table or slice not used since the previous call, or since
        `watch_use` (QEMU's cache-clean-interval timer); the number dropped. Without
        `watch_use` the first call only starts watching."""
        dropped = 0
        if self._track_use:
            used = self._used
            for key in [k for k in self._tables if k not in used and k not in self._dirty]:
                self._forget(key)
                dropped += 1
        self._used = set()
        self._track_use = True
        return dropped

    def clear(self) -> None:
        self._tables.clear()
        self._dirty.clear()
        self._used.clear()
        self._units = 0
        self._slices = 0
        self.epoch += 1
