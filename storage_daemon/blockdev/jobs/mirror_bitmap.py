"""The dirty bitmap a mirror job keeps of its source, and the granules it is copying.

Pure core: no I/O, no asyncio. Both are `Bits` (one bit per granule, as qsd: a 1 TiB image at
4 KiB granules is 32 MiB), so marks fill whole bytes at once and searches compare chunks in C.
Invariant: `count` is always the number of dirty granules; none is dirty beyond the end.
"""

from __future__ import annotations

from storage_daemon.blockdev.bitmaps.core import Bits


class DirtyBitmap:
    """Granules of `granularity` bytes over `length` bytes; the last one may be short."""

    __slots__ = ("_bits", "_shift", "granularity", "length", "size")

    def __init__(self, length: int, granularity: int) -> None:
        self._bits = Bits(length, granularity)  # refuses a granularity not a power of 2
        self._shift = granularity.bit_length() - 1
        self.length = length
        self.granularity = granularity
        self.size = self._bits.size

    @property
    def count(self) -> int:
        """Dirty granules (kept by `Bits` as marks and clears happen: no scan)."""
        return self._bits.count >> self._shift

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """Granules touched by `[offset, offset+length)`, clipped to the bitmap."""
        if length <= 0:
            return 0, 0
        first = max(0, offset // self.granularity)
        last = min(self.size, -(-(offset + length) // self.granularity))
        return first, max(first, last)

    def set(self, offset: int, length: int) -> None:
        """Mark every granule the range touches."""
        self._bits.set(offset, length)

    def set_all(self) -> None:
        self._bits.set(0, self.length)

    def reset(self, offset: int, length: int) -> None:
        """Clear every granule the range touches (the caller copies all of them)."""
        self._bits.reset(offset, length)

    def reset_covered(self, offset: int, length: int) -> None:
        """Clear only the granules the range covers whole (a write that reached both sides);
        the short last granule counts as covered when the range reaches the end."""
        g = self.granularity
        first = -(-offset // g)
        end = offset + length
        last = self.size if end >= self.length else end // g
        self._bits.fill_granules(first, last, False)

    def is_dirty(self, granule: int) -> bool:
        return self._bits.is_dirty(granule)

    def next_dirty(self, start: int = 0) -> int:
        """The first dirty granule at or after `start`, from the start again if none; -1
        when the bitmap is clean."""
        if not self._bits.count:
            return -1
        found = self._bits.next_granule(start, True)
        if found < self.size:
            return found
        if start:
            found = self._bits.next_granule(0, True, start)
            if found < min(start, self.size):
                return found
        return -1

    def run(self, first: int, limit: int) -> int:
        """How many granules from `first` (dirty) on are dirty in a row, at most `limit`."""
        end = min(self.size, first + limit)
        return self._bits.next_granule(first, False, end) - first

    def granule_bytes(self, first: int, count: int) -> tuple[int, int]:
        """(offset, length) of `count` granules from `first`, clipped at the end."""
        offset = first * self.granularity
        return offset, min(self.length, (first + count) * self.granularity) - offset

    @property
    def dirty_bytes(self) -> int:
        """What QEMU's dirty count says: whole granules."""
        return self._bits.count


class InFlight:
    """Granules some copy (or write-blocking client write) is working on right now; one bit
    each (a `Bits` of 1-byte granules, marked by granule number)."""

    __slots__ = ("_marks",)

    def __init__(self, size: int) -> None:
        self._marks = Bits(size, 1)

    def busy(self, first: int, last: int) -> bool:
        return self.first_busy(first, last) < last

    def first_busy(self, first: int, last: int) -> int:
        """The first busy granule in `[first, last)`, or `last`."""
        marks = self._marks
        if not marks.count:
            return last
        found = marks.next_granule(first, True, last)
        return found if found < min(last, marks.size) else last

    def mark(self, first: int, last: int) -> None:
        self._marks.fill_granules(first, last, True)

    def clear(self, first: int, last: int) -> None:
        self._marks.fill_granules(first, last, False)
