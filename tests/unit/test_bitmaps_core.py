"""The dirty bitmap core (blockdev/bitmaps/core.py) against a set-of-granules model, and its
serialisation against the layout qsd hashes (little-endian 64-bit words).

Test ring (unit, pure).
"""

from __future__ import annotations

import hashlib
import itertools

from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.blockdev.bitmaps.core import Bits

GRANS = st.sampled_from([512, 4096, 65536])
RANGES = st.lists(st.tuples(st.integers(0, 300_000), st.integers(0, 70_000)), max_size=8)


def model(length: int, gran: int, ranges: list[tuple[int, int]]) -> set[int]:
    size = -(-length // gran)
    return {
        g
        for off, n in ranges
        if n > 0
        for g in range(off // gran, min(size, -(-(off + n) // gran)))
    }


def test_empty_hash_is_one_zero_word() -> None:
    bits = Bits(1 << 20, 65536)
    assert bits.serialise() == bytes(8)
    assert bits.sha256() == hashlib.sha256(bytes(8)).hexdigest()
    assert Bits(0, 512).serialise() == bytes(8)
    assert len(Bits(1000 << 10, 512).serialise()) == 256  # 2000 bits -> 32 words


def test_bit_order_is_little_endian_words() -> None:
    bits = Bits(1 << 20, 512)  # 2048 granules
    bits.set(0, 1)
    bits.set(65 * 512, 1)
    raw = bits.serialise()
    assert raw[0] == 1 and raw[8] == 2 and raw.count(0) == len(raw) - 2


@given(st.integers(1, 400_000), GRANS, RANGES)
def test_set_and_count_match_the_model(
    length: int, gran: int, ranges: list[tuple[int, int]]
) -> None:
    bits = Bits(length, gran)
    for off, n in ranges:
        bits.set(off, n)
    dirty = model(length, gran, ranges)
    assert bits.count == len(dirty) * gran
    assert {g for g in range(bits.size) if bits.is_dirty(g)} == dirty
    value = int.from_bytes(bits.serialise(), "little")
    assert value == sum(1 << g for g in dirty)
    covered = {o // gran for o, n in bits.dirty_runs() for o in range(o, o + n, gran)}
    assert covered == dirty


@given(st.integers(1, 400_000), GRANS, GRANS, RANGES, RANGES)
def test_merge_marks_what_the_source_touches(
    length: int, g1: int, g2: int, r1: list[tuple[int, int]], r2: list[tuple[int, int]]
) -> None:
    dst, src = Bits(length, g1), Bits(length, g2)
    for off, n in r1:
        dst.set(off, n)
    for off, n in r2:
        src.set(off, n)
    saved = dst.copy()
    dst.merge_from(src)
    expect = model(length, g1, r1) | model(length, g1, src.dirty_runs())
    assert {g for g in range(dst.size) if dst.is_dirty(g)} == expect
    assert dst.count == len(expect) * g1
    dst.restore(saved)
    assert dst.serialise() == saved.serialise()
    assert dst.count == len(model(length, g1, r1)) * g1


def test_resize_and_reset() -> None:
    bits = Bits(10 * 512, 512)
    bits.set(0, 10 * 512)
    bits.resize(4 * 512)
    assert bits.count == 4 * 512
    bits.resize(8 * 512)
    assert bits.count == 4 * 512 and bits.size == 8
    bits.reset(512, 1)
    assert bits.count == 3 * 512
    bits.clear()
    assert bits.count == 0


OPS = st.lists(
    st.tuples(st.booleans(), st.integers(0, 300_000), st.integers(0, 70_000)), max_size=10
)


@given(st.integers(1, 300_000), GRANS, OPS, st.integers(0, 320_000), st.integers(1, 90_000))
def test_marks_clears_searches_and_extents_match_the_model(
    length: int, gran: int, ops: list[tuple[bool, int, int]], at: int, span: int
) -> None:
    """Bits (one bit per granule) against a set of granules: set and reset in any order,
    the next dirty/clean granule, the runs, and the NBD extents of any range."""
    bits = Bits(length, gran)
    dirty: set[int] = set()
    for mark, off, n in ops:
        (bits.set if mark else bits.reset)(off, n)
        touched = model(length, gran, [(off, n)])
        dirty = dirty | touched if mark else dirty - touched
    assert {g for g in range(bits.size) if bits.is_dirty(g)} == dirty
    assert bits.count == len(dirty) * gran
    start = min(at // gran, bits.size)
    assert bits.next_granule(start, True) == min(
        [g for g in dirty if g >= start], default=bits.size
    )
    assert bits.next_granule(start, False) == min(
        [g for g in range(start, bits.size) if g not in dirty], default=bits.size
    )
    extents = bits.extents(at, span, 1 << 20)
    assert sum(n for n, _ in extents) == span
    pos = at
    for n, flag in extents:
        for byte in (pos, pos + n - 1):
            granule = byte // gran
            assert flag == (granule < bits.size and granule in dirty)
        pos += n
    assert all(a[1] != b[1] for a, b in itertools.pairwise(extents))
    assert bits.extents(at, span, 1) == extents[:1]


@given(st.integers(1, 300_000), GRANS, RANGES, st.integers(0, 300_000))
def test_resize_keeps_the_bits_past_the_end_clean(
    length: int, gran: int, ranges: list[tuple[int, int]], new_length: int
) -> None:
    bits = Bits(length, gran)
    for off, n in ranges:
        bits.set(off, n)
    kept = {g for g in model(length, gran, ranges) if g < -(-new_length // gran)}
    bits.resize(new_length)
    bits.resize(length)  # regrown: what was cut comes back clean
    assert {g for g in range(bits.size) if bits.is_dirty(g)} == kept
    assert bits.count == len(kept) * gran
    loaded = Bits(length, gran)
    loaded.load_packed(bits.packed() + b"\xff")
    assert loaded.packed() == bits.packed()
    assert loaded.count == bits.count
    loaded.clear()
    assert loaded.count == 0 and loaded.copy().count == 0


def test_counts_stay_exact_across_ranges_wider_than_a_chunk() -> None:
    """Marks and clears spanning more than 64 KiB of bits (counted by chunks)."""
    bits = Bits(1 << 32, 512)  # 8 Mi granules, 1 MiB of bits
    bits.set(100 * 512, 3 * 512)  # 3 granules dirty inside the range below
    bits.set(0, 300 << 20)  # 600 Ki granules: 75 KiB of bits
    assert bits.count == 300 << 20
    bits.set(1 << 30, 1 << 30)
    assert bits.count == (300 << 20) + (1 << 30)
    bits.reset(512 * 7, 1 << 30)  # clears all of the first run but 7 granules
    assert bits.count == 7 * 512 + (1 << 30) - (512 * 7)
    assert bits.count == sum(n for _, n in bits.dirty_runs())
