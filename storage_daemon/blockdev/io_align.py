"""Alignment arithmetic and the in-flight request tracker of the generic I/O path (pure ring).

No asyncio, no clock, no I/O: `io.py` turns these answers into awaits. Invariant: a request
the tracker registered stays registered until `finish`, and a request only ever waits for
requests registered before it, so waiting can never form a cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


def align_down(value: int, align: int) -> int:
    return value - value % align


def align_up(value: int, align: int) -> int:
    return value + (-value) % align


def aligned_span(offset: int, end: int, align: int, eof: int) -> tuple[int, int]:
    """The aligned range `[start, stop)` covering `[offset, end)`, as drivers receive it.

    `start` is always a multiple of `align`. `stop` is one too, except when the node's end of
    file lies inside the padding (`end <= eof < stop`): then the range stops at `eof`, so a
    driver never sees a request that would grow an image the user did not grow. A range that
    itself goes past `eof` (a growing write) is padded to the full block.
    """
    start = offset - offset % align
    stop = end + (-end) % align
    if end <= eof < stop:
        stop = eof
    return start, stop


def is_aligned(offset: int, end: int, align: int, eof: int) -> bool:
    """True when `[offset, end)` needs no padding: aligned start, aligned end or EOF."""
    return offset % align == 0 and (end % align == 0 or end == eof)


def effective_max(max_transfer: int, align: int) -> int:
    """The largest chunk a split request may use: max_transfer rounded down to the alignment.

    0 (unlimited) stays 0; a max_transfer smaller than the alignment becomes one block.
    """
    if max_transfer <= 0:
        return 0
    return max(align, max_transfer - max_transfer % align)


def split(offset: int, length: int, max_chunk: int) -> Iterator[tuple[int, int]]:
    """`(offset, length)` pieces of at most `max_chunk` bytes (0: one piece), in order."""
    if max_chunk <= 0 or length <= max_chunk:
        yield offset, length
        return
    end = offset + length
    while offset < end:
        piece = min(max_chunk, end - offset)
        yield offset, piece
        offset += piece


def discard_span(offset: int, end: int, align: int, eof: int) -> tuple[int, int]:
    """The part of a discard that drivers can honour: unaligned head and tail dropped.

    A discard is advisory, so QEMU drops the partial blocks rather than reading and writing
    them; a tail that reaches EOF is kept whole. Returns an empty range when nothing is left.
    """
    start = offset + (-offset) % align
    stop = end if end == eof else end - end % align
    if stop <= start:
        return offset, offset
    return start, stop


# --- the tracker of in-flight requests ---------------------------------------------------


@dataclass(eq=False, slots=True)
class TrackedRequest:
    """One registered request: the byte range it may touch and whether it serialises."""

    start: int
    end: int
    serialising: bool
    seq: int
    done: bool = False
    waiters: list[Callable[[], None]] = field(default_factory=list)


class RequestTracker:
    """The in-flight write requests of one node, in registration order.

    A serialising request (a read-modify-write of partial blocks) conflicts with every
    overlapping request; two plain requests never conflict. `conflicts` lists the earlier
    conflicting requests still in flight; the caller waits for each (registering a callback
    in `waiters`) before it touches the range. Costs are O(number in flight).
    """

    __slots__ = ("_in_flight", "_seq", "serialising")

    def __init__(self) -> None:
        # dict keeps insertion (= registration) order and removes in O(1).
        self._in_flight: dict[TrackedRequest, None] = {}
        self._seq = 0
        self.serialising = 0  # how many serialising requests are in flight

    def __len__(self) -> int:
        return len(self._in_flight)

    def begin(self, start: int, end: int, serialising: bool) -> TrackedRequest:
        self._seq += 1
        req = TrackedRequest(start, end, serialising, self._seq)
        self._in_flight[req] = None
        if serialising:
            self.serialising += 1
        return req

    def conflicts(self, req: TrackedRequest) -> list[TrackedRequest]:
        """Earlier in-flight requests overlapping `req` that `req` must wait for."""
        if not req.serialising and not self.serialising:
            return []  # the common case: nothing serialising anywhere
        found = []
        for other in self._in_flight:
            if other is req:
                break  # everything after was registered later
            if (
                (req.serialising or other.serialising)
                and other.start < req.end
                and req.start < other.end
            ):
                found.append(other)
        return found

    def finish(self, req: TrackedRequest) -> None:
        """Unregister `req` and wake whoever waits for it."""
        if req.done:
            return
        req.done = True
        del self._in_flight[req]
        if req.serialising:
            self.serialising -= 1
        waiters, req.waiters = req.waiters, []
        for wake in waiters:
            wake()


@dataclass(eq=False)
class IoState:
    """Per-node state of the generic I/O path: the tracker, the flush generations, and the
    writes in flight that a drain waits for.

    `write_gen` counts completed modifications; a flush whose generation was already flushed
    skips the driver's own flush (QEMU's flushed_gen), which saves an fdatasync per idle flush.
    """

    tracker: RequestTracker = field(default_factory=RequestTracker)
    write_gen: int = 0
    flushed_gen: int = 0
    started: int = 0
    """Writes, zero writes and discards in flight through the node (`io.settled`)."""
    settle_waiters: list[Callable[[], None]] = field(default_factory=list)
    """What `io.settled(node)` callers wait on, called once `started` is back at 0."""
