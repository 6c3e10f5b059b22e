"""The dirty bitmap core (blockdev/bitmaps/core.py) against a set-of-granules model, and its
serialisation against the layout qsd hashes (little-endian 64-bit words).

Test ring (unit, pure).
"""

from __future__ import annotations

import hashlib

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
    dst.restore(saved)
    assert dst.serialise() == saved.serialise()


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
