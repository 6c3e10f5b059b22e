"""The dirty bitmap a mirror job keeps of its source, and the granules it is copying.

Pure core: no I/O, no asyncio. One byte per granule (a 1 TiB image at 64 KiB is 16 MiB), so
marking, clearing, counting and searching are single C-level bytearray operations. Invariant:
`count` is always the number of dirty granules, and a granule is never dirty beyond the end.
"""

from __future__ import annotations

DIRTY = 1
_DIRTY_BYTE = b"\x01"


class DirtyBitmap:
    """Granules of `granularity` bytes over `length` bytes; the last one may be short."""

    def __init__(self, length: int, granularity: int) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError("granularity must be a power of 2")
        self.length = length
        self.granularity = granularity
        self.size = -(-length // granularity)
        self._bits = bytearray(self.size)
        self.count = 0

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """Granules touched by `[offset, offset+length)`, clipped to the bitmap."""
        if length <= 0:
            return 0, 0
        first = max(0, offset // self.granularity)
        last = min(self.size, -(-(offset + length) // self.granularity))
        return first, max(first, last)

    def _fill(self, first: int, last: int, value: int) -> None:
        if first >= last:
            return
        before = self._bits.count(_DIRTY_BYTE, first, last)
        self._bits[first:last] = (b"\x01" if value else b"\x00") * (last - first)
        self.count += (last - first) - before if value else -before

    def set(self, offset: int, length: int) -> None:
        """Mark every granule the range touches."""
        self._fill(*self.span(offset, length), DIRTY)

    def set_all(self) -> None:
        self._fill(0, self.size, DIRTY)

    def reset(self, offset: int, length: int) -> None:
        """Clear every granule the range touches (the caller copies all of them)."""
        self._fill(*self.span(offset, length), 0)

    def reset_covered(self, offset: int, length: int) -> None:
        """Clear only the granules the range covers whole (a write that reached both sides);
        the short last granule counts as covered when the range reaches the end."""
        g = self.granularity
        first = -(-offset // g)
        end = offset + length
        last = self.size if end >= self.length else end // g
        self._fill(max(0, first), min(self.size, last), 0)

    def is_dirty(self, granule: int) -> bool:
        return self._bits[granule] == DIRTY

    def next_dirty(self, start: int = 0) -> int:
        """The first dirty granule at or after `start`, from the start again if none; -1
        when the bitmap is clean."""
        found = self._bits.find(_DIRTY_BYTE, start)
        if found < 0 and start:
            found = self._bits.find(_DIRTY_BYTE, 0, start)
        return found

    def run(self, first: int, limit: int) -> int:
        """How many granules from `first` (dirty) on are dirty in a row, at most `limit`."""
        end = min(self.size, first + limit)
        clean = self._bits.find(b"\x00", first, end)
        return (end if clean < 0 else clean) - first

    def granule_bytes(self, first: int, count: int) -> tuple[int, int]:
        """(offset, length) of `count` granules from `first`, clipped at the end."""
        offset = first * self.granularity
        return offset, min(self.length, (first + count) * self.granularity) - offset

    @property
    def dirty_bytes(self) -> int:
        """What QEMU's dirty count says: whole granules."""
        return self.count * self.granularity


class InFlight:
    """Granules some copy (or write-blocking client write) is working on right now."""

    def __init__(self, size: int) -> None:
        self._marks = bytearray(size)

    def busy(self, first: int, last: int) -> bool:
        return self._marks.find(_DIRTY_BYTE, first, last) >= 0

    def first_busy(self, first: int, last: int) -> int:
        """The first busy granule in `[first, last)`, or `last`."""
        found = self._marks.find(_DIRTY_BYTE, first, last)
        return last if found < 0 else found

    def mark(self, first: int, last: int) -> None:
        self._marks[first:last] = b"\x01" * (last - first)

    def clear(self, first: int, last: int) -> None:
        self._marks[first:last] = bytes(last - first)
