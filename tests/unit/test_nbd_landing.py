"""WRITE payloads landing in place: after a large WRITE, the next header and payload are received
into one buffer (one recv, no copy), and any other input still gives the same events.

Unit ring: the NBD core fed the way a transport feeds it (`get_buffer` / `buffer_updated`, any
split of the stream), compared with the same stream fed in one piece by `receive_data`.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.export.nbd.constants import REQUEST_MAGIC, Cmd, Opt
from storage_daemon.export.nbd.protocol import ExportInfo, Request, ServerConnection

KiB = 1024
IHAVEOPT = 0x49484156454F5054
SIZE = 4 * 1024 * KiB


def _connection() -> ServerConnection:
    c = ServerConnection({"x": ExportInfo("x", SIZE)})
    c.start()
    c.receive_data(struct.pack(">I", 3))
    body = struct.pack(">I", 1) + b"x" + struct.pack(">H", 0)
    c.receive_data(struct.pack(">QII", IHAVEOPT, Opt.GO, len(body)) + body)
    c.data_to_send()
    return c


def _req(cmd: int, cookie: int, offset: int, length: int, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, length) + data


def _record(events: list[object], out: list[tuple[object, ...]]) -> None:
    for e in events:
        if isinstance(e, Request):
            payload = None if e.payload is None else bytes(e.payload)
            out.append((e.cookie, e.command, e.offset, e.length, payload))
            e.payload = None  # dropped, as the server drops it: the memory may be reused
        else:
            out.append((e,))


def _fed_whole(stream: bytes) -> tuple[list[tuple[object, ...]], bytes]:
    c = _connection()
    events: list[tuple[object, ...]] = []
    _record(list(c.receive_data(stream)), events)
    return events, c.data_to_send()


def _fed_by_recv(stream: bytes, sizes: list[int]) -> tuple[list[tuple[object, ...]], bytes]:
    """As a transport: each recv fills at most `sizes[i]` bytes of the buffer it was given."""
    c = _connection()
    events: list[tuple[object, ...]] = []
    out = b""
    pos, i = 0, 0
    while pos < len(stream):
        view = c.get_buffer(-1)
        n = min(len(view), len(stream) - pos, sizes[i % len(sizes)] if sizes else len(view))
        i += 1
        view[:n] = stream[pos : pos + n]
        pos += n
        del view
        _record(list(c.buffer_updated(n)), events)
        out += c.data_to_send()
    return events, out


_LENGTHS = [64 * KiB, 96 * KiB, 160 * KiB]
_request = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(_LENGTHS)),
    st.tuples(st.just("bad-write"), st.sampled_from(_LENGTHS)),  # past the end: EINVAL, drained
    st.tuples(st.just("small-write"), st.integers(1, 4 * KiB)),
    st.tuples(st.just("read"), st.sampled_from([512, 256 * KiB])),
    st.tuples(st.just("flush"), st.just(0)),
)


def _stream(reqs: list[tuple[str, int]]) -> bytes:
    parts = []
    for cookie, (kind, length) in enumerate(reqs):
        fill = bytes([cookie % 251 + 1]) * length
        if kind in ("write", "small-write"):
            parts.append(_req(Cmd.WRITE, cookie, 4096 * cookie, length, fill))
        elif kind == "bad-write":
            parts.append(_req(Cmd.WRITE, cookie, SIZE - 512, length, fill))
        elif kind == "read":
            parts.append(_req(Cmd.READ, cookie, 0, length))
        else:
            parts.append(_req(Cmd.FLUSH, cookie, 0, 0))
    return b"".join(parts) + _req(Cmd.DISC, 999, 0, 0)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(_request, min_size=1, max_size=8),
    st.lists(st.sampled_from([1, 20, 28, 29, 4096, 65536, 100_000, 1 << 20]), max_size=6),
)
def test_any_recv_pattern_gives_the_events_of_the_whole_stream(
    reqs: list[tuple[str, int]], sizes: list[int]
) -> None:
    stream = _stream(reqs)
    expected = _fed_whole(stream)
    assert _fed_by_recv(stream, sizes) == expected
    cookies = [e[0] for e in expected[0] if len(e) > 1]
    assert cookies == [i for i, (kind, _) in enumerate(reqs) if kind != "bad-write"]


def test_the_next_large_write_lands_in_place_in_one_recv() -> None:
    c = _connection()
    size = 256 * KiB
    first = _req(Cmd.WRITE, 1, 0, size, b"\x01" * size)
    # The first large WRITE: header into the shared buffer, payload into its own buffer.
    assert _fed_by_recv_into(c, first) == [1]
    # From now on one buffer holds the header and the payload: one recv, no copy.
    for cookie in (2, 3, 4):
        view = c.get_buffer(-1)
        assert len(view) == 28 + size
        view[:] = _req(Cmd.WRITE, cookie, 0, size, bytes([cookie]) * size)
        events = c.buffer_updated(len(view))
        assert len(events) == 1 and isinstance(events[0], Request)
        payload = events[0].payload
        assert payload is not None and payload.obj is view.obj  # in place
        assert bytes(payload) == bytes([cookie]) * size
        del view, payload, events
    # A READ arrives instead: still parsed, and the guess stops after it.
    view = c.get_buffer(-1)
    n = 28 * 3
    view[:n] = _req(Cmd.READ, 5, 0, 512) + _req(Cmd.READ, 6, 0, 512) + _req(Cmd.FLUSH, 7, 0, 0)
    events = c.buffer_updated(n)
    assert [e.cookie for e in events if isinstance(e, Request)] == [5, 6, 7]
    del view
    assert len(c.get_buffer(-1)) != 28 + size


def _fed_by_recv_into(c: ServerConnection, data: bytes) -> list[int]:
    cookies: list[int] = []
    pos = 0
    while pos < len(data):
        view = c.get_buffer(-1)
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        pos += n
        del view
        cookies += [e.cookie for e in c.buffer_updated(n) if isinstance(e, Request)]
    return cookies


def test_a_held_payload_is_not_overwritten_by_the_landing_buffer() -> None:
    c = _connection()
    size = 128 * KiB  # more than the shared receive buffer holds after a header
    assert _fed_by_recv_into(c, _req(Cmd.WRITE, 1, 0, size, b"\x01" * size)) == [1]
    held = []
    for cookie in range(2, 8):  # payloads kept (a write still running): fresh memory each time
        view = c.get_buffer(-1)
        view[:] = _req(Cmd.WRITE, cookie, 0, size, bytes([cookie]) * size)
        (event,) = c.buffer_updated(len(view))
        assert isinstance(event, Request) and event.payload is not None
        held.append(event.payload)
        del view, event
    for cookie, payload in zip(range(2, 8), held, strict=True):
        assert bytes(payload) == bytes([cookie]) * size
