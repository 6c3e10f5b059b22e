"""The mirror job's dirty bitmap and in-flight map (pure): every operation against a model
that keeps one bool per granule.

Unit ring. Hypothesis drives random sequences of marks, clears and partial-write clears over
images whose length is not a multiple of the granularity.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.blockdev.jobs.mirror_bitmap import DirtyBitmap, InFlight

GRAN = 512

ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "reset", "covered", "all"]),
        st.integers(0, 20 * GRAN),
        st.integers(0, 8 * GRAN),
    ),
    max_size=40,
)


def model_span(length: int, offset: int, n: int) -> range:
    if n <= 0:
        return range(0)
    size = -(-length // GRAN)
    return range(max(0, offset // GRAN), min(size, -(-(offset + n) // GRAN)))


@given(length=st.integers(1, 16 * GRAN), steps=ops)
def test_bitmap_matches_model(length: int, steps: list[tuple[str, int, int]]) -> None:
    bm = DirtyBitmap(length, GRAN)
    model = [False] * bm.size
    for op, offset, n in steps:
        if op == "set":
            bm.set(offset, n)
            for g in model_span(length, offset, n):
                model[g] = True
        elif op == "reset":
            bm.reset(offset, n)
            for g in model_span(length, offset, n):
                model[g] = False
        elif op == "covered":
            bm.reset_covered(offset, n)
            for g in range(bm.size):
                start, end = g * GRAN, min(length, (g + 1) * GRAN)
                if offset <= start and end <= offset + n:
                    model[g] = False
        else:
            bm.set_all()
            model = [True] * bm.size
        assert bm.count == sum(model)
        assert [bm.is_dirty(g) for g in range(bm.size)] == model
        assert bm.dirty_bytes == sum(model) * GRAN
    first = bm.next_dirty(0)
    assert first == (model.index(True) if any(model) else -1)
    if first >= 0:
        run = bm.run(first, 1000)
        assert all(model[first : first + run])
        assert first + run == bm.size or not model[first + run]


def test_next_dirty_wraps_around() -> None:
    bm = DirtyBitmap(10 * GRAN, GRAN)
    bm.set(GRAN, 1)
    assert bm.next_dirty(5) == 1
    assert bm.next_dirty(1) == 1
    bm.reset(0, 10 * GRAN)
    assert bm.next_dirty(3) == -1


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


def test_granularity_must_be_power_of_two() -> None:
    with pytest.raises(ValueError):
        DirtyBitmap(4096, 1000)


def test_in_flight_marks() -> None:
    inflight = InFlight(8)
    assert not inflight.busy(0, 8)
    inflight.mark(2, 4)
    assert inflight.busy(3, 5) and not inflight.busy(4, 8)
    assert inflight.first_busy(0, 8) == 2
    assert inflight.first_busy(4, 8) == 8
    inflight.clear(2, 4)
    assert not inflight.busy(0, 8)
