"""Unit tests of the sans-IO NBD server core, joined in memory with a tiny client encoder.

Expected bytes and messages were captured from qemu-storage-daemon 7.2 with a raw-socket
prober (see the report); `test_bad_input_NN_*` follow nbd.md §5.2 item numbers.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.export.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    NbdErrno,
    Opt,
    Rep,
    ReplyType,
    nbd_errno,
)
from storage_daemon.export.nbd.protocol import (
    Close,
    Event,
    ExportInfo,
    HandshakeDone,
    MetaContext,
    NbdUsageError,
    Phase,
    Request,
    ServerConnection,
)

MiB = 1 << 20
RW = ExportInfo("x", 64 * MiB, description="hello")
RO = ExportInfo("y", MiB, read_only=True, allocation_depth=True, bitmaps=("bm0",))
EXPORTS = {"x": RW, "y": RO}

# --- client-side encoder/decoder ----------------------------------------------------------------


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def info(name: bytes, reqs: list[int] = []) -> bytes:  # noqa: B006
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(reqs))
        + b"".join(struct.pack(">H", r) for r in reqs)
    )


def meta(name: bytes, queries: list[bytes]) -> bytes:
    body = b"".join(struct.pack(">I", len(q)) + q for q in queries)
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + body


def req(
    cmd: int,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    cookie: int = 1,
    data: bytes = b"",
    magic: int = REQUEST_MAGIC,
) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        magic, o, t, n = struct.unpack_from(">QIII", data, pos)
        assert magic == OPTION_REPLY_MAGIC
        out.append((o, t, data[pos + 20 : pos + 20 + n]))
        pos += 20 + n
    return out


@dataclass
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes


def tx_replies(data: bytes, read_lengths: dict[int, int] | None = None) -> list[object]:
    """Decode replies; simple READ replies need the data length by cookie (read_lengths)."""
    out: list[object] = []
    pos = 0
    while pos < len(data):
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == SIMPLE_REPLY_MAGIC:
            _, err, cookie = struct.unpack_from(">IIQ", data, pos)
            pos += 16
            n = (read_lengths or {}).get(cookie, 0) if err == 0 else 0
            out.append(("simple", err, cookie, data[pos : pos + n]))
            pos += n
        else:
            assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            _, fl, t, cookie, n = struct.unpack_from(">IHHQI", data, pos)
            out.append(Chunk(fl, t, cookie, data[pos + 20 : pos + 20 + n]))
            pos += 20 + n
    return out


def err_chunk(c: object) -> tuple[int, bytes]:
    assert isinstance(c, Chunk) and c.type == ReplyType.ERROR and c.flags == 1
    err, n = struct.unpack_from(">IH", c.payload)
    return err, c.payload[6 : 6 + n]


def new(cflags: int = 3, exports: dict[str, ExportInfo] = EXPORTS, **kw: bool) -> ServerConnection:
    c = ServerConnection(exports, **kw)
    c.start()
    assert c.receive_data(struct.pack(">I", cflags)) == []
    return c


def ask(c: ServerConnection, data: bytes) -> tuple[list[Event], list[tuple[int, int, bytes]]]:
    ev = c.receive_data(data)
    return ev, option_replies(c.data_to_send())


def go(
    name: bytes = b"x", sr: bool = True, ctx: list[bytes] | None = None, **kw: bool
) -> ServerConnection:
    c = new(exports=EXPORTS, **kw)
    if sr:
        ask(c, opt(Opt.STRUCTURED_REPLY))
    if ctx is not None:
        ask(c, opt(Opt.SET_META_CONTEXT, meta(name, ctx)))
    ev, reps = ask(c, opt(Opt.GO, info(name)))
    assert isinstance(ev[0], HandshakeDone) and reps[-1][1] == Rep.ACK
    return c


def one(c: ServerConnection, data: bytes) -> Request:
    ev = c.receive_data(data)
    assert len(ev) == 1 and isinstance(ev[0], Request), ev
    assert c.data_to_send() == b""
    return ev[0]


def rejected(c: ServerConnection, data: bytes) -> tuple[int, bytes]:
    """Send a request that the core must refuse by itself; return (errno, message)."""
    assert c.receive_data(data) == []
    replies = tx_replies(c.data_to_send())
    assert len(replies) == 1
    r = replies[0]
    if isinstance(r, tuple):
        return r[1], b""
    return err_chunk(r)


def closed(events: list[Event]) -> Close:
    assert events and isinstance(events[-1], Close), events
    return events[-1]


# --- greeting and client flags --------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    c = ServerConnection(EXPORTS)
    assert c.phase is Phase.GREETING
    assert c.start() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    assert c.phase in (Phase.CLIENT_FLAGS,)
    with pytest.raises(NbdUsageError):
        c.start()


def test_receiving_before_start_is_misuse() -> None:
    c = ServerConnection(EXPORTS)
    with pytest.raises(NbdUsageError):
        c.receive_data(b"\0\0\0\3")
    with pytest.raises(NbdUsageError):
        c.receive_eof()


def test_bad_input_01_close_during_client_flags_or_http_garbage() -> None:
    c = ServerConnection(EXPORTS)
    c.start()
    assert c.receive_data(b"\0\0") == []
    ev = closed(c.receive_eof())
    assert ev.peer_error and c.phase is Phase.CLOSED
    assert c.receive_eof() == []
    c = ServerConnection(EXPORTS)
    c.start()
    ev = closed(c.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert ev.reason == "Unknown client flags 0x47455420 received" and ev.peer_error
    assert c.receive_data(b"more garbage") == []  # ignored once closed
    assert c.data_to_send() == b""


@pytest.mark.parametrize("flags", [4, 0x80000001, 0x7])
def test_bad_input_02_unknown_client_flags_disconnect(flags: int) -> None:
    c = ServerConnection(EXPORTS)
    c.start()
    ev = closed(c.receive_data(struct.pack(">I", flags)))
    assert ev.reason == f"Unknown client flags 0x{flags:x} received"


@pytest.mark.parametrize("flags", [0, 2])
def test_non_fixed_newstyle_allows_only_export_name(flags: int) -> None:
    c = new(flags)
    ev = closed(c.receive_data(opt(Opt.LIST)))
    assert ev.reason == "Unsupported option 3 (list)" and c.data_to_send() == b""
    c = new(flags)
    events = c.receive_data(opt(Opt.EXPORT_NAME, b"x"))
    assert isinstance(events[0], HandshakeDone)
    zeroes = 0 if flags & 2 else 124
    assert c.data_to_send() == struct.pack(">QH", 64 * MiB, 0x0D6D) + bytes(zeroes)


def test_bad_input_03_bad_option_magic_disconnects() -> None:
    c = new()
    ev = closed(c.receive_data(struct.pack(">QII", 0x1234, 3, 0)))
    assert ev.reason == "Bad magic received" and ev.peer_error


# --- options ----------------------------------------------------------------------------------


def test_bad_input_04_huge_option_length_disconnects_at_once() -> None:
    for length in (0xFFFFFFF0, 32 * MiB + 1):
        c = new()
        ev = closed(c.receive_data(struct.pack(">QII", IHAVEOPT, 99, length)))
        assert ev.reason == f"len ({length} ) is larger than max len (33554432)"


def test_option_of_exactly_32_mib_is_drained() -> None:
    c = new()
    assert c.receive_data(struct.pack(">QII", IHAVEOPT, 99, 32 * MiB)) == []
    chunk = bytes(MiB)
    for _ in range(32):
        view = c.get_buffer(-1)
        assert len(view) >= 1
        assert c.receive_data(chunk) == []
    assert option_replies(c.data_to_send()) == [
        (99, Rep.ERR_UNSUP, b"Unsupported option 99 (<unknown>)")
    ]


def test_bad_input_05_unknown_option_with_payload_drained_and_in_sync() -> None:
    c = new()
    ev, reps = ask(c, opt(99, b"a" * MiB) + opt(4) + opt(11) + opt(Opt.LIST))
    assert ev == []
    assert reps[:3] == [
        (99, Rep.ERR_UNSUP, b"Unsupported option 99 (<unknown>)"),
        (4, Rep.ERR_UNSUP, b"Unsupported option 4 (<unknown>)"),
        (11, Rep.ERR_UNSUP, b"Unsupported option 11 (<unknown>)"),
    ]
    assert [r[1] for r in reps[3:]] == [Rep.SERVER, Rep.SERVER, Rep.ACK]


def test_bad_input_06_payload_on_empty_options_and_abort_with_payload() -> None:
    c = new()
    _, reps = ask(
        c, opt(Opt.LIST, b"ab") + opt(Opt.STARTTLS, b"a") + opt(Opt.STRUCTURED_REPLY, b"z")
    )
    assert reps == [
        (3, Rep.ERR_INVALID, b"option 'list' has unexpected length"),
        (5, Rep.ERR_INVALID, b"option 'starttls' has unexpected length"),
        (8, Rep.ERR_INVALID, b"option 'structured reply' has unexpected length"),
    ]
    assert not c.structured_replies
    events, reps = ask(c, opt(Opt.ABORT, b"abc") + opt(Opt.LIST))
    assert reps == [(2, Rep.ACK, b"")]
    assert closed(events) == Close("client aborted the handshake", False)


def test_list_sends_every_export_with_description() -> None:
    _, reps = ask(new(), opt(Opt.LIST))
    assert reps == [
        (3, Rep.SERVER, b"\0\0\0\1xhello"),
        (3, Rep.SERVER, b"\0\0\0\1y"),
        (3, Rep.ACK, b""),
    ]


def test_info_replies_match_qsd() -> None:
    c = new()
    _, reps = ask(c, opt(Opt.INFO, info(b"x")))
    assert reps == [
        (6, Rep.INFO, b"\0\2hello"),
        (6, Rep.INFO, bytes.fromhex("0003 00000001 00001000 02000000")),
        (6, Rep.INFO, bytes.fromhex("0000 0000000004000000 0d6d")),
        (6, Rep.ACK, b""),
    ]
    # NAME first when asked; duplicates and unknown types ignored.
    _, reps2 = ask(c, opt(Opt.INFO, info(b"x", [1, 2, 3, 99, 1])))
    assert reps2[0] == (6, Rep.INFO, b"\0\1x") and reps2[1:] == reps
    _, reps = ask(c, opt(Opt.INFO, info(b"y", [0])))
    assert reps[-2] == (6, Rep.INFO, bytes.fromhex("0000 0000000000100000 050f"))
    assert c.phase is Phase.OPTIONS


def test_block_size_follows_request_alignment_as_qsd() -> None:
    """min = the export's alignment for INFO and for a GO that asked; else 1. preferred =
    max(4096, min). INFO without BLOCK_SIZE on an aligned export fails after the INFOs."""
    aligned = ExportInfo("c", 64 * MiB, block_size_min=65536)
    sizes = {
        (code, tuple(reqs)): ask(new(exports={"c": aligned}), opt(code, info(b"c", reqs)))[1]
        for code in (Opt.INFO, Opt.GO)
        for reqs in ([3], [])
    }
    asked_go = sizes[(Opt.GO, (3,))]
    big = bytes.fromhex("0003 00010000 00010000 02000000")
    small = bytes.fromhex("0003 00000001 00001000 02000000")
    assert sizes[(Opt.INFO, (3,))][0] == (6, Rep.INFO, big)
    assert sizes[(Opt.INFO, (3,))][-1] == (6, Rep.ACK, b"")
    assert sizes[(Opt.INFO, ())][0] == (6, Rep.INFO, big)
    assert sizes[(Opt.INFO, ())][-1] == (
        6,
        Rep.ERR_BLOCK_SIZE_REQD,
        b"request NBD_INFO_BLOCK_SIZE to use this export",
    )
    assert sizes[(Opt.GO, ())][0] == (7, Rep.INFO, small)
    assert asked_go[0] == (7, Rep.INFO, big) and asked_go[-1] == (7, Rep.ACK, b"")
    # A 512-byte alignment keeps the preferred size at 4096; alignment 1 never fails INFO.
    direct = ExportInfo("d", MiB, block_size_min=512)
    reps = ask(new(exports={"d": direct}), opt(Opt.INFO, info(b"d", [3])))[1]
    assert reps[0] == (6, Rep.INFO, bytes.fromhex("0003 00000200 00001000 02000000"))
    assert ask(new(), opt(Opt.INFO, info(b"x")))[1][-1] == (6, Rep.ACK, b"")


def test_go_enters_transmission_with_negotiated_state() -> None:
    c = new()
    ask(c, opt(Opt.STRUCTURED_REPLY))
    ask(c, opt(Opt.SET_META_CONTEXT, meta(b"y", [b"base:allocation", b"qemu:allocation-depth"])))
    ev, reps = ask(c, opt(Opt.GO, info(b"y")))
    assert reps[-2][2] == bytes.fromhex("0000 0000000000100000 058f")
    assert ev == [
        HandshakeDone(
            RO,
            True,
            (MetaContext(0, "base:allocation"), MetaContext(1, "qemu:allocation-depth")),
            0x058F,
        )
    ]
    assert c.phase is Phase.TRANSMISSION and c.handshake_done


def test_structured_reply_flags_and_repeat() -> None:
    c = new()
    _, reps = ask(c, opt(Opt.STRUCTURED_REPLY) + opt(Opt.STRUCTURED_REPLY))
    assert reps == [
        (8, Rep.ACK, b""),
        (8, Rep.ERR_INVALID, b"structured reply already negotiated"),
    ]
    _, reps = ask(c, opt(Opt.INFO, info(b"x")))
    assert reps[-2][2][-2:] == b"\x0d\xed"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (struct.pack(">I", 0xFFFFFFFF) + b"x\0\0", b"Invalid name length: 4294967295"),
        (struct.pack(">I", 10) + b"x\0\0", b"Inconsistent lengths in option info"),
        (
            struct.pack(">I", 1) + b"x" + struct.pack(">H", 5),
            b"Inconsistent lengths in option info",
        ),
        (struct.pack(">I", 1) + b"x\0\0zz", b"option 'info' has unexpected length"),
        (b"\0\0", b"Inconsistent lengths in option info"),
        (b"", b"Inconsistent lengths in option info"),
        (struct.pack(">I", 1) + b"x", b"Inconsistent lengths in option info"),
        (info(b"x" * 4097), b"Invalid name length: 4097"),
        (info(b"x" * 5000), b"Invalid name length: 5000"),
        (info(b"x\0"), b"Unexpected embedded NUL in option info"),
    ],
)
def test_bad_input_07_malformed_info_gets_err_invalid_and_stays_in_sync(
    payload: bytes, message: bytes
) -> None:
    c = new()
    for code in (Opt.INFO, Opt.GO):
        _, reps = ask(c, opt(code, payload) + opt(Opt.STRUCTURED_REPLY, b"!"))
        expected = message
        if code == Opt.GO:
            expected = message.replace(b"option info", b"option go").replace(b"'info'", b"'go'")
        assert reps[0] == (code, Rep.ERR_INVALID, expected)
        assert reps[1][1] == Rep.ERR_INVALID  # the next option was parsed in sync
    assert c.phase is Phase.OPTIONS


def test_bad_input_07_unknown_export_names() -> None:
    c = new()
    cases = [
        (b"nope", b"export 'nope' not present"),
        (b"", b"export '' not present"),
        (b"\xff", b"export '\xff' not present"),
        (b"a" * 79, b"export '" + b"a" * 79 + b"' not present"),
        (b"a" * 80, b"export '" + b"a" * 80 + b"...' not present"),
        (b"a" * 4096, b"export '" + b"a" * 80 + b"...' not present"),
    ]
    for name, message in cases:
        _, reps = ask(c, opt(Opt.GO, info(name, [1, 1, 7])))
        assert reps == [(7, Rep.ERR_UNKNOWN, message)]
    assert c.phase is Phase.OPTIONS


def test_info_payload_above_parse_limit_is_drained_and_refused() -> None:
    c = new()
    _, reps = ask(c, opt(Opt.INFO, b"\0" * (MiB + 1)) + opt(Opt.LIST))
    assert reps[0] == (6, Rep.ERR_TOO_BIG, b"option 'info' is too long")
    assert reps[-1] == (3, Rep.ACK, b"")


def _meta_names(reps: list[tuple[int, int, bytes]]) -> list[tuple[int, str]]:
    assert reps[-1][1] == Rep.ACK
    out = []
    for _, t, p in reps[:-1]:
        assert t == Rep.META_CONTEXT
        out.append((struct.unpack_from(">I", p)[0], p[4:].decode()))
    return out


LIST_CASES = [
    # (export, queries, listed names) — observed on qsd 7.2 (bitmaps by analogy)
    (b"x", [], ["base:allocation"]),
    (b"x", [b"base:"], ["base:allocation"]),
    (b"x", [b"qemu:"], []),
    (b"x", [b"qemu:allocation-depth"], []),
    (b"y", [], ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:bm0"]),
    (b"y", [b"base:"], ["base:allocation"]),
    (b"y", [b"qemu:"], ["qemu:allocation-depth", "qemu:dirty-bitmap:bm0"]),
    (b"y", [b"qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:bm0"]),
    (
        b"y",
        [b"qemu:", b"base:"],
        ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:bm0"],
    ),
    (b"y", [b"base:allocation", b"base:allocation"], ["base:allocation"]),
    (b"y", [b"foo"], []),
    (b"y", [b"base:foo"], []),
    (b"y", [b""], []),
    (b"y", [b"qemu:alloc"], []),
    (b"y", [b"qemu:allocation-depth:x"], []),
    (b"y", [b"qemu:" + b"a" * 5000], []),
]


@pytest.mark.parametrize(("name", "queries", "names"), LIST_CASES)
def test_list_meta_context(name: bytes, queries: list[bytes], names: list[str]) -> None:
    c = new()  # LIST_META_CONTEXT works without structured replies, as on qsd
    _, reps = ask(c, opt(Opt.LIST_META_CONTEXT, meta(name, queries)))
    assert _meta_names(reps) == [(0, n) for n in names]


SET_CASES = [
    (b"x", [], []),
    (b"x", [b"base:"], []),
    (b"x", [b"qemu:allocation-depth"], []),
    (b"x", [b"base:allocation", b"qemu:allocation-depth"], [(0, "base:allocation")]),
    (b"y", [b"qemu:"], []),
    (b"y", [b"qemu:dirty-bitmap:"], []),
    (b"y", [b"qemu:allocation-depth"], [(1, "qemu:allocation-depth")]),
    (
        b"y",
        [b"qemu:dirty-bitmap:bm0", b"qemu:allocation-depth", b"base:allocation"],
        [(0, "base:allocation"), (1, "qemu:allocation-depth"), (2, "qemu:dirty-bitmap:bm0")],
    ),
]


@pytest.mark.parametrize(("name", "queries", "selected"), SET_CASES)
def test_set_meta_context(
    name: bytes, queries: list[bytes], selected: list[tuple[int, str]]
) -> None:
    c = new()
    ask(c, opt(Opt.STRUCTURED_REPLY))
    _, reps = ask(c, opt(Opt.SET_META_CONTEXT, meta(name, queries)))
    assert _meta_names(reps) == selected
    ev, _ = ask(c, opt(Opt.GO, info(name)))
    assert isinstance(ev[0], HandshakeDone)
    assert [(m.id, m.name) for m in ev[0].meta_contexts] == selected


def test_meta_contexts_do_not_carry_over_to_another_export() -> None:
    c = new()
    ask(c, opt(Opt.STRUCTURED_REPLY))
    ask(c, opt(Opt.SET_META_CONTEXT, meta(b"y", [b"base:allocation"])))
    ev, _ = ask(c, opt(Opt.GO, info(b"x")))
    assert isinstance(ev[0], HandshakeDone) and ev[0].meta_contexts == ()
    assert rejected(c, req(Cmd.BLOCK_STATUS, 0, 1)) == (22, b"CMD_BLOCK_STATUS not negotiated")


def test_bad_input_08_malformed_meta_context_options() -> None:
    c = new()
    _, reps = ask(c, opt(Opt.SET_META_CONTEXT, meta(b"x", [b"base:allocation"])))
    assert reps == [
        (
            10,
            Rep.ERR_INVALID,
            b"request option 'set meta context' when structured reply is not negotiated",
        )
    ]
    ask(c, opt(Opt.STRUCTURED_REPLY))
    lm = b"Inconsistent lengths in option list meta context"
    cases = [
        (Opt.LIST_META_CONTEXT, struct.pack(">I", 100) + b"x", lm),
        (Opt.LIST_META_CONTEXT, meta(b"x", [b"base:allocation"])[:-3], lm),
        (Opt.LIST_META_CONTEXT, struct.pack(">I", 1) + b"y" + struct.pack(">I", 0xFFFFFFFF), lm),
        (
            Opt.LIST_META_CONTEXT,
            struct.pack(">I", 1) + b"y" + struct.pack(">II", 2, 3) + b"foo",
            lm,
        ),
        (Opt.LIST_META_CONTEXT, struct.pack(">I", 1) + b"y", lm),
        (Opt.LIST_META_CONTEXT, meta(b"x" * 5000, []), b"Invalid name length: 5000"),
        (
            Opt.LIST_META_CONTEXT,
            meta(b"y", [b"qemu:allocation-depth\0"]),
            b"Unexpected embedded NUL in option list meta context",
        ),
        (
            Opt.SET_META_CONTEXT,
            struct.pack(">I", 1) + b"y" + struct.pack(">II", 2, 3) + b"foo",
            b"Inconsistent lengths in option set meta context",
        ),
    ]
    for code, payload, message in cases:
        _, reps = ask(c, opt(code, payload))
        assert reps == [(code, Rep.ERR_INVALID, message)]
    for code in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        _, reps = ask(c, opt(code, meta(b"nope", [])))
        assert reps == [(code, Rep.ERR_UNKNOWN, b"export 'nope' not present")]
    # Trailing bytes after the queries are ignored and the stream stays in sync.
    _, reps = ask(c, opt(Opt.LIST_META_CONTEXT, meta(b"y", [b"base:"]) + b"zz") + opt(Opt.LIST))
    assert reps[0] == (9, Rep.META_CONTEXT, b"\0\0\0\0base:allocation")
    assert reps[-1] == (3, Rep.ACK, b"")


def test_failed_set_meta_context_clears_the_selection() -> None:
    c = new()
    ask(c, opt(Opt.STRUCTURED_REPLY))
    ask(c, opt(Opt.SET_META_CONTEXT, meta(b"x", [b"base:allocation"])))
    _, reps = ask(c, opt(Opt.SET_META_CONTEXT, meta(b"nope", [])))
    assert reps[0][1] == Rep.ERR_UNKNOWN
    ev, _ = ask(c, opt(Opt.GO, info(b"x")))
    assert isinstance(ev[0], HandshakeDone) and ev[0].meta_contexts == ()


def test_bad_input_09_export_name_missing_or_too_long_disconnects() -> None:
    c = new()
    ev = closed(c.receive_data(opt(Opt.EXPORT_NAME, b"nope")))
    assert ev == Close("export not found", True) and c.data_to_send() == b""
    c = new()
    ev = closed(c.receive_data(opt(Opt.EXPORT_NAME, b"x" * 5000)))
    assert ev.reason == "Bad length received"


def test_export_name_after_structured_reply_advertises_df() -> None:
    c = new()
    ask(c, opt(Opt.STRUCTURED_REPLY))
    ev = c.receive_data(opt(Opt.EXPORT_NAME, b"x"))
    assert isinstance(ev[0], HandshakeDone) and ev[0].transmission_flags == 0x0DED
    assert c.data_to_send() == struct.pack(">QH", 64 * MiB, 0x0DED)


def test_bad_input_10_starttls_refused_by_policy_without_tls() -> None:
    _, reps = ask(new(), opt(Opt.STARTTLS) + opt(Opt.STARTTLS))
    assert reps == [(5, Rep.ERR_POLICY, b"TLS not configured")] * 2


def test_bad_input_13_many_options_all_answered() -> None:
    c = new()
    _, reps = ask(c, opt(Opt.LIST) * 2000)
    assert len(reps) == 6000 and c.phase is Phase.OPTIONS


def test_bad_input_15_repeated_structured_reply_and_extended_headers() -> None:
    _, reps = ask(new(), opt(8) + opt(8) + opt(Opt.EXTENDED_HEADERS))
    assert [r[1] for r in reps] == [Rep.ACK, Rep.ERR_INVALID, Rep.ERR_UNSUP]


def test_eof_in_handshake_is_a_peer_error() -> None:
    c = new()
    c.receive_data(opt(Opt.INFO, info(b"x"))[:10])
    assert closed(c.receive_eof()).peer_error


# --- transmission flags ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("export", "sr", "flags"),
    [
        (RW, True, 0x0DED),
        (RW, False, 0x0D6D),
        (RO, True, 0x058F),
        (RO, False, 0x050F),
        (ExportInfo("z", 0, can_fast_zero=False, can_multi_conn=False), True, 0x04ED),
        (ExportInfo("z", 0, can_write_zeroes=False, rotational=True), True, 0x05BD),
    ],
)
def test_transmission_flags(export: ExportInfo, sr: bool, flags: int) -> None:
    assert export.transmission_flags(sr) == flags


def test_export_info_rejects_bad_values() -> None:
    with pytest.raises(NbdUsageError):
        ExportInfo("a" * 4097, 1)
    with pytest.raises(NbdUsageError):
        ExportInfo("a", -1)
    with pytest.raises(NbdUsageError):
        ExportInfo("a", 1, description="x\0y")


# --- transmission: requests -----------------------------------------------------------------------


def test_read_request_event_and_replies_simple_and_structured() -> None:
    c = go(sr=False)
    r = one(c, req(Cmd.READ, 4096, 512, flags=CmdFlag.FUA, cookie=7))
    assert r == Request(7, Cmd.READ, 1, 4096, 512, None)
    assert c.in_flight == 1
    assert c.reply_read(r) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 7)
    assert c.in_flight == 0
    c = go()
    r = one(c, req(Cmd.READ, 4096, 512, cookie=7))
    assert c.reply_read(r) == struct.pack(
        ">IHHQIQ", STRUCTURED_REPLY_MAGIC, 1, ReplyType.OFFSET_DATA, 7, 520, 4096
    )
    r0 = one(c, req(Cmd.READ, 0, 0, cookie=8))
    assert tx_replies(c.reply_read(r0)) == [Chunk(1, ReplyType.NONE, 8, b"")]


def test_write_payload_small_and_large_zero_copy() -> None:
    c = go()
    r = one(c, req(Cmd.WRITE, 0, 4, flags=CmdFlag.FUA, data=b"abcd"))
    assert r.payload is not None and bytes(r.payload) == b"abcd" and r.flags == 1
    # Large payload: arrives through get_buffer straight into the buffer handed to the caller.
    size = 4 * MiB
    head = req(Cmd.WRITE, MiB, size, cookie=2)
    view = c.get_buffer(-1)
    view[: len(head)] = head
    assert c.buffer_updated(len(head)) == []
    chunks = []
    filled = 0
    while True:
        view = c.get_buffer(-1)
        n = min(len(view), 65536 * 3)
        view[:n] = bytes([filled % 251]) * n
        chunks.append(view.obj)
        filled += n
        ev = c.buffer_updated(n)
        if ev:
            break
    assert filled == size
    w = ev[0]
    assert isinstance(w, Request) and w.payload is not None and len(w.payload) == size
    assert all(obj is w.payload.obj for obj in chunks[1:])  # same buffer, no copy
    assert c.reply_ok(w) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 2)


def test_pipelined_requests_in_one_buffer() -> None:
    c = go()
    data = b"".join(req(Cmd.READ, i * 512, 512, cookie=i) for i in range(100))
    data += req(Cmd.WRITE, 0, 3, cookie=100, data=b"xyz") + req(Cmd.FLUSH, cookie=101)
    ev = c.receive_data(data)
    assert [e.cookie for e in ev if isinstance(e, Request)] == list(range(102))
    assert c.in_flight == 102


def test_every_command_reaches_the_caller() -> None:
    c = go(ctx=[b"base:allocation"])
    for cmd, flags in [
        (Cmd.FLUSH, 0),
        (Cmd.TRIM, CmdFlag.FUA),
        (Cmd.CACHE, 0),
        (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO | CmdFlag.FUA),
        (Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE),
        (Cmd.READ, CmdFlag.DF),
    ]:
        r = one(c, req(cmd, 0, 4096 if cmd != Cmd.FLUSH else 0, flags=flags))
        assert r.command is cmd and r.flags == flags


def test_bad_input_16_bad_request_magic_einval_then_disconnect() -> None:
    c = go()
    ev = c.receive_data(req(Cmd.READ, 0, 1, magic=0x12345678) + req(Cmd.READ, 0, 1))
    assert closed(ev) == Close("invalid magic (got 0x12345678)", True)
    assert [err_chunk(x) for x in tx_replies(c.data_to_send())] == [
        (22, b"invalid magic (got 0x12345678)")
    ]
    c = go(sr=False)
    closed(c.receive_data(req(Cmd.READ, 0, 1, magic=0x21E41C71)))  # extended magic
    assert tx_replies(c.data_to_send()) == [("simple", 22, 1, b"")]


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (req(99, 0, 0), b"invalid request type (99) received"),
        (req(8, 0, 1), b"invalid request type (8) received"),
        (req(99, 0, 0, flags=0x40), b"unsupported flags for command <unknown> (got 0x40)"),
        (req(Cmd.READ, 0, 1, flags=0x40), b"unsupported flags for command read (got 0x40)"),
        (
            req(Cmd.READ, 0, 1, flags=CmdFlag.REQ_ONE),
            b"unsupported flags for command read (got 0x8)",
        ),
        (
            req(Cmd.WRITE, 0, 1, flags=2, data=b"a"),
            b"unsupported flags for command write (got 0x2)",
        ),
        (
            req(Cmd.WRITE, 0, 1, flags=4, data=b"a"),
            b"unsupported flags for command write (got 0x4)",
        ),
        (req(Cmd.TRIM, 0, 1, flags=2), b"unsupported flags for command trim (got 0x2)"),
        (req(Cmd.FLUSH, 0, 0, flags=2), b"unsupported flags for command flush (got 0x2)"),
        (
            req(Cmd.WRITE_ZEROES, 0, 1, flags=4),
            b"unsupported flags for command write zeroes (got 0x4)",
        ),
        (
            req(Cmd.BLOCK_STATUS, 0, 1, flags=4),
            b"unsupported flags for command block status (got 0x4)",
        ),
        (req(Cmd.READ, 0, 0, flags=0x8000), b"unsupported flags for command read (got 0x8000)"),
    ],
)
def test_bad_input_17_unknown_commands_and_flags_einval_and_keep_going(
    request_bytes: bytes, message: bytes
) -> None:
    c = go(ctx=[b"base:allocation"])
    assert rejected(c, request_bytes) == (22, message)
    assert one(c, req(Cmd.READ, 0, 1)).command is Cmd.READ
    assert c.in_flight == 1


def test_bad_input_17_unadvertised_features_are_einval() -> None:
    exp = ExportInfo(
        "z",
        MiB,
        can_fast_zero=False,
        can_trim=False,
        can_cache=False,
        can_flush=False,
        can_fua=False,
    )
    c = new(exports={"z": exp})
    ask(c, opt(Opt.GO, info(b"z")))  # no structured replies: DF not allowed either
    for data in (
        req(Cmd.WRITE_ZEROES, 0, 1, flags=CmdFlag.FAST_ZERO),
        req(Cmd.READ, 0, 1, flags=CmdFlag.DF),
        req(Cmd.READ, 0, 1, flags=CmdFlag.FUA),
        req(Cmd.TRIM, 0, 1),
        req(Cmd.CACHE, 0, 1),
        req(Cmd.FLUSH),
        req(Cmd.BLOCK_STATUS, 0, 1),
    ):
        assert rejected(c, data) == (22, b"")
    c = go(ctx=[])
    assert rejected(c, req(Cmd.BLOCK_STATUS, 0, 1)) == (22, b"CMD_BLOCK_STATUS not negotiated")


@pytest.mark.parametrize(
    "cmd",
    [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS, Cmd.FLUSH, 99],
)
@pytest.mark.parametrize(
    ("offset", "length"), [(64 * MiB, 1), (64 * MiB - 1, 2), ((1 << 64) - 1, 2), (128 * MiB, 0)]
)
def test_bad_input_18_out_of_range_einval(cmd: int, offset: int, length: int) -> None:
    c = go(ctx=[b"base:allocation"])
    data = b"a" * length if cmd == Cmd.WRITE else b""
    message = f"operation past EOF; From: {offset}, Len: {length}, Size: {64 * MiB}".encode()
    assert rejected(c, req(cmd, offset, length, data=data)) == (22, message)


def test_bad_input_18_spec_errnos_option() -> None:
    c = go(spec_errnos=True)
    assert rejected(c, req(Cmd.WRITE, 64 * MiB, 1, data=b"a"))[0] == NbdErrno.ENOSPC
    assert rejected(c, req(Cmd.WRITE_ZEROES, 64 * MiB, 1))[0] == NbdErrno.ENOSPC
    assert rejected(c, req(Cmd.READ, 64 * MiB, 1))[0] == NbdErrno.EINVAL
    c = go(b"y", spec_errnos=True)
    assert rejected(c, req(Cmd.TRIM, 0, 1)) == (NbdErrno.EPERM, b"Export is read-only")


def test_bad_input_19_zero_length_requests() -> None:
    c = go(ctx=[b"base:allocation"])
    for cmd in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE):
        r = one(c, req(cmd, 0, 0))
        assert r.length == 0 and (r.payload is None or len(r.payload) == 0)
    assert rejected(c, req(Cmd.BLOCK_STATUS, 0, 0)) == (22, b"need non-zero length")
    assert rejected(c, req(Cmd.BLOCK_STATUS, 0, 0, flags=0x40)) == (
        22,
        b"unsupported flags for command block status (got 0x40)",
    )


def test_bad_input_20_oversized_reads_and_writes() -> None:
    c = go()
    for cmd, length in ((Cmd.READ, 32 * MiB + 1), (Cmd.READ, 0xFFFFFFFF), (Cmd.CACHE, 64 * MiB)):
        msg = f"len ({length} ) is larger than max len (33554432)".encode()
        assert rejected(c, req(cmd, 0, length)) == (22, msg)
    # Payload-less commands may exceed the payload limit.
    assert one(c, req(Cmd.TRIM, 0, 64 * MiB)).length == 64 * MiB
    assert one(c, req(Cmd.WRITE_ZEROES, 0, 64 * MiB)).length == 64 * MiB
    assert one(c, req(Cmd.READ, 0, 32 * MiB)).length == 32 * MiB
    ev = c.receive_data(req(Cmd.WRITE, 0, 32 * MiB + 1))
    assert closed(ev).reason == "len (33554433 ) is larger than max len (33554432)"
    assert err_chunk(tx_replies(c.data_to_send())[0])[0] == 22


def test_bad_input_20_write_to_read_only_consumes_payload() -> None:
    c = go(b"y", sr=False)
    payload = b"a" * 300_000  # larger than the receive buffer: drained, not buffered
    data = req(Cmd.WRITE, 0, len(payload), data=payload) + req(Cmd.READ, 0, 1, cookie=2)
    ev = c.receive_data(data)
    assert [e.cookie for e in ev if isinstance(e, Request)] == [2]
    assert tx_replies(c.data_to_send()) == [("simple", 22, 1, b"")]
    c = go(b"y")
    for cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
        # read-only is checked before bounds and flags, as qsd does
        data = b"a" if cmd == Cmd.WRITE else b""
        assert rejected(c, req(cmd, 2 * MiB, 1, flags=0x40, data=data)) == (
            22,
            b"Export is read-only",
        )
    assert one(c, req(Cmd.CACHE, 0, 1)).command is Cmd.CACHE
    assert one(c, req(Cmd.FLUSH)).command is Cmd.FLUSH


def test_bad_input_22_block_status_replies() -> None:
    c = go(b"y", ctx=[b"base:allocation", b"qemu:allocation-depth"])
    assert rejected(c, req(Cmd.BLOCK_STATUS, 0, 2 * MiB))[1].startswith(b"operation past EOF")
    r = one(c, req(Cmd.BLOCK_STATUS, 0, MiB, cookie=5))
    out = tx_replies(c.reply_block_status(r, {0: [(MiB, 3)], 1: [(4096, 1), (MiB, 0)]}))
    assert out == [
        Chunk(0, ReplyType.BLOCK_STATUS, 5, struct.pack(">III", 0, MiB, 3)),
        Chunk(1, ReplyType.BLOCK_STATUS, 5, struct.pack(">IIIII", 1, 4096, 1, MiB, 0)),
    ]
    r = one(c, req(Cmd.BLOCK_STATUS, 0, 4096, flags=CmdFlag.REQ_ONE, cookie=6))
    out = tx_replies(c.reply_block_status(r, {0: [(MiB, 3)], 1: [(512, 1), (512, 0)]}))
    assert [x.payload for x in out if isinstance(x, Chunk)] == [
        struct.pack(">III", 0, 4096, 3),
        struct.pack(">III", 1, 512, 1),
    ]
    # Extents starting past the request are dropped.
    r = one(c, req(Cmd.BLOCK_STATUS, 0, 1024, cookie=7))
    out = tx_replies(c.reply_block_status(r, {0: [(512, 0), (4096, 1), (512, 0)], 1: [(1, 1)]}))
    assert isinstance(out[0], Chunk) and out[0].payload == struct.pack(">IIIII", 0, 512, 0, 4096, 1)
    r = one(c, req(Cmd.BLOCK_STATUS, 0, 1024, cookie=8))
    with pytest.raises(NbdUsageError):
        c.reply_block_status(r, {0: [(512, 0)]})  # missing context 1
    with pytest.raises(NbdUsageError):
        c.reply_block_status(r, {0: [(0, 0)], 1: [(1, 0)]})  # zero-length extent
    with pytest.raises(NbdUsageError):
        c.reply_block_status(r, {0: [], 1: [(1, 0)]})


def test_bad_input_23_flush_and_disc_with_offsets() -> None:
    c = go()
    r = one(c, req(Cmd.FLUSH, 5, 5))
    assert (r.offset, r.length) == (5, 5)
    ev = c.receive_data(req(Cmd.DISC, 5, 5, flags=2))
    assert closed(ev) == Close("client sent NBD_CMD_DISC", False)
    assert c.data_to_send() == b""
    # In-flight requests can still be answered after DISC.
    assert c.reply_ok(r) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 1)


def test_bad_input_25_duplicate_cookies_are_independent() -> None:
    c = go()
    ev = c.receive_data(req(Cmd.READ, 0, 1, cookie=9) + req(Cmd.READ, 1, 1, cookie=9))
    a, b = ev
    assert isinstance(a, Request) and isinstance(b, Request) and a is not b
    c.reply_read(b)
    c.reply_read(a)
    assert c.in_flight == 0


def test_bad_input_26_data_after_disc_is_ignored() -> None:
    c = go()
    ev = c.receive_data(req(Cmd.DISC) + req(Cmd.READ, 0, 1) + b"garbage")
    assert ev == [Close("client sent NBD_CMD_DISC", False)]
    assert c.receive_data(req(Cmd.READ, 0, 1)) == [] and c.data_to_send() == b""
    assert c.receive_eof() == []


def test_bad_input_27_error_mid_read() -> None:
    c = go()
    r = one(c, req(Cmd.READ, 0, 8192, cookie=3))
    # The caller sends the data bytes after each OFFSET_DATA header.
    out = c.read_chunk_data(r, 0, 4096) + b"d" * 4096 + c.read_chunk_hole(r, 4096, 1024)
    out += c.reply_error(r, errno.EIO, "boom", offset=5120)
    chunks = tx_replies(out)
    assert chunks[0] == Chunk(0, ReplyType.OFFSET_DATA, 3, struct.pack(">Q", 0) + b"d" * 4096)
    assert chunks[1] == Chunk(0, ReplyType.OFFSET_HOLE, 3, struct.pack(">QI", 4096, 1024))
    assert chunks[2] == Chunk(
        1, ReplyType.ERROR_OFFSET, 3, struct.pack(">IH", 5, 4) + b"boom" + struct.pack(">Q", 5120)
    )
    with pytest.raises(NbdUsageError):
        c.reply_done(r)
    # Simple mode: the error replaces the header.
    c = go(sr=False)
    r = one(c, req(Cmd.READ, 0, 8192, cookie=3))
    assert tx_replies(c.reply_error(r, errno.EIO, "x")) == [("simple", 5, 3, b"")]
    with pytest.raises(NbdUsageError):
        c.read_chunk_data(r, 0, 1)


def test_bad_input_28_shutdown_errno() -> None:
    c = go()
    r = one(c, req(Cmd.WRITE, 0, 1, data=b"a"))
    assert err_chunk(tx_replies(c.reply_error(r, errno.ESHUTDOWN, "shutting down"))[0]) == (
        108,
        b"shutting down",
    )


def test_chunked_read_and_df_rules() -> None:
    c = go()
    r = one(c, req(Cmd.READ, 0, 8192, cookie=4))
    out = c.read_chunk_hole(r, 4096, 4096) + c.read_chunk_data(r, 0, 4096) + bytes(4096)
    out += c.reply_done(r)
    assert [x.flags for x in tx_replies(out) if isinstance(x, Chunk)] == [0, 0, 1]
    r = one(c, req(Cmd.READ, 0, 8192, flags=CmdFlag.DF))
    with pytest.raises(NbdUsageError):
        c.read_chunk_data(r, 0, 4096)
    with pytest.raises(NbdUsageError):
        c.read_chunk_hole(r, 0, 8193)
    assert tx_replies(c.read_chunk_hole(r, 0, 8192, done=True))[0] == Chunk(
        1, ReplyType.OFFSET_HOLE, 1, struct.pack(">QI", 0, 8192)
    )


def test_reply_hole_answers_a_whole_read_with_one_final_hole() -> None:
    c = go()
    r = one(c, req(Cmd.READ, 4096, 8192, cookie=9))
    assert c.in_flight == 1
    assert tx_replies(c.reply_hole(r)) == [
        Chunk(1, ReplyType.OFFSET_HOLE, 9, struct.pack(">QI", 4096, 8192))
    ]
    assert c.in_flight == 0
    with pytest.raises(NbdUsageError):
        c.reply_hole(r)  # answered already
    partly = one(c, req(Cmd.READ, 0, 8192))
    c.read_chunk_hole(partly, 0, 4096)
    df = one(c, req(Cmd.READ, 0, 8192, flags=CmdFlag.DF))
    empty = one(c, req(Cmd.READ, 0, 0))
    write = one(c, req(Cmd.WRITE, 0, 1, data=b"a"))
    for misuse in (partly, df, empty, write):
        with pytest.raises(NbdUsageError):
            c.reply_hole(misuse)
    simple = go(sr=False)
    with pytest.raises(NbdUsageError):
        simple.reply_hole(one(simple, req(Cmd.READ, 0, 512)))


def test_reply_misuse_raises_usage_error() -> None:
    c = go(ctx=[b"base:allocation"])
    r = one(c, req(Cmd.READ, 0, 1))
    w = one(c, req(Cmd.WRITE, 0, 1, data=b"a"))
    b = one(c, req(Cmd.BLOCK_STATUS, 0, 1))
    with pytest.raises(NbdUsageError):
        c.reply_ok(r)
    with pytest.raises(NbdUsageError):
        c.reply_ok(b)
    with pytest.raises(NbdUsageError):
        c.reply_read(w)
    with pytest.raises(NbdUsageError):
        c.read_chunk_data(w, 0, 1)
    with pytest.raises(NbdUsageError):
        c.reply_block_status(r, {0: [(1, 0)]})
    with pytest.raises(NbdUsageError):
        c.reply_error(w, 0)
    c.reply_ok(w)
    with pytest.raises(NbdUsageError):
        c.reply_ok(w)
    with pytest.raises(NbdUsageError):
        c.reply_error(w, errno.EIO)
    assert c.in_flight == 2


def test_errno_mapping() -> None:
    assert nbd_errno(errno.EPERM) == 1 and nbd_errno(errno.EROFS) == 1
    assert nbd_errno(errno.EIO) == 5 and nbd_errno(errno.ENOMEM) == 12
    assert nbd_errno(errno.EINVAL) == 22 and nbd_errno(errno.ENOSPC) == 28
    assert nbd_errno(errno.EDQUOT) == 28 and nbd_errno(errno.EFBIG) == 28
    assert nbd_errno(errno.EOVERFLOW) == 75 and nbd_errno(errno.EOPNOTSUPP) == 95
    assert nbd_errno(errno.ESHUTDOWN) == 108 and nbd_errno(errno.ENOENT) == 22
    assert nbd_errno(errno.EACCES) == 22  # qsd 7.2 has no entry for it: EINVAL


def test_eof_in_transmission_clean_or_mid_request() -> None:
    c = go()
    assert closed(c.receive_eof()) == Close("client closed the connection", False)
    c = go()
    c.receive_data(req(Cmd.WRITE, 0, 10, data=b"abc"))
    assert closed(c.receive_eof()).peer_error


def test_set_export_size_moves_the_bounds() -> None:
    c = go()
    c.set_export_size(MiB)
    assert rejected(c, req(Cmd.READ, MiB, 1))[0] == 22
    with pytest.raises(NbdUsageError):
        c.set_export_size(-1)


# --- any split of the client stream gives the same result -----------------------------------------

SCRIPT = (
    struct.pack(">I", 3)
    + opt(99, b"z" * 70_000)
    + opt(Opt.LIST)
    + opt(Opt.INFO, info(b"nope"))
    + opt(Opt.STRUCTURED_REPLY)
    + opt(Opt.LIST_META_CONTEXT, meta(b"x", []))
    + opt(Opt.SET_META_CONTEXT, meta(b"x", [b"base:allocation"]))
    + opt(Opt.GO, info(b"x", [1, 3]))
    + req(Cmd.READ, 0, 4096, cookie=1)
    + req(Cmd.WRITE, 512, 5, cookie=2, data=b"hello")
    + req(Cmd.WRITE, 0, 200_000, cookie=3, data=bytes(range(250)) * 800)
    + req(99, 0, 0, cookie=4)
    + req(Cmd.READ, 64 * MiB, 1, cookie=5)
    + req(Cmd.BLOCK_STATUS, 0, 65536, flags=CmdFlag.REQ_ONE, cookie=6)
    + req(Cmd.WRITE, 64 * MiB, 140_000, cookie=7, data=b"q" * 140_000)
    + req(Cmd.FLUSH, cookie=8)
    + req(Cmd.DISC)
    + b"trailing junk"
)


def _run(pieces: list[bytes]) -> tuple[list[tuple[object, ...]], bytes]:
    c = ServerConnection(EXPORTS)
    out = c.start()
    events: list[tuple[object, ...]] = []
    for p in pieces:
        for e in c.receive_data(p):
            if isinstance(e, Request):
                payload = None if e.payload is None else bytes(e.payload)
                events.append(("req", e.cookie, e.command, e.flags, e.offset, e.length, payload))
            else:
                events.append((e,))
        out += c.data_to_send()
    events.extend((e,) for e in c.receive_eof())
    return events, out


REFERENCE = _run([SCRIPT])


def test_reference_script_outcome() -> None:
    events, out = REFERENCE
    assert [e[1] for e in events if e[0] == "req"] == [1, 2, 3, 6, 8]
    assert events[-1] == (Close("client sent NBD_CMD_DISC", False),)
    assert out.count(struct.pack(">Q", OPTION_REPLY_MAGIC)) == 15


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(SCRIPT)), max_size=40))
def test_any_split_of_the_client_stream_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    pieces = [SCRIPT[a:b] for a, b in zip([0, *points], [*points, len(SCRIPT)], strict=True)]
    assert _run(pieces) == REFERENCE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_garbage_never_raises(data: bytes, in_transmission: bool) -> None:
    c = go() if in_transmission else new()
    c.receive_data(data)
    c.receive_eof()
    assert c.phase is Phase.CLOSED
