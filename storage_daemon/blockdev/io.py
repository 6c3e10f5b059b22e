"""The generic block I/O path: every user of a node (export, job, parent node) calls these.

Domain ring. Checks run in QEMU's order (permission, bounds), then requests are split at the
driver's max_transfer, padded to its request_alignment (read-modify-write, serialised through
the node's tracker), zero payloads turned into zero writes (detect-zeroes), and accounted.
`pread_now`/`pwrite_now` do a request without waiting when every layer can, or nothing;
`pwrite_start` starts one that a driver finishes on its own thread and calls back.
Block status lives in `io_status` (re-exported here). Invariant: a driver only sees in-bounds
requests whose offset is a multiple of its request_alignment, whose end is one too or is the
node's EOF, and no longer than max_transfer.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from typing import Any

from storage_daemon.blockdev import write_threshold as _threshold
from storage_daemon.blockdev.bitmaps import registry as _bitmaps
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.driver import BlockDriver
from storage_daemon.blockdev.io_align import (
    IoState,
    RequestTracker,
    TrackedRequest,
    align_down,
    align_up,
    aligned_span,
    discard_span,
    effective_max,
    is_aligned,
    split,
)
from storage_daemon.blockdev.io_status import allocation_depth as allocation_depth
from storage_daemon.blockdev.io_status import block_status as block_status
from storage_daemon.blockdev.io_status import block_status_now as block_status_now
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import Perm
from storage_daemon.clock import Clock, SystemClock

Buffer = bytes | bytearray | memoryview
# Drivers declare `bytes | memoryview` payloads but take any contiguous byte buffer; the
# `type: ignore[arg-type]` on pwritev calls below passes bytearrays on without a copy.

# Perm is an IntFlag, whose operators (and `.value`) run Python code, about 1 us each: the hot
# path tests the member's plain int `_value_` instead.
_WRITE = Perm.WRITE.value
_RESIZE = Perm.RESIZE.value
_FLUSHED_CHILD = (Perm.WRITE | Perm.WRITE_UNCHANGED).value

_ZERO_CHUNK = 1 << 20
_ZEROES = bytes(_ZERO_CHUNK)
_ZEROES_VIEW = memoryview(_ZEROES)
_EMPTY = b""

_now: Callable[[], int] = SystemClock().monotonic_ns

# Set while a pwrite_zeroes(fast_only=True) runs, so that pass-through drivers' nested zero
# writes refuse the slow path too (NBD_CMD_FLAG_FAST_ZERO, QEMU's BDRV_REQ_NO_FALLBACK).
_NO_FALLBACK: ContextVar[bool] = ContextVar("no_fallback", default=False)

# Set while a pread_live runs: a one-item list the file driver sets to True when it answers
# with a view of the page cache. Only drivers that hand their child's data up unchanged and
# never keep it see the flag; below any other driver (a format reading its metadata, a
# filter) it is cleared, so no one else ever gets such a view.
_LIVE: ContextVar[list[bool] | None] = ContextVar("live_read", default=None)
_LIVE_OK = frozenset({"raw", "file"})


def use_clock(clock: Clock) -> None:
    """Measure request times with `clock` (the daemon's, or a FakeClock in tests)."""
    global _now
    _now = clock.monotonic_ns


def live_read_cell() -> list[bool] | None:
    """For the file driver: a list to set `[0] = True` in when it answers a read with a live
    view (see `pread_live`), or None when the caller needs a buffer of its own."""
    return _LIVE.get()


def zero_fallback_allowed() -> bool:
    """False while a fast-only zero write runs: drivers must fail with ENOTSUP, not emulate."""
    return not _NO_FALLBACK.get()


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def is_zero(data: Buffer) -> bool:
    """True when every byte of `data` is zero (a C memcmp against a cached zero buffer)."""
    if len(data) <= _ZERO_CHUNK:
        return _ZEROES.startswith(data)
    view = memoryview(data)
    return all(
        _ZEROES.startswith(view[pos : pos + _ZERO_CHUNK])
        for pos in range(0, len(view), _ZERO_CHUNK)
    )


def _put(buf: bytearray, pos: int, data: Buffer) -> None:
    """`buf[pos:pos + len(data)] = data` with one copy (assigning anything but a bytearray
    to a bytearray slice copies the source into a temporary bytearray first)."""
    memoryview(buf)[pos : pos + len(data)] = memoryview(data).cast("B")


def length(edge: BdrvChild) -> int:
    """The node's current length in bytes."""
    return edge.node.driver.getlength()


# --- checks ------------------------------------------------------------------------------


def _check_writer(edge: BdrvChild) -> None:
    # A write without WRITE on the edge is a caller bug (QEMU asserts); a read-only node
    # answers EPERM as bdrv_co_write_req_prepare does.
    if not edge.perm._value_ & _WRITE or edge.node.options.read_only:
        raise _error(errno.EPERM)


def _parent_is_node(edge: BdrvChild) -> bool:
    return isinstance(edge.parent, BlockNode)


def _may_grow(edge: BdrvChild) -> bool:
    """Parent nodes holding RESIZE may write past EOF (a format growing its file)."""
    return bool(edge.perm._value_ & _RESIZE) and _parent_is_node(edge)


# --- reads -------------------------------------------------------------------------------


async def pread(edge: BdrvChild, offset: int, length: int) -> Buffer:
    """`length` bytes at `offset`; EIO when the range is not inside the node.

    Reads need no permission (QEMU never checks one). A parent node reading past EOF gets
    zeroes there, as QEMU's node-level reads do; exports and jobs get EIO.
    """
    node = edge.node
    drv = node.driver
    eof = drv.getlength()
    end = offset + length
    if offset < 0 or length < 0 or end > eof:
        return await _pread_outside(edge, offset, length, eof)
    if not length:
        return _EMPTY
    stats = node.stats
    started = _now()
    try:
        align = drv.request_alignment
        max_transfer = drv.max_transfer
        if _LIVE.get() is not None and drv.name not in _LIVE_OK:
            data = await _pread_sealed(drv, offset, length, eof, align, max_transfer)
        elif (align == 1 or (offset % align == 0 and (end % align == 0 or end == eof))) and (
            not max_transfer or length <= max_transfer
        ):
            data = await drv.preadv(offset, length)
            if len(data) != length:
                raise _error(errno.EIO)
        else:
            data = await _pread_slow(drv, offset, length, eof, align, max_transfer)
    except Exception:
        stats.failed_rd_operations += 1
        raise
    stats.rd_operations += 1
    stats.rd_bytes += length
    stats.rd_total_time_ns += _now() - started
    return data


async def pread_live(edge: BdrvChild, offset: int, length: int) -> tuple[Buffer, bool]:
    """`pread` for data that is sent at once and then dropped (an NBD READ reply).

    Returns (data, live). When `live` is True, `data` is a read-only view of the file's page
    cache (a tmpfs image read through raw): no copy was made, so its bytes may still change
    until the caller has handed them to the kernel, and the caller must not keep it or read
    it itself (a file shrunk by someone else meanwhile would fault). Overlapping requests in
    flight at the same time give unspecified results in NBD anyway; qsd's threads can tear
    such reads too.
    """
    cell = [False]
    token = _LIVE.set(cell)
    try:
        data = await pread(edge, offset, length)
    finally:
        _LIVE.reset(token)
    return data, cell[0]


def pread_now(edge: BdrvChild, offset: int, length: int, *, live: bool = False) -> Buffer | None:
    """`pread` when every layer down can read without waiting, else None (nothing was
    read, nothing counted: await `pread`). Drivers take part through an optional
    `preadv_now(offset, length, live)` returning the data or None (tmpfs, page-cache hits,
    cached qcow2 mappings). `live` asks for what `pread_live` gives (raw and file only).
    Errors raise as from `pread`; requests outside the node are left to `pread`.
    """
    node = edge.node
    drv = node.driver
    probe = getattr(drv, "preadv_now", None)
    if probe is None:
        return None
    eof = drv.getlength()
    end = offset + length
    if offset < 0 or length <= 0 or end > eof:
        return None
    align = drv.request_alignment
    if align > 1 and (offset % align or (end % align and end != eof)):
        return None
    max_transfer = drv.max_transfer
    if max_transfer and length > max_transfer:
        return None
    stats = node.stats
    started = _now()
    try:
        data: Buffer | None = probe(offset, length, live and drv.name in _LIVE_OK)
        if data is None:
            return None
        if len(data) != length:
            raise _error(errno.EIO)
    except Exception:
        stats.failed_rd_operations += 1
        raise
    stats.rd_operations += 1
    stats.rd_bytes += length
    stats.rd_total_time_ns += _now() - started
    return data


async def _pread_sealed(
    drv: BlockDriver, offset: int, length: int, eof: int, align: int, max_transfer: int
) -> Buffer:
    """A read through a driver that must not see live views: the flag is cleared below it."""
    token = _LIVE.set(None)
    try:
        return await _pread_slow(drv, offset, length, eof, align, max_transfer)
    finally:
        _LIVE.reset(token)


async def _pread_outside(edge: BdrvChild, offset: int, length: int, eof: int) -> Buffer:
    if offset < 0 or length < 0 or not _parent_is_node(edge):
        edge.node.stats.invalid_rd_operations += 1
        raise _error(errno.EIO)
    buf = bytearray(length)
    if offset < eof:
        _put(buf, 0, await pread(edge, offset, eof - offset))
    return buf


async def _pread_slow(
    drv: BlockDriver, offset: int, length: int, eof: int, align: int, max_transfer: int
) -> Buffer:
    end = offset + length
    max_chunk = effective_max(max_transfer, align)
    if align > 1 and not is_aligned(offset, end, align, eof):
        start, stop = aligned_span(offset, end, align, eof)
        data = await _read_range(drv, start, stop, max_chunk)
        return memoryview(data)[offset - start : end - start]
    return await _read_range(drv, offset, end, max_chunk)


async def _read_range(drv: BlockDriver, start: int, stop: int, max_chunk: int) -> Buffer:
    """An already aligned range, split at `max_chunk`."""
    total = stop - start
    if not max_chunk or total <= max_chunk:
        data = await drv.preadv(start, total)
        if len(data) != total:
            raise _error(errno.EIO)
        return data
    buf = bytearray(total)
    for pos, size in split(start, total, max_chunk):
        piece = await drv.preadv(pos, size)
        if len(piece) != size:
            raise _error(errno.EIO)
        _put(buf, pos - start, piece)
    return buf


# --- writes ------------------------------------------------------------------------------


async def pwrite(edge: BdrvChild, offset: int, data: Buffer, *, fua: bool = False) -> None:
    """Write `data` at `offset`: EPERM without WRITE, EIO outside the node.

    With detect-zeroes on, an all-zero payload becomes a zero write (may unmap when the node
    has detect-zeroes=unmap, which implies discard=unmap).
    """
    node = edge.node
    if not edge.perm._value_ & _WRITE or node.options.read_only:
        raise _error(errno.EPERM)
    drv = node.driver
    length = len(data)
    eof = drv.getlength()
    end = offset + length
    if offset < 0 or (end > eof and not _may_grow(edge)):
        node.stats.invalid_wr_operations += 1
        raise _error(errno.EIO)
    if not length:
        return
    if _threshold.ARMED:
        _threshold_check(node, drv, end)
    stats = node.stats
    opts = node.options
    state = node.io_state
    state.started += 1  # in flight: a drain (`settled`) waits for it
    started = _now()
    try:
        if opts.detect_zeroes != "off" and is_zero(data):
            await _zero_or_write(node, drv, offset, data, opts.detect_zeroes == "unmap", fua)
        else:
            max_transfer = drv.max_transfer
            if drv.request_alignment == 1 and (not max_transfer or length <= max_transfer):
                await drv.pwritev(offset, data, fua)  # type: ignore[arg-type]
            else:
                await _pwrite_slow(node, drv, offset, data, fua)
    except Exception:
        stats.failed_wr_operations += 1
        raise
    finally:
        # QEMU bumps the generation and the highest offset whether or not the write worked,
        # and marks the dirty bitmaps too.
        write_done(node, offset, end)
        _ended(state)
    stats.wr_operations += 1
    stats.wr_bytes += length
    stats.wr_total_time_ns += _now() - started


def _write_hook(edge: BdrvChild, name: str, offset: int, end: int) -> Any:
    """The driver's optional method `name` for a write of `[offset, end)` that may skip the
    awaited path, or None (the driver has none, or the write needs that path: errors and
    growth, detect-zeroes, padding, the write threshold, a split at max_transfer). The
    checks of `pwrite_now` and `pwrite_start`; EPERM as `pwrite`."""
    node = edge.node
    drv = node.driver
    hook = getattr(drv, name, None)
    if hook is None:
        return None
    if not edge.perm._value_ & _WRITE or node.options.read_only:
        raise _error(errno.EPERM)
    length = end - offset
    if offset < 0 or not length or end > drv.getlength():
        return None
    if node.options.detect_zeroes != "off" or drv.request_alignment != 1 or _threshold.ARMED:
        return None
    max_transfer = drv.max_transfer
    return hook if not max_transfer or length <= max_transfer else None


def pwrite_now(edge: BdrvChild, offset: int, data: Buffer, *, fua: bool = False) -> bool:
    """`pwrite` done without waiting, or False when some layer would have to wait (nothing
    was written, nothing counted: await `pwrite`). Drivers take part through an optional
    `pwritev_now(offset, data, fua)` returning False when they cannot (tmpfs writes do).
    Checks and errors as `pwrite`; detect-zeroes payloads are left to `pwrite`.
    """
    length = len(data)
    end = offset + length
    probe = _write_hook(edge, "pwritev_now", offset, end)
    if probe is None:
        return False
    node = edge.node
    stats = node.stats
    started = _now()
    try:
        if not probe(offset, data, fua):
            return False
    except Exception:
        stats.failed_wr_operations += 1
        node.io_state.write_gen += 1
        if end > stats.wr_highest_offset:
            stats.wr_highest_offset = end
        if _bitmaps.ARMED:
            _bitmaps.mark(node, offset, length)
        raise
    node.io_state.write_gen += 1
    if _bitmaps.ARMED:
        _bitmaps.mark(node, offset, length)
    if end > stats.wr_highest_offset:
        stats.wr_highest_offset = end
    stats.wr_operations += 1
    stats.wr_bytes += length
    stats.wr_total_time_ns += _now() - started
    return True


WriteDone = Callable[[BaseException | None], None]


async def settled(node: BlockNode) -> None:
    """Return once every write, zero write and discard in flight through `node` has ended
    (awaited ones, and those `pwrite_start` began): what qsd's drain waits for before a
    graph change (a mirror's first scan, a snapshot, a resize, an inactivation), so that no
    write lands behind the back of the node's new users. Returns without yielding when none
    is in flight. Requests a filter queues (throttle) are let go by the drained section
    that calls this first."""
    state = node.io_state
    while state.started:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.settle_waiters.append(partial(_resolve, waiter))
        await waiter


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _ended(state: IoState) -> None:
    """One write in flight through the node of `state` has ended."""
    state.started -= 1
    if not state.started and state.settle_waiters:
        _wake_settled(state)


def _wake_settled(state: IoState) -> None:
    waiters, state.settle_waiters = state.settle_waiters, []
    for wake in waiters:
        wake()


def pwrite_start(edge: BdrvChild, offset: int, data: Buffer, done: WriteDone) -> bool:
    """Start `pwrite` without a coroutine where a driver can finish it on its own and call
    back, or return False (nothing done: `pwrite_now`, then `pwrite`). Drivers take part
    through an optional `pwritev_start(offset, data, fua, done)` (the file driver's writer
    thread: large tmpfs writes, buffered ones elsewhere; qcow2 passes on writes into
    allocated clusters). Checks as `pwrite_now`; `done(None)` or `done(error)` follows on the
    loop once the write ended, accounted as `pwrite` accounts it. No FUA: those sync.
    """
    length = len(data)
    end = offset + length
    start = _write_hook(edge, "pwritev_start", offset, end)
    if start is None:
        return False
    node = edge.node
    drv = node.driver
    state = node.io_state
    started = _now()

    def written(error: BaseException | None) -> None:
        state.started -= 1  # (`_ended`, inlined)
        if not state.started and state.settle_waiters:
            _wake_settled(state)
        # write_done and pwrite's accounting, inlined: this runs for every large NBD write.
        state.write_gen += 1
        stats = node.stats
        if end > stats.wr_highest_offset:
            stats.wr_highest_offset = end
        if _bitmaps.ARMED:
            _mark_dirty(node, drv, offset, end)
        if error is None:
            stats.wr_operations += 1
            stats.wr_bytes += length
            stats.wr_total_time_ns += _now() - started
        else:
            stats.failed_wr_operations += 1
        done(error)

    state.started += 1
    try:
        if start(offset, data, False, written):
            return True
    except Exception:
        _ended(state)
        node.stats.failed_wr_operations += 1
        write_done(node, offset, end)
        raise
    _ended(state)
    return False


def write_prepare(node: BlockNode, end: int) -> None:
    """What `pwrite` does before a write that takes another way to the driver (copy offload,
    compressed writes): the write threshold."""
    if _threshold.ARMED:
        _threshold_check(node, node.driver, end)


def write_done(node: BlockNode, offset: int, end: int) -> None:
    """What every write records after it ran, whether or not it worked (`pwrite`,
    `pwrite_zeroes`, copy offload, compressed writes): the node's write generation, its
    highest offset, and its dirty bitmaps."""
    node.io_state.write_gen += 1
    stats = node.stats
    if end > stats.wr_highest_offset:
        stats.wr_highest_offset = end
    if _bitmaps.ARMED:
        _mark_dirty(node, node.driver, offset, end)


def _mark_dirty(node: BlockNode, drv: BlockDriver, offset: int, end: int) -> None:
    """Dirty bitmaps: qsd marks a write's range after padding it to request_alignment."""
    align = drv.request_alignment
    if align > 1:
        offset, end = align_down(offset, align), align_up(end, align)
    _bitmaps.mark(node, offset, end - offset)


def _threshold_check(node: BlockNode, drv: BlockDriver, end: int) -> None:
    """block-set-write-threshold: qsd checks a write's end after padding it to the node's
    request_alignment."""
    align = drv.request_alignment
    _threshold.check(node, align_up(end, align) if align > 1 else end)


async def _wait_conflicts(tracker: RequestTracker, req: TrackedRequest) -> None:
    """Wait until every earlier conflicting request has finished."""
    blockers = tracker.conflicts(req)
    if not blockers:
        return
    loop = asyncio.get_running_loop()
    for other in blockers:
        if other.done:
            continue
        waiter: asyncio.Future[None] = loop.create_future()
        other.waiters.append(partial(_wake, waiter))
        await waiter


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _pwrite_slow(
    node: BlockNode, drv: BlockDriver, offset: int, data: Buffer, fua: bool
) -> None:
    align = drv.request_alignment
    max_chunk = effective_max(drv.max_transfer, align)
    end = offset + len(data)
    if align == 1:
        await _write_range(drv, offset, data, fua, max_chunk)
        return
    tracker = node.io_state.tracker
    eof = drv.getlength()
    if is_aligned(offset, end, align, eof):
        req = tracker.begin(offset, end, False)
        try:
            await _wait_conflicts(tracker, req)
            await _write_range(drv, offset, data, fua, max_chunk)
        finally:
            tracker.finish(req)
        return
    # Read-modify-write: serialise over the whole padded range (a superset of the span,
    # which is recomputed after waiting, when EOF may have moved).
    req = tracker.begin(align_down(offset, align), align_up(end, align), True)
    try:
        await _wait_conflicts(tracker, req)
        eof = drv.getlength()
        start, stop = aligned_span(offset, end, align, eof)
        buf = bytearray(stop - start)
        head_end = min(start + align, stop)
        if offset > start:
            await _fill(drv, buf, start, start, head_end, eof)
        tail_start = align_down(end, align)
        if end < stop and not (offset > start and tail_start < head_end):
            await _fill(drv, buf, start, tail_start, stop, eof)
        _put(buf, offset - start, data)
        await _write_range(drv, start, buf, fua, max_chunk)
    finally:
        tracker.finish(req)


async def _fill(
    drv: BlockDriver, buf: bytearray, base: int, start: int, stop: int, eof: int
) -> None:
    """Read `[start, stop)` into `buf` (which holds `base`...); past EOF stays zero."""
    stop = min(stop, eof)
    if start >= stop:
        return
    data = await drv.preadv(start, stop - start)
    if len(data) != stop - start:
        raise _error(errno.EIO)
    _put(buf, start - base, data)


async def _write_range(
    drv: BlockDriver, offset: int, data: Buffer, fua: bool, max_chunk: int
) -> None:
    if not max_chunk or len(data) <= max_chunk:
        await drv.pwritev(offset, data, fua)  # type: ignore[arg-type]
        return
    view = memoryview(data)
    for pos, size in split(offset, len(view), max_chunk):
        await drv.pwritev(pos, view[pos - offset : pos - offset + size], fua)


# --- zeroes ------------------------------------------------------------------------------


def _native_zeroes(drv: BlockDriver) -> bool:
    """Whether the driver has its own zero write (the ABC's default writes a zero buffer)."""
    return type(drv).pwrite_zeroes is not BlockDriver.pwrite_zeroes


async def _zero_or_write(
    node: BlockNode, drv: BlockDriver, offset: int, data: Buffer, may_unmap: bool, fua: bool
) -> None:
    """detect-zeroes: a zero write when the driver has one, else the payload as it is."""
    if _native_zeroes(drv):
        unmap = may_unmap and node.options.discard == "unmap"
        await _write_zeroes(node, drv, offset, len(data), unmap, fua, False)
    elif drv.request_alignment == 1 and (not drv.max_transfer or len(data) <= drv.max_transfer):
        await drv.pwritev(offset, data, fua)  # type: ignore[arg-type]
    else:
        await _pwrite_slow(node, drv, offset, data, fua)


async def pwrite_zeroes(
    edge: BdrvChild,
    offset: int,
    length: int,
    *,
    may_unmap: bool = False,
    fua: bool = False,
    fast_only: bool = False,
) -> None:
    """Make `[offset, offset+length)` read as zeroes.

    `may_unmap` lets the driver deallocate (only when the node has discard=unmap).
    `fast_only` fails with ENOTSUP instead of writing a zero buffer, and for requests not
    aligned to the driver (QEMU's BDRV_REQ_NO_FALLBACK, NBD's FAST_ZERO).
    """
    node = edge.node
    _check_writer(edge)
    drv = node.driver
    eof = drv.getlength()
    end = offset + length
    if offset < 0 or length < 0 or (end > eof and not _may_grow(edge)):
        node.stats.invalid_wr_operations += 1
        raise _error(errno.EIO)
    if not length:
        return
    if _threshold.ARMED:
        _threshold_check(node, drv, end)
    fast_only = fast_only or _NO_FALLBACK.get()
    unmap = may_unmap and node.options.discard == "unmap"
    stats = node.stats
    state = node.io_state
    state.started += 1  # in flight: a drain (`settled`) waits for it
    started = _now()
    token = _NO_FALLBACK.set(True) if fast_only else None
    try:
        await _write_zeroes(node, drv, offset, length, unmap, fua, fast_only)
    except Exception:
        stats.failed_wr_operations += 1
        raise
    finally:
        if token is not None:
            _NO_FALLBACK.reset(token)
        write_done(node, offset, end)
        _ended(state)
    stats.wr_operations += 1
    stats.wr_bytes += length
    stats.wr_total_time_ns += _now() - started


async def _write_zeroes(
    node: BlockNode,
    drv: BlockDriver,
    offset: int,
    length: int,
    unmap: bool,
    fua: bool,
    fast_only: bool,
) -> None:
    align = drv.request_alignment
    max_chunk = effective_max(drv.max_transfer, align)
    native = _native_zeroes(drv)
    end = offset + length
    eof = drv.getlength()
    aligned = align == 1 or is_aligned(offset, end, align, eof)
    if fast_only and not (native and aligned):
        raise _error(errno.ENOTSUP)
    if align == 1:
        await _zero_range(drv, offset, end, unmap, fua, max_chunk, native, fast_only)
        return
    tracker = node.io_state.tracker
    if aligned:
        req = tracker.begin(offset, end, False)
    else:
        req = tracker.begin(align_down(offset, align), align_up(end, align), True)
    try:
        await _wait_conflicts(tracker, req)
        if aligned:
            await _zero_range(drv, offset, end, unmap, fua, max_chunk, native, fast_only)
            return
        eof = drv.getlength()
        start, stop = aligned_span(offset, end, align, eof)
        head_end = min(start + align, stop) if offset > start else start
        tail_start = align_down(end, align) if end < stop else stop
        if tail_start < head_end:
            tail_start = head_end  # head and tail share one block: the head RMW covers it
        if head_end > start:
            await _zero_partial(drv, start, head_end, offset, end, fua, eof)
        if tail_start > head_end:
            await _zero_range(drv, head_end, tail_start, unmap, fua, max_chunk, native, False)
        if stop > tail_start and end < stop:
            await _zero_partial(drv, tail_start, stop, offset, end, fua, eof)
    finally:
        tracker.finish(req)


async def _zero_partial(
    drv: BlockDriver, start: int, stop: int, offset: int, end: int, fua: bool, eof: int
) -> None:
    """Read-modify-write one block `[start, stop)`, zeroing its part inside `[offset, end)`."""
    buf = bytearray(stop - start)
    await _fill(drv, buf, start, start, stop, eof)
    lo = max(offset, start) - start
    hi = min(end, stop) - start
    _put(buf, lo, _ZEROES_VIEW[: hi - lo] if hi - lo <= _ZERO_CHUNK else bytes(hi - lo))
    await drv.pwritev(start, buf, fua)  # type: ignore[arg-type]


async def _zero_range(
    drv: BlockDriver,
    start: int,
    stop: int,
    unmap: bool,
    fua: bool,
    max_chunk: int,
    native: bool,
    fast_only: bool,
) -> None:
    """Zero an aligned range with the driver's zero write, or by writing zero buffers."""
    pos = start
    if native:
        try:
            for pos, size in split(start, stop - start, max_chunk):
                await drv.pwrite_zeroes(pos, size, unmap, fua)
            return
        except OSError as err:
            # QEMU falls back to writing zeroes when the driver cannot zero this range.
            if err.errno != errno.ENOTSUP or fast_only:
                raise
    elif fast_only:
        raise _error(errno.ENOTSUP)
    chunk = _ZERO_CHUNK if not max_chunk else min(max_chunk, _ZERO_CHUNK)
    align = drv.request_alignment
    chunk = max(align, chunk - chunk % align)
    zeroes = _ZEROES_VIEW[:chunk] if chunk <= _ZERO_CHUNK else memoryview(bytes(chunk))
    for piece, size in split(pos, stop - pos, chunk):
        await drv.pwritev(piece, zeroes[:size], fua)


# --- discard -----------------------------------------------------------------------------


async def pdiscard(edge: BdrvChild, offset: int, length: int) -> None:
    """Let the node deallocate a range: a no-op unless the node has discard=unmap.

    Partial blocks at the ends are dropped (discard is advisory), and ENOTSUP from the driver
    counts as success, as in QEMU.
    """
    node = edge.node
    _check_writer(edge)
    drv = node.driver
    eof = drv.getlength()
    end = offset + length
    if offset < 0 or length < 0 or end > eof:
        node.stats.invalid_unmap_operations += 1
        raise _error(errno.EIO)
    if not length:
        return
    stats = node.stats
    started = _now()
    try:
        if node.options.discard == "unmap":
            if _threshold.ARMED:
                _threshold.check(node, end)  # unpadded: qsd checks discards as asked
            state = node.io_state
            state.started += 1  # in flight: a drain (`settled`) waits for it
            try:
                await _discard(node, drv, offset, end, eof)
            finally:
                _ended(state)
                if _bitmaps.ARMED:
                    _bitmaps.mark(node, offset, length)  # as asked, like qsd
    except Exception:
        stats.failed_unmap_operations += 1
        raise
    stats.unmap_operations += 1
    stats.unmap_bytes += length
    stats.unmap_total_time_ns += _now() - started


async def _discard(node: BlockNode, drv: BlockDriver, offset: int, end: int, eof: int) -> None:
    align = drv.request_alignment
    start, stop = discard_span(offset, end, align, eof) if align > 1 else (offset, end)
    if start >= stop:
        return
    tracker = node.io_state.tracker
    req = tracker.begin(start, stop, False) if align > 1 else None
    try:
        if req is not None:
            await _wait_conflicts(tracker, req)
        for pos, size in split(start, stop - start, effective_max(drv.max_transfer, align)):
            await drv.pdiscard(pos, size)
    except OSError as err:
        if err.errno != errno.ENOTSUP:
            raise
    finally:
        if req is not None:
            tracker.finish(req)
        node.io_state.write_gen += 1


# --- flush -------------------------------------------------------------------------------


async def flush(edge: BdrvChild) -> None:
    """Write the node's caches back, then its children's (those it may write through).

    cache.no-flush skips the node's own flush but not its children's (which inherit the
    option unless set otherwise); a read-only node has nothing to flush.
    """
    await _flush_node(edge.node)


async def flush_node(node: BlockNode) -> None:
    """`flush` for a caller holding no edge (blockdev-reopen, before a node turns read-only)."""
    await _flush_node(node)


async def _flush_node(node: BlockNode) -> None:
    if node.options.read_only:
        return
    stats = node.stats
    state = node.io_state
    drv = node.driver
    gen = state.write_gen
    started = _now()
    try:
        # Drivers that keep the ABC's pass-through flush own no cache: the walk below
        # reaches their children through this layer, with the children's options.
        if (
            not node.options.cache_no_flush
            and gen != state.flushed_gen
            and type(drv).flush is not BlockDriver.flush
        ):
            await drv.flush()
        failure: OSError | None = None
        for child in list(node.children):
            if child.perm._value_ & _FLUSHED_CHILD:
                try:
                    await _flush_node(child.node)
                except OSError as err:
                    failure = failure or err
        if failure is not None:
            raise failure
    except Exception:
        stats.failed_flush_operations += 1
        raise
    state.flushed_gen = max(state.flushed_gen, gen)
    stats.flush_operations += 1
    stats.flush_total_time_ns += _now() - started


# --- resize ------------------------------------------------------------------------------


async def truncate(edge: BdrvChild, size: int, *, exact: bool = False) -> None:
    """Resize the node (block_resize). Needs RESIZE on the edge.

    Errors carry QEMU's texts: EINVAL "Image size cannot be negative", EACCES "Image is
    read-only", EPERM without RESIZE (a caller bug). A driver without resize support raises
    its QmpError unchanged. `exact` is accepted for the API; drivers do not receive it yet.
    """
    node = edge.node
    if size < 0:
        raise OSError(errno.EINVAL, "Image size cannot be negative")
    if node.options.read_only:
        raise OSError(errno.EACCES, "Image is read-only")
    if not edge.perm._value_ & _RESIZE:
        raise _error(errno.EPERM)
    try:
        await node.driver.truncate(size)
    finally:
        node.io_state.write_gen += 1
        if _bitmaps.ARMED:
            _bitmaps.resize(node)
