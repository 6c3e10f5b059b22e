"""The generic I/O path's pure helpers: alignment arithmetic, splitting, the request tracker."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.blockdev.io_align import (
    RequestTracker,
    align_down,
    align_up,
    aligned_span,
    discard_span,
    effective_max,
    is_aligned,
    split,
)

ALIGNS = st.sampled_from([1, 512, 4096])


@given(st.integers(0, 1 << 40), ALIGNS)
def test_align_down_up_bracket_the_value(value: int, align: int) -> None:
    down, up = align_down(value, align), align_up(value, align)
    assert down % align == 0 and up % align == 0
    assert down <= value <= up and up - down in (0, align)
    assert (down == up) == (value % align == 0)


@given(st.data(), ALIGNS)
def test_aligned_span_covers_the_request_and_stops_at_eof(data: st.DataObject, align: int) -> None:
    eof = data.draw(st.integers(1, 1 << 20))
    offset = data.draw(st.integers(0, eof + 3 * align))
    end = data.draw(st.integers(offset, eof + 4 * align))
    start, stop = aligned_span(offset, end, align, eof)
    assert start % align == 0 and start <= offset < start + align
    assert stop >= end
    if end <= eof:
        # Never past EOF for an in-bounds request; aligned unless it ends at EOF.
        assert stop <= eof
        assert stop % align == 0 or stop == eof
        assert stop - end < align
    else:
        assert stop == align_up(end, align)
    assert is_aligned(start, stop, align, eof)


def test_aligned_span_examples() -> None:
    assert aligned_span(100, 200, 512, 10_000) == (0, 512)
    assert aligned_span(512, 1024, 512, 10_000) == (512, 1024)
    assert aligned_span(600, 1100, 512, 10_000) == (512, 1536)
    assert aligned_span(1000, 1030, 512, 1030) == (512, 1030)  # tail at an unaligned EOF
    assert aligned_span(1000, 1010, 512, 1030) == (512, 1024)
    assert aligned_span(1000, 1010, 512, 1020) == (512, 1020)  # padding clipped at EOF
    assert aligned_span(1000, 1100, 512, 1030) == (512, 1536)  # growing: whole block
    assert aligned_span(1030, 1030, 512, 1030) == (1024, 1030)


def test_is_aligned() -> None:
    assert is_aligned(0, 4096, 4096, 1 << 20)
    assert not is_aligned(1, 4096, 4096, 1 << 20)
    assert not is_aligned(0, 4095, 4096, 1 << 20)
    assert is_aligned(0, 4095, 4096, 4095)  # the end may be EOF
    assert is_aligned(3, 7, 1, 100)


@given(st.integers(0, 1 << 30), st.integers(0, 1 << 22), st.integers(0, 1 << 16))
def test_split_tiles_the_range(offset: int, length: int, max_chunk: int) -> None:
    pieces = list(split(offset, length, max_chunk))
    assert pieces[0][0] == offset
    pos = offset
    for piece_offset, size in pieces:
        assert piece_offset == pos
        assert max_chunk == 0 or size <= max_chunk
        pos += size
    assert pos == offset + length
    if max_chunk and length > max_chunk:
        assert all(size == max_chunk for _, size in pieces[:-1])
    else:
        assert pieces == [(offset, length)]


def test_effective_max() -> None:
    assert effective_max(0, 512) == 0
    assert effective_max(65536, 512) == 65536
    assert effective_max(5000, 4096) == 4096
    assert effective_max(100, 512) == 512
    assert effective_max(7, 1) == 7


@given(st.data(), ALIGNS)
def test_discard_span_keeps_only_whole_blocks(data: st.DataObject, align: int) -> None:
    eof = data.draw(st.integers(1, 1 << 20))
    offset = data.draw(st.integers(0, eof))
    end = data.draw(st.integers(offset, eof))
    start, stop = discard_span(offset, end, align, eof)
    assert offset <= start <= stop <= end
    if stop > start:
        assert start % align == 0
        assert stop % align == 0 or stop == eof
        # Nothing whole was dropped: the kept range is the widest aligned one inside.
        assert start - offset < align
        assert end - stop < align


def test_discard_span_examples() -> None:
    assert discard_span(100, 5000, 4096, 1 << 20) == (100, 100)  # nothing whole inside
    assert discard_span(100, 9000, 4096, 1 << 20) == (4096, 8192)
    assert discard_span(0, 5000, 4096, 5000) == (0, 5000)  # tail reaching EOF kept


def test_tracker_plain_requests_never_wait() -> None:
    tracker = RequestTracker()
    first = tracker.begin(0, 4096, False)
    second = tracker.begin(0, 4096, False)
    assert tracker.conflicts(first) == [] and tracker.conflicts(second) == []
    assert len(tracker) == 2


def test_tracker_serialising_waits_only_for_earlier_overlaps() -> None:
    tracker = RequestTracker()
    a = tracker.begin(0, 4096, False)
    b = tracker.begin(8192, 12288, False)
    r = tracker.begin(0, 8192, True)  # overlaps a, not b (end is exclusive)
    c = tracker.begin(4096, 8192, False)  # later and overlapping r: waits for r
    d = tracker.begin(100_000, 100_100, False)  # later but disjoint
    assert tracker.conflicts(r) == [a]
    assert tracker.conflicts(c) == [r]
    assert tracker.conflicts(d) == []
    assert tracker.conflicts(a) == []  # earlier requests never wait for later ones
    woken: list[str] = []
    r.waiters.append(lambda: woken.append("c"))
    tracker.finish(r)
    assert woken == ["c"] and tracker.serialising == 0
    assert tracker.conflicts(c) == []
    tracker.finish(r)  # idempotent
    for req in (a, b, c, d):
        tracker.finish(req)
    assert len(tracker) == 0


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 6), st.booleans()), max_size=12))
def test_tracker_conflicts_follow_the_rule(specs: list[tuple[int, int, bool]]) -> None:
    tracker = RequestTracker()
    reqs = [tracker.begin(start, start + size, ser) for start, size, ser in specs]
    for i, req in enumerate(reqs):
        expected = [
            other
            for other in reqs[:i]
            if (req.serialising or other.serialising)
            and other.start < req.end
            and req.start < other.end
        ]
        assert tracker.conflicts(req) == expected
