"""The mirror job's dirty bitmap and in-flight map (pure): every operation against a model
that keeps one bool per granule.

Unit ring. Hypothesis drives random sequences of marks, clears, partial-write clears and
searches (next_dirty wrapping around, runs) over images whose length is not a multiple of
the granularity; the bitmaps hold one bit per granule (`Bits`), the model a list of bools.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.blockdev.bitmaps.core import Bits
from storage_daemon.blockdev.jobs.mirror_bitmap import DirtyBitmap, InFlight

GRAN = 512

ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "reset", "covered", "all", "next", "run"]),
        st.integers(-GRAN, 40 * GRAN),
        st.integers(-GRAN, 12 * GRAN),
    ),
    max_size=50,
)


def model_span(size: int, gran: int, offset: int, n: int) -> range:
    if n <= 0:
        return range(0)
    return range(max(0, offset // gran), min(size, -(-(offset + n) // gran)))


def model_next(model: list[bool], start: int) -> int:
    for g in list(range(start, len(model))) + list(range(min(start, len(model)))):
        if model[g]:
            return g
    return -1


def model_run(model: list[bool], first: int, limit: int) -> int:
    n = 0
    while n < limit and first + n < len(model) and model[first + n]:
        n += 1
    return n


@given(
    gran=st.sampled_from([GRAN, 4096]),
    length=st.integers(1, 33 * GRAN),
    steps=ops,
)
def test_bitmap_matches_model(gran: int, length: int, steps: list[tuple[str, int, int]]) -> None:
    bm = DirtyBitmap(length, gran)
    size = -(-length // gran)
    assert bm.size == size and bm.length == length and bm.granularity == gran
    model = [False] * size
    for op, offset, n in steps:
        start = abs(offset) // GRAN  # a granule number, sometimes past the end
        if op == "set":
            bm.set(offset, n)
            for g in model_span(size, gran, offset, n):
                model[g] = True
        elif op == "reset":
            bm.reset(offset, n)
            for g in model_span(size, gran, offset, n):
                model[g] = False
        elif op == "covered":
            bm.reset_covered(offset, n)
            for g in range(size):
                begin, end = g * gran, min(length, (g + 1) * gran)
                if offset <= begin and end <= offset + n:
                    model[g] = False
        elif op == "all":
            bm.set_all()
            model = [True] * size
        elif op == "next":
            assert bm.next_dirty(start) == model_next(model, start)
        else:
            first = min(start, size - 1)
            limit = abs(n) % 13
            assert bm.run(first, limit) == model_run(model, first, limit)
        lo, hi = bm.span(offset, n)
        assert lo <= hi and list(range(lo, hi)) == list(model_span(size, gran, offset, n))
        assert bm.count == sum(model)
        assert bm.dirty_bytes == sum(model) * gran
    assert [bm.is_dirty(g) for g in range(size)] == model
    assert bm.next_dirty() == model_next(model, 0)
    for start in range(size + 1):
        assert bm.next_dirty(start) == model_next(model, start)
        if start < size and model[start]:
            assert bm.run(start, size) == model_run(model, start, size)


def test_next_dirty_wraps_around() -> None:
    bm = DirtyBitmap(10 * GRAN, GRAN)
    bm.set(GRAN, 1)
    assert bm.next_dirty(5) == 1
    assert bm.next_dirty(1) == 1
    assert bm.next_dirty(2) == 1
    assert bm.next_dirty(10) == 1  # a cursor at the end starts over
    bm.set(9 * GRAN, GRAN)
    assert bm.next_dirty(2) == 9
    bm.reset(0, 10 * GRAN)
    assert bm.next_dirty(3) == -1
    assert bm.next_dirty(0) == -1


def test_searches_cross_the_chunks_of_a_large_bitmap() -> None:
    """16M granules (a 64 GiB source at 4 KiB: 2 MiB of bits, qsd's layout): marks far apart,
    found across many 64 KiB chunks of clean or dirty bits."""
    gran = 4096
    size = 16 << 20
    bm = DirtyBitmap(size * gran - 1, gran)  # the last granule is short
    assert bm.size == size
    far = [3, 524_287, 524_288, 9_000_001, size - 1]
    for g in far:
        bm.set(g * gran + 7, 1)
    assert bm.count == len(far)
    found, pos = [], 0
    while (g := bm.next_dirty(pos)) >= pos:
        found.append(g)
        pos = g + 1
    assert found == far
    assert g == far[0]  # past the last one it wraps to the first
    assert bm.next_dirty(size - 1) == size - 1
    bm.reset((size - 1) * gran, gran)
    assert bm.next_dirty(9_000_002) == 3
    bm.set_all()
    assert bm.count == size
    assert bm.dirty_bytes == size * gran
    assert bm.run(0, size) == size
    bm.reset_covered(10_000_000 * gran, gran)
    assert bm.run(0, size) == 10_000_000
    assert bm.run(10_000_001, size) == size - 10_000_001
    bm.reset_covered((size - 1) * gran, gran - 1)  # reaches the end: the short one goes
    assert bm.count == size - 2 and not bm.is_dirty(size - 1)
    bm.reset(0, size * gran)
    assert bm.count == 0 and bm.next_dirty(12345) == -1


def test_granule_bytes_clip_at_end() -> None:
    bm = DirtyBitmap(3 * GRAN + 100, GRAN)
    assert bm.size == 4
    assert bm.granule_bytes(2, 5) == (2 * GRAN, GRAN + 100)
    bm.reset_covered(3 * GRAN, 100)  # reaches the end: the short last granule is covered
    bm.set(3 * GRAN, 1)
    bm.reset_covered(3 * GRAN, 50)
    assert bm.is_dirty(3)
    bm.reset_covered(3 * GRAN, 100)
    assert not bm.is_dirty(3)


def test_run_stops_at_limit_and_clean_granule() -> None:
    bm = DirtyBitmap(8 * GRAN, GRAN)
    bm.set(0, 3 * GRAN)
    bm.set(4 * GRAN, GRAN)
    assert bm.run(0, 2) == 2
    assert bm.run(0, 10) == 3
    assert bm.run(4, 10) == 1
    bm.set_all()
    assert bm.run(5, 100) == 3  # stops at the end


def test_granularity_must_be_power_of_two() -> None:
    with pytest.raises(ValueError):
        DirtyBitmap(4096, 1000)


def test_memory_is_one_bit_per_granule() -> None:
    """qsd's cost: a bit per granule (the byte-per-granule version took 8 times more)."""
    bm = DirtyBitmap(1 << 30, 512)  # 2M granules
    inflight = InFlight(bm.size)
    bm.set_all()
    inflight.mark(0, bm.size)
    assert len(bm._bits.packed()) == bm.size // 8
    assert len(inflight._marks.packed()) == bm.size // 8


def test_in_flight_marks() -> None:
    inflight = InFlight(8)
    assert not inflight.busy(0, 8)
    inflight.mark(2, 4)
    assert inflight.busy(3, 5) and not inflight.busy(4, 8)
    assert inflight.first_busy(0, 8) == 2
    assert inflight.first_busy(4, 8) == 8
    assert inflight.first_busy(4, 20) == 20  # past the end is never busy
    inflight.clear(2, 4)
    assert not inflight.busy(0, 8)


@given(
    size=st.integers(1, 80),
    steps=st.lists(st.tuples(st.booleans(), st.integers(0, 90), st.integers(0, 90)), max_size=30),
)
def test_in_flight_matches_model(size: int, steps: list[tuple[bool, int, int]]) -> None:
    inflight = InFlight(size)
    model = [False] * size
    for mark, a, b in steps:
        first, last = min(a, b), max(a, b)
        if mark:
            inflight.mark(first, min(last, size))
        else:
            inflight.clear(first, min(last, size))
        for g in range(first, min(last, size)):
            model[g] = mark
        for lo in range(size + 1):
            hi = lo + b % 17  # sometimes past the end, never busy there
            busy = [g for g in range(lo, min(hi, size)) if model[g]]
            assert inflight.first_busy(lo, hi) == (busy[0] if busy else hi)
            assert inflight.busy(lo, hi) == bool(busy)


@given(
    length=st.integers(1, 3000),
    gran=st.sampled_from([1, 8, 512]),
    steps=st.lists(st.tuples(st.booleans(), st.integers(-5, 30), st.integers(-5, 30)), max_size=20),
)
def test_fill_granules_clips_and_counts(
    length: int, gran: int, steps: list[tuple[bool, int, int]]
) -> None:
    """Bits.fill_granules (core.py): granule numbers, clipped to the bitmap, count exact."""
    bits = Bits(length, gran)
    model = [False] * bits.size
    for dirty, first, last in steps:
        bits.fill_granules(first, last, dirty)
        for g in range(max(0, first), min(bits.size, last)):
            model[g] = dirty
    assert [bits.is_dirty(g) for g in range(bits.size)] == model
    assert bits.count == sum(model) * gran
    reloaded = Bits(length, gran)
    reloaded.load_packed(bits.packed())  # nothing set past the end
    assert reloaded.count == bits.count
