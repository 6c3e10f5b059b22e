"""A least-recently-used cache of cluster-sized metadata tables (L2 tables, refblocks).

Pure core: keys are host offsets, values the tables' bytes; it never writes anything. The
owner writes dirty tables back in its own order (refblocks before the L2 tables that rely on
them) and only then marks them clean. Invariant: a dirty table is never dropped by `evictable`.
"""

from __future__ import annotations

from collections import OrderedDict


class TableCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(2, capacity)
        self._tables: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def get(self, offset: int) -> bytearray | None:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
        return table

    def put(self, offset: int, table: bytearray, dirty: bool = False) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        if dirty:
            self._dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        if offset in self._tables:
            self._dirty.add(offset)

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
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    def over_capacity(self) -> bool:
        return len(self._tables) > self.capacity

    def evict_clean(self) -> None:
        """Drop least recently used clean tables until within capacity (dirty ones stay)."""
        if len(self._tables) <= self.capacity:
            return
        for offset in list(self._tables):
            if len(self._tables) <= self.capacity:
                break
            if offset not in self._dirty:
                del self._tables[offset]

    def clear(self) -> None:
        self._tables.clear()
        self._dirty.clear()
