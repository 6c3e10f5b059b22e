"""Recycled NBD payload buffers: never reused while anyone holds them, reused once dropped.

Unit ring: `BufferPool` alone (any sequence of takes and drops, by hypothesis), then the NBD
core handing out large WRITE payloads from it (a payload still held is never overwritten).
"""

from __future__ import annotations

import gc
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.export.nbd.buffers import BufferPool
from storage_daemon.export.nbd.constants import REQUEST_MAGIC, Cmd, Opt
from storage_daemon.export.nbd.protocol import ExportInfo, Request, ServerConnection

KiB = 1024
IHAVEOPT = 0x49484156454F5054


def test_small_and_huge_sizes_are_never_kept() -> None:
    pool = BufferPool(min_size=64 * KiB, max_bytes=1024 * KiB)
    small = pool.get(4 * KiB)
    assert len(small) == 4 * KiB and pool.kept == 0
    del small
    huge = pool.get(2048 * KiB)
    assert len(huge) == 2048 * KiB and pool.kept == 0


def test_a_dropped_buffer_is_reused_a_held_one_is_not() -> None:
    pool = BufferPool()
    first = pool.get(256 * KiB)
    ident = id(first)
    view = memoryview(first)[10:20]  # a view keeps the buffer busy too
    del first
    second = pool.get(256 * KiB)
    assert id(second) != ident
    del view
    third = pool.get(256 * KiB)
    assert id(third) == ident  # idle again: the same memory comes back
    assert pool.kept == 512 * KiB


def test_the_pool_keeps_at_most_max_bytes_and_makes_room_from_idle_buffers() -> None:
    pool = BufferPool(min_size=64 * KiB, max_bytes=512 * KiB)
    held = [pool.get(256 * KiB), pool.get(256 * KiB)]
    extra = pool.get(256 * KiB)  # full and all busy: handed out, not kept
    assert pool.kept == 512 * KiB
    ident = id(extra)
    del extra
    assert id(pool.get(256 * KiB)) != ident
    held.pop()  # one idle 256 KiB buffer: replaced by a 128 KiB one
    other = pool.get(128 * KiB)
    assert len(other) == 128 * KiB and pool.kept == 384 * KiB
    pool.clear()
    assert pool.kept == 0 and len(held[0]) == 256 * KiB


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from([64 * KiB, 128 * KiB, 256 * KiB]), st.integers()),
        max_size=40,
    )
)
def test_no_buffer_is_handed_out_twice_while_held(ops: list[tuple[bool, int, int]]) -> None:
    pool = BufferPool(min_size=64 * KiB, max_bytes=512 * KiB)
    held: list[bytearray] = []
    for take, size, pick in ops:
        if take or not held:
            buf = pool.get(size)
            assert len(buf) == size
            assert all(buf is not h for h in held)
            held.append(buf)
        else:
            held.pop(pick % len(held))
        assert pool.kept <= 512 * KiB


# --- the NBD core's WRITE payloads ------------------------------------------------------------


def _connection() -> ServerConnection:
    exports = {"x": ExportInfo("x", 64 * 1024 * KiB)}
    c = ServerConnection(exports)
    c.start()
    c.receive_data(struct.pack(">I", 3))
    name = b"x"
    body = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    c.receive_data(struct.pack(">QII", IHAVEOPT, Opt.GO, len(body)) + body)
    c.data_to_send()
    return c


def _write(c: ServerConnection, cookie: int, data: bytes) -> Request:
    header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, cookie, 0, len(data))
    events = c.receive_data(header + data)
    assert len(events) == 1 and isinstance(events[0], Request)
    req = events[0]
    assert req.payload is not None and bytes(req.payload) == data
    return req


def test_a_held_payload_is_never_overwritten_by_the_next_write() -> None:
    c = _connection()
    size = 256 * KiB  # larger than the receive buffer: a dedicated payload buffer
    first = _write(c, 1, b"\x01" * size)
    kept = first.payload
    assert kept is not None
    second = _write(c, 2, b"\x02" * size)
    assert bytes(kept) == b"\x01" * size
    assert second.payload is not None and second.payload.obj is not kept.obj
    # Once every reference is gone, the next payload reuses that memory.
    reused = id(kept.obj)
    first.payload = None
    del kept
    gc.collect()
    third = _write(c, 3, b"\x03" * size)
    assert third.payload is not None and id(third.payload.obj) == reused
    assert bytes(second.payload) == b"\x02" * size
