"""A dirty bitmap's bits: one byte per granule, marked, cleared, merged and hashed.

Pure core: no I/O, no asyncio. One byte per granule keeps marking and counting single
C-level bytearray operations. Invariant: `length` is the covered byte count, every granule
index is below `size` (the last granule may be short), and each byte is 0 or 1.
"""

from __future__ import annotations

import hashlib

_ONE = b"\x01"
# Granule bytes (0/1) as the characters of a binary number, for packing into bits.
_AS_DIGITS = bytes.maketrans(b"\x00\x01", b"01")
_FROM_DIGITS = bytes.maketrans(b"01", b"\x00\x01")


class Bits:
    """Granules of `granularity` bytes (a power of two) over `length` bytes."""

    __slots__ = ("_granules", "_shift", "granularity", "length", "size")

    def __init__(self, length: int, granularity: int) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError("granularity must be a power of 2")
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        self.length = 0
        self.size = 0
        self._granules = bytearray()
        self.resize(length)

    def resize(self, length: int) -> None:
        """Grow (new granules clean) or shrink (granules past the end dropped)."""
        size = -(-length >> self._shift) if length > 0 else 0
        if size > self.size:
            self._granules.extend(bytes(size - self.size))
        else:
            del self._granules[size:]
        self.length = length
        self.size = size

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        first = max(0, offset) >> self._shift
        last = min(self.size, -(-(offset + length) >> self._shift))
        return first, max(first, last)

    def set(self, offset: int, length: int) -> None:
        """Mark every granule `[offset, offset+length)` touches (clipped to the bitmap)."""
        if length > 0:
            first, last = self._span(offset, length)
            self._granules[first:last] = _ONE * (last - first)

    def reset(self, offset: int, length: int) -> None:
        """Clear every granule `[offset, offset+length)` touches."""
        if length > 0:
            first, last = self._span(offset, length)
            self._granules[first:last] = bytes(last - first)

    def clear(self) -> None:
        self._granules[:] = bytes(self.size)

    @property
    def count(self) -> int:
        """Dirty bytes as qsd counts them: whole granules, the short last one included."""
        return self._granules.count(_ONE) << self._shift

    def is_dirty(self, granule: int) -> bool:
        return self._granules[granule] == 1

    def dirty_runs(self) -> list[tuple[int, int]]:
        """The dirty byte ranges as (offset, length), in order, clipped to `length`."""
        runs: list[tuple[int, int]] = []
        granules = self._granules
        pos = granules.find(_ONE)
        while pos >= 0:
            end = granules.find(b"\x00", pos)
            if end < 0:
                end = self.size
            offset = pos << self._shift
            runs.append((offset, min(self.length, end << self._shift) - offset))
            pos = granules.find(_ONE, end)
        return runs

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """At most `limit` runs of `[offset, offset+length)` as (length, 1 dirty / 0 clean),
        each a whole run of like granules clipped to the range (what qsd's NBD server sends
        for a `qemu:dirty-bitmap:` context). Past the bitmap's end reads as clean."""
        out: list[tuple[int, int]] = []
        end = offset + length
        granules = self._granules
        pos = offset
        while pos < end and len(out) < limit:
            granule = pos >> self._shift
            if granule >= self.size:
                out.append((end - pos, 0))
                break
            dirty = granules[granule]
            nxt = granules.find(b"\x00" if dirty else _ONE, granule)
            stop = end if nxt < 0 else min(end, nxt << self._shift)
            out.append((stop - pos, dirty))
            pos = stop
        return out

    def copy(self) -> Bits:
        other = Bits(0, self.granularity)
        other.length, other.size = self.length, self.size
        other._granules = bytearray(self._granules)
        return other

    def restore(self, saved: Bits) -> None:
        """Take back the granules of a `copy()` of this bitmap (a transaction's undo)."""
        self.length, self.size = saved.length, saved.size
        self._granules[:] = saved._granules

    def merge_from(self, other: Bits) -> None:
        """Mark what `other` marks (same length; any granularity: each dirty range of the
        other marks every granule of ours that it touches)."""
        if other.granularity == self.granularity:
            merged = int.from_bytes(self._granules, "little") | int.from_bytes(
                other._granules, "little"
            )
            self._granules[:] = merged.to_bytes(self.size, "little")
            return
        for offset, length in other.dirty_runs():
            self.set(offset, length)

    def serialise(self) -> bytes:
        """The bits as qsd keeps them: little-endian 64-bit words, granule i at bit i % 64
        of word i // 64, at least one word."""
        words = max(1, -(-self.size // 64))
        if not self.size:
            return bytes(8 * words)
        digits = self._granules.translate(_AS_DIGITS)[::-1]
        return int(digits, 2).to_bytes(8 * words, "little")

    def packed(self) -> bytes:
        """The bits as a qcow2 image stores them: granule i at bit i % 8 (least significant
        first) of byte i // 8, in ceil(size / 8) bytes."""
        return self.serialise()[: -(-self.size // 8)]

    def load_packed(self, data: bytes | bytearray) -> None:
        """Take every granule from `packed()` form; bits past `size` are ignored."""
        n = self.size
        if not n:
            return
        value = int.from_bytes(data[: -(-n // 8)], "little") & ((1 << n) - 1)
        self._granules[:] = format(value, f"0{n}b").encode()[::-1].translate(_FROM_DIGITS)

    def sha256(self) -> str:
        """x-debug-block-dirty-bitmap-sha256: the hex SHA-256 of `serialise()`."""
        return hashlib.sha256(self.serialise()).hexdigest()
