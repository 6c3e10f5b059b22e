"""Sans-IO NBD server connection: bytes in, events and bytes out (fixed newstyle, qsd 7.2).

Pure ring: never touches a socket, a clock or a thread. Invariant: every phase change goes
through `_transition` and the table below; the reader never consumes a byte beyond the message
it is parsing, so any split of the client stream yields the same events and the same replies.

Theory of operation
-------------------
The edge calls `start()` and sends the greeting, then feeds received bytes either with
`receive_data(bytes)` or, for zero-copy, the `asyncio.BufferedProtocol` pair
`get_buffer()`/`buffer_updated(n)` (after a large WRITE, `get_buffer` offers room for the next
header and a payload of the same length, so such a WRITE lands in place in one recv);
`receive_eof()` reports a closed stream. Each call returns
events (`HandshakeDone`, `Request`, `Close`); replies the core makes on its own (option
replies, EINVAL for malformed requests) accumulate in `data_to_send()`, which the edge drains
after every call, before acting on the events. Requests are answered later, in any order,
through `reply_*` methods that return bytes; READ data is never copied by the core: the edge
writes the returned header and then its own buffer (`writelines`).

Phases (`Phase`) and the inputs that move between them:

    GREETING      --start-------------> CLIENT_FLAGS   (greeting returned by start())
    CLIENT_FLAGS  --client_flags------> OPTIONS
    OPTIONS       --option------------> OPTIONS        (reply queued, connection kept)
    OPTIONS       --export_chosen-----> TRANSMISSION   (GO ack / EXPORT_NAME answer queued)
    TRANSMISSION  --request-----------> TRANSMISSION   (implicit: not looked up per request)
    CLIENT_FLAGS, OPTIONS, TRANSMISSION --abort/disc/eof/peer_error--> CLOSED

Peer errors never raise: they end in a `Close(reason, peer_error=True)` event (the reason text
is qsd's log wording). Misuse of this API by the caller raises `NbdUsageError`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from storage_daemon.export.nbd.buffers import BufferPool
from storage_daemon.export.nbd.constants import (
    COMMAND_NAMES,
    EXPORT_NAME_ZEROES,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_PARSED_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING_LENGTH,
    NBDMAGIC,
    REQUEST_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    NbdErrno,
    Opt,
    Rep,
)
from storage_daemon.export.nbd.handshake import (
    ExportInfo,
    MetaContext,
    NbdUsageError,
    OptionError,
    info_replies,
    match_contexts,
    meta_context_reply,
    option_name,
    option_reply,
    parse_info,
    parse_meta_name,
    parse_meta_queries,
    server_reply,
    unknown_export_message,
)
from storage_daemon.export.nbd.replies import Replies
from storage_daemon.export.nbd.transmission import (
    REQUEST,
    Request,
    error_chunk,
    simple_reply,
)

__all__ = [
    "RECV_BUFFER_SIZE",
    "Close",
    "Event",
    "ExportInfo",
    "HandshakeDone",
    "MetaContext",
    "NbdUsageError",
    "Phase",
    "Request",
    "ServerConnection",
]


class Phase(Enum):
    GREETING = "greeting"
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class _Input(Enum):
    START = "start"
    CLIENT_FLAGS = "client_flags"
    OPTION = "option"
    EXPORT_CHOSEN = "export_chosen"
    REQUEST = "request"
    ABORT = "abort"
    DISC = "disc"
    EOF = "eof"
    PEER_ERROR = "peer_error"


_TRANSITIONS: dict[tuple[Phase, _Input], Phase] = {
    (Phase.GREETING, _Input.START): Phase.CLIENT_FLAGS,
    (Phase.CLIENT_FLAGS, _Input.CLIENT_FLAGS): Phase.OPTIONS,
    (Phase.CLIENT_FLAGS, _Input.EOF): Phase.CLOSED,
    (Phase.CLIENT_FLAGS, _Input.PEER_ERROR): Phase.CLOSED,
    (Phase.OPTIONS, _Input.OPTION): Phase.OPTIONS,
    (Phase.OPTIONS, _Input.EXPORT_CHOSEN): Phase.TRANSMISSION,
    (Phase.OPTIONS, _Input.ABORT): Phase.CLOSED,
    (Phase.OPTIONS, _Input.EOF): Phase.CLOSED,
    (Phase.OPTIONS, _Input.PEER_ERROR): Phase.CLOSED,
    (Phase.TRANSMISSION, _Input.REQUEST): Phase.TRANSMISSION,
    (Phase.TRANSMISSION, _Input.DISC): Phase.CLOSED,
    (Phase.TRANSMISSION, _Input.EOF): Phase.CLOSED,
    (Phase.TRANSMISSION, _Input.PEER_ERROR): Phase.CLOSED,
}


class _Need(Enum):
    """What the reader expects next; finer than `Phase` (payloads inside a phase)."""

    CLIENT_FLAGS = 4
    OPT_HEADER = 16
    OPT_PAYLOAD = "opt-payload"
    OPT_SKIP = "opt-skip"
    REQ_HEADER = 28
    WRITE_PAYLOAD = "write-payload"
    WRITE_SKIP = "write-skip"
    NOTHING = "nothing"


RECV_BUFFER_SIZE = 128 * 1024
"""Size of the shared receive buffer for headers and small payloads."""

_GREETING = struct.Struct(">QQH")
_U32 = struct.Struct(">I")
_OPT_HEADER = struct.Struct(">QII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")

_CMDS: tuple[Cmd, ...] = tuple(Cmd)
_WRITE_CMDS = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
_ERR_NONE = 0xFFFF  # sentinel: request valid


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """The client chose an export; the core is now in TRANSMISSION (the edge stops its timer)."""

    export: ExportInfo
    structured_replies: bool
    meta_contexts: tuple[MetaContext, ...]
    transmission_flags: int


@dataclass(frozen=True, slots=True)
class Close:
    """The connection is over: the edge flushes `data_to_send()` and closes the socket.

    `peer_error` is True when the client broke the protocol (or vanished mid-message);
    requests already handed out may still be answered (after DISC the spec wants that).
    """

    reason: str
    peer_error: bool


Event = HandshakeDone | Request | Close


class ServerConnection(Replies):
    """One NBD client connection, server side. See the module docstring for the protocol."""

    def __init__(self, exports: Mapping[str, ExportInfo], *, spec_errnos: bool = False) -> None:
        """`exports` is consulted live (LIST, INFO, GO); `spec_errnos` replaces qsd's EINVAL
        with the spec's EPERM (read-only) and ENOSPC (write past the end)."""
        self._exports = exports
        self._spec_errnos = spec_errnos
        self.phase = Phase.GREETING
        self._need = _Need.NOTHING
        self._buf = bytearray(RECV_BUFFER_SIZE)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._payload: bytearray | None = None
        self._payload_mv: memoryview | None = None
        self._buffers = BufferPool()  # payload buffers, reused once the caller dropped them
        self._filled = 0
        self._skip = 0
        self._skip_all = False  # get_buffer handed out the whole buffer as a discard area
        self._predict = 0  # payload length of the last large WRITE (0: expect no WRITE)
        self._landing: bytearray | None = None  # handed out for a header + predicted payload
        self._landed: tuple[bytearray, int] | None = None  # its payload bytes, not yet used
        self._out: list[bytes] = []
        self._events: list[Event] = []
        # handshake state
        self._fixed = False
        self._no_zeroes = False
        self.structured_replies = False
        self._meta_export: str | None = None
        self._meta: tuple[MetaContext, ...] = ()
        self._opt = 0
        self._opt_len = 0
        # transmission state
        self.export: ExportInfo | None = None
        self.meta_contexts: tuple[MetaContext, ...] = ()
        self.in_flight = 0
        self._size = 0
        self._ro = False
        self._valid_flags: tuple[int, ...] = ()
        self._cmd_ok: tuple[bool, ...] = ()
        self._pending: Request | None = None
        self._pending_error: tuple[int, int, str] | None = None

    # --- phase table ------------------------------------------------------------------------

    def _transition(self, inp: _Input) -> None:
        try:
            self.phase = _TRANSITIONS[self.phase, inp]
        except KeyError:
            raise NbdUsageError(f"no transition from {self.phase.value} on {inp.value}") from None

    def _close(self, inp: _Input, reason: str, peer_error: bool) -> None:
        self._transition(inp)
        self._need = _Need.NOTHING
        self._payload = self._payload_mv = None
        self._predict = 0
        self._landed = None
        self._events.append(Close(reason, peer_error))

    # --- input ------------------------------------------------------------------------------

    def start(self) -> bytes:
        """The server greeting; call once, send it, then feed the client's bytes."""
        self._transition(_Input.START)
        self._need = _Need.CLIENT_FLAGS
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)

    @property
    def handshake_done(self) -> bool:
        """True once an export was chosen (stays True after a later Close)."""
        return self.export is not None

    def data_to_send(self) -> bytes:
        """Bytes the core produced on its own since the last call (option replies, errors)."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def get_buffer(self, sizehint: int = -1, predict: bool = True) -> memoryview:
        """Where the next received bytes go (asyncio.BufferedProtocol.get_buffer contract).

        During a large WRITE payload this is the payload's own buffer, trimmed to the bytes
        still missing, so the socket writes straight into the memory handed to the caller.
        Between requests, after a large WRITE, it is a payload buffer with room for a header
        and a payload of the same length in front: when the next request is such a WRITE
        (nbdcopy, fio), its payload lands in place, in one recv, never copied. (`predict`
        False: none of that, for `receive_data`.)
        """
        if self.phase is Phase.GREETING:
            raise NbdUsageError("start() must be called before receiving")
        self._landing = None  # (a buffer handed out before but never filled)
        if self._payload_mv is not None:
            return self._payload_mv[self._filled :]
        if self._start == self._end:
            self._start = self._end = 0
            if self._skip or self._need is _Need.NOTHING:
                self._skip_all = True
                return self._mv
            if self._predict and predict and self._need is _Need.REQ_HEADER:
                self._skip_all = False
                buf = self._landing = self._buffers.get(REQUEST.size + self._predict)
                return memoryview(buf)
        elif self._start:
            n = self._end - self._start  # < one header: payloads never wait in this buffer
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
        self._skip_all = False
        return self._mv[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """`nbytes` were written into the view from `get_buffer()`; parse what is complete."""
        if self._landing is not None:
            return self._land(self._landing, nbytes)
        if self._payload_mv is not None:
            self._filled += nbytes
            if self._filled == len(self._payload_mv):
                payload = self._payload_mv
                self._payload = self._payload_mv = None
                self._payload_done(payload)
        elif self._skip_all:
            self._skip_all = False
            if self._need is _Need.NOTHING:
                nbytes = 0
            elif nbytes <= self._skip:
                self._skip -= nbytes
                if self._skip == 0:
                    self._skip_done()
                nbytes = 0
            else:
                self._start, nbytes = self._skip, nbytes - self._skip
                self._end = self._start
                self._skip = 0
                self._skip_done()
            self._end += nbytes
            self._parse()
        else:
            self._end += nbytes
            self._parse()
        events, self._events = self._events, []
        return events

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed received bytes (one copy into the core's buffers); returns the new events."""
        view = memoryview(data).cast("B")
        events: list[Event] = []
        pos, total = 0, len(view)
        while pos < total:
            target = self.get_buffer(-1, False)
            n = min(len(target), total - pos)
            target[:n] = view[pos : pos + n]
            pos += n
            events += self.buffer_updated(n)
        return events

    def _land(self, buf: bytearray, nbytes: int) -> list[Event]:
        """`nbytes` arrived in a buffer from the predicting `get_buffer`: a request header,
        then (if it is the predicted WRITE) its payload in place, used by `_take_payload`;
        anything else is fed on as ordinary input (copied, as `receive_data` does)."""
        self._landing = None
        head = min(nbytes, REQUEST.size)
        self._buf[:head] = buf[:head]  # (the shared buffer is empty when predicting)
        self._end = head
        if nbytes > head:
            self._landed = (buf, nbytes - head)
        self._parse()
        landed, self._landed = self._landed, None
        events, self._events = self._events, []
        if landed is not None:  # not the predicted WRITE
            events += self.receive_data(memoryview(buf)[head:nbytes])
        return events

    def receive_eof(self) -> list[Event]:
        """The client closed its side; returns the final `Close` (or nothing if already closed)."""
        if self.phase is Phase.CLOSED:
            return []
        if self.phase is Phase.GREETING:
            raise NbdUsageError("start() must be called before receiving")
        clean = (
            self.phase is Phase.TRANSMISSION
            and self._need is _Need.REQ_HEADER
            and self._start == self._end
        )
        if clean:
            self._close(_Input.EOF, "client closed the connection", False)
        else:
            self._close(_Input.EOF, "Unexpected end-of-file before all data were read", True)
        events, self._events = self._events, []
        return events

    # --- the reader -------------------------------------------------------------------------

    def _parse(self) -> None:
        while True:
            avail = self._end - self._start
            need = self._need
            if need is _Need.REQ_HEADER:
                if avail < 28:
                    return
                self._request(avail)
            elif need is _Need.OPT_HEADER:
                if avail < 16:
                    return
                self._option_header(avail)
            elif need is _Need.OPT_SKIP or need is _Need.WRITE_SKIP:
                n = min(avail, self._skip)
                self._start += n
                self._skip -= n
                if self._skip:
                    return
                self._skip_done()
            elif need is _Need.CLIENT_FLAGS:
                if avail < 4:
                    return
                (flags,) = _U32.unpack_from(self._mv, self._start)
                self._start += 4
                self._client_flags(flags)
            else:  # NOTHING: closed, drop whatever else arrived
                self._start = self._end
                return

    def _take_payload(self, length: int, avail: int, need: _Need) -> memoryview | None:
        """Return the payload if buffered already (a view of the shared buffer: use it at once),
        else move to `need` with a dedicated buffer and return None."""
        if length <= avail:
            mv = self._mv[self._start : self._start + length]
            self._start += length
            return mv
        landed = self._landed
        if need is _Need.WRITE_PAYLOAD:
            self._predict = length if length >= self._buffers.min_size else 0
            if landed is not None and len(landed[0]) == REQUEST.size + length:
                # The predicted WRITE: its payload is in place already (see `_land`).
                self._landed = None
                buf, filled = landed
                mv = memoryview(buf)[REQUEST.size :]
                self._need = need
                if filled == length:
                    self._payload_done(mv)
                else:
                    self._payload, self._payload_mv, self._filled = buf, mv, filled
                return None
        buf = self._buffers.get(length)
        mv = memoryview(buf)
        mv[:avail] = self._mv[self._start : self._end]  # bytearray[:n] = view would copy twice
        self._start = self._end
        self._payload, self._payload_mv, self._filled = buf, mv, avail
        self._need = need
        return None

    def _begin_skip(self, length: int, need: _Need) -> None:
        self._skip = length
        self._need = need

    def _skip_done(self) -> None:
        if self._need is _Need.OPT_SKIP:
            self._need = _Need.OPT_HEADER
            self._option(self._opt, None)
        else:
            self._need = _Need.REQ_HEADER
            self._skip_done_write()

    def _payload_done(self, payload: memoryview) -> None:
        if self._need is _Need.OPT_PAYLOAD:
            self._need = _Need.OPT_HEADER
            self._option(self._opt, payload)
        else:
            self._need = _Need.REQ_HEADER
            req = self._pending
            assert req is not None
            self._pending = None
            req.payload = payload
            self.in_flight += 1
            self._events.append(req)
        if self.phase is not Phase.CLOSED:
            self._parse()

    # --- handshake --------------------------------------------------------------------------

    def _client_flags(self, flags: int) -> None:
        if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
            self._close(_Input.PEER_ERROR, f"Unknown client flags 0x{flags:x} received", True)
            return
        self._fixed = bool(flags & ClientFlag.FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._transition(_Input.CLIENT_FLAGS)
        self._need = _Need.OPT_HEADER

    def _option_header(self, avail: int) -> None:
        magic, opt, length = _OPT_HEADER.unpack_from(self._mv, self._start)
        self._start += 16
        avail -= 16
        if magic != IHAVEOPT:
            self._close(_Input.PEER_ERROR, "Bad magic received", True)
            return
        if length > MAX_OPTION_LENGTH:
            self._close(
                _Input.PEER_ERROR,
                f"len ({length} ) is larger than max len ({MAX_OPTION_LENGTH})",
                True,
            )
            return
        if not self._fixed and opt != Opt.EXPORT_NAME:
            self._close(_Input.PEER_ERROR, f"Unsupported option {opt} ({option_name(opt)})", True)
            return
        self._opt, self._opt_len = opt, length
        if opt == Opt.EXPORT_NAME and length > MAX_STRING_LENGTH:
            self._close(_Input.PEER_ERROR, "Bad length received", True)
            return
        parsed = opt in (
            Opt.EXPORT_NAME,
            Opt.INFO,
            Opt.GO,
            Opt.LIST_META_CONTEXT,
            Opt.SET_META_CONTEXT,
        )
        if parsed and length <= MAX_PARSED_OPTION_LENGTH:
            payload = self._take_payload(length, avail, _Need.OPT_PAYLOAD)
            if payload is not None:
                self._option(opt, payload)
        elif length > avail:
            self._begin_skip(length - avail, _Need.OPT_SKIP)
            self._start = self._end
        else:
            self._start += length
            self._option(opt, None)

    def _option(self, opt: int, payload: memoryview | None) -> None:
        """Answer one complete option; `payload` is None when it was drained unread."""
        out = self._out
        try:
            if opt == Opt.EXPORT_NAME:
                assert payload is not None
                self._export_name(bytes(payload))
                return
            if opt == Opt.ABORT:
                out.append(option_reply(opt, Rep.ACK))
                self._close(_Input.ABORT, "client aborted the handshake", False)
                return
            self._transition(_Input.OPTION)
            if opt == Opt.LIST:
                self._require_empty(opt)
                out.extend(server_reply(e) for e in self._exports.values())
                out.append(option_reply(opt, Rep.ACK))
            elif opt == Opt.STARTTLS:
                self._require_empty(opt)
                raise OptionError(Rep.ERR_POLICY, "TLS not configured")
            elif opt == Opt.STRUCTURED_REPLY:
                self._require_empty(opt)
                if self.structured_replies:
                    raise OptionError(Rep.ERR_INVALID, "structured reply already negotiated")
                self.structured_replies = True
                out.append(option_reply(opt, Rep.ACK))
            elif opt in (Opt.INFO, Opt.GO):
                self._info(opt, self._parsed(opt, payload))
            elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                self._meta_context(opt, self._parsed(opt, payload))
            else:
                raise OptionError(Rep.ERR_UNSUP, f"Unsupported option {opt} ({option_name(opt)})")
        except OptionError as e:
            out.append(option_reply(opt, e.rep, e.message))

    def _require_empty(self, opt: int) -> None:
        if self._opt_len:
            raise OptionError(Rep.ERR_INVALID, f"option '{option_name(opt)}' has unexpected length")

    def _parsed(self, opt: int, payload: memoryview | None) -> memoryview:
        if payload is None:  # longer than MAX_PARSED_OPTION_LENGTH: drained unread
            raise OptionError(Rep.ERR_TOO_BIG, f"option '{option_name(opt)}' is too long")
        return payload

    def _lookup(self, name: bytes) -> ExportInfo:
        try:
            export = self._exports.get(name.decode())
        except UnicodeDecodeError:
            export = None
        if export is None:
            raise OptionError(Rep.ERR_UNKNOWN, unknown_export_message(name))
        return export

    def _info(self, opt: int, payload: memoryview) -> None:
        name, requests = parse_info(payload, opt)
        export = self._lookup(name)
        self._out.append(info_replies(opt, export, requests, self.structured_replies))
        if opt == Opt.GO:
            self._enter_transmission(export)

    def _meta_context(self, opt: int, payload: memoryview) -> None:
        setting = opt == Opt.SET_META_CONTEXT
        if setting:
            # The selection is replaced even when the option fails.
            self._meta_export, self._meta = None, ()
            if not self.structured_replies:
                raise OptionError(
                    Rep.ERR_INVALID,
                    "request option 'set meta context' when structured reply is not negotiated",
                )
        name, pos = parse_meta_name(payload, opt)
        export = self._lookup(name)
        queries = parse_meta_queries(payload, pos, opt)
        found = match_contexts(export, queries, listing=not setting)
        self._out.extend(meta_context_reply(opt, c, listing=not setting) for c in found)
        self._out.append(option_reply(opt, Rep.ACK))
        if setting:
            self._meta_export, self._meta = export.name, tuple(found)

    def _export_name(self, name: bytes) -> None:
        try:
            export = self._lookup(name)
        except OptionError:
            self._close(_Input.PEER_ERROR, "export not found", True)
            return
        flags = export.transmission_flags(self.structured_replies)
        reply = _EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self._no_zeroes:
            reply += bytes(EXPORT_NAME_ZEROES)
        self._out.append(reply)
        self._enter_transmission(export)

    def _enter_transmission(self, export: ExportInfo) -> None:
        self._transition(_Input.EXPORT_CHOSEN)
        self._need = _Need.REQ_HEADER
        sr = self.structured_replies
        self.export = export
        # Contexts selected for another export do not carry over to this one (qsd drops them).
        self.meta_contexts = self._meta if self._meta_export == export.name else ()
        self._size, self._ro = export.size, export.read_only
        fua = int(CmdFlag.FUA) if export.can_fua else 0
        zero_flags = int(CmdFlag.NO_HOLE) | (int(CmdFlag.FAST_ZERO) if export.can_fast_zero else 0)
        self._valid_flags = (
            fua | (int(CmdFlag.DF) if sr else 0),  # READ
            fua,  # WRITE
            fua,  # DISC (never checked)
            fua,  # FLUSH
            fua,  # TRIM
            fua,  # CACHE
            fua | zero_flags,  # WRITE_ZEROES
            fua | int(CmdFlag.REQ_ONE),  # BLOCK_STATUS
        )
        self._cmd_ok = (
            True,
            True,
            True,
            export.can_flush,
            export.can_trim,
            export.can_cache,
            export.can_write_zeroes,
            sr,
        )
        self._events.append(
            HandshakeDone(export, sr, self.meta_contexts, export.transmission_flags(sr))
        )

    def set_export_size(self, size: int) -> None:
        """The export was resized: bounds checks use `size` from now on."""
        if not 0 <= size < 1 << 63:
            raise NbdUsageError(f"export size {size} out of range")
        self._size = size

    # --- transmission: requests -------------------------------------------------------------

    def _request(self, avail: int) -> None:
        magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(self._mv, self._start)
        self._start += 28
        self._predict = 0  # (set again when this is a large WRITE: see `_take_payload`)
        size = self._size
        # Fast path: a plain valid READ, the commonest request.
        if (
            cmd == 0
            and magic == REQUEST_MAGIC
            and length <= MAX_PAYLOAD
            and offset <= size
            and length <= size - offset
            and not flags & ~self._valid_flags[0]
        ):
            self.in_flight += 1
            self._events.append(Request(cookie, Cmd.READ, flags, offset, length))
            return
        if magic != REQUEST_MAGIC:
            self._out.append(
                self._error_bytes(cookie, NbdErrno.EINVAL, f"invalid magic (got 0x{magic:x})")
            )
            self._close(_Input.PEER_ERROR, f"invalid magic (got 0x{magic:x})", True)
            return
        if cmd == Cmd.DISC:
            self._close(_Input.DISC, "client sent NBD_CMD_DISC", False)
            return
        err, message = self._validate(flags, cmd, offset, length)
        if cmd == Cmd.WRITE:
            if err == NbdErrno.EINVAL and length > MAX_PAYLOAD:
                # The payload cannot be drained sensibly: answer, then hang up (as qsd does).
                self._out.append(self._error_bytes(cookie, err, message))
                self._close(_Input.PEER_ERROR, message, True)
                return
            if err != _ERR_NONE:
                self._pending_error = (cookie, err, message)
                if length <= avail - 28:
                    self._start += length
                    self._skip_done_write()
                else:
                    self._skip = length - (avail - 28)
                    self._start = self._end
                    self._need = _Need.WRITE_SKIP
                return
            req = Request(cookie, Cmd.WRITE, flags, offset, length)
            if length <= avail - 28:
                # Whole payload already buffered: copy it out (small), the buffer is reused.
                req.payload = memoryview(bytes(self._mv[self._start : self._start + length]))
                self._start += length
                self.in_flight += 1
                self._events.append(req)
            else:
                self._pending = req
                self._take_payload(length, avail - 28, _Need.WRITE_PAYLOAD)
            return
        if err != _ERR_NONE:
            self._out.append(self._error_bytes(cookie, err, message))
            return
        self.in_flight += 1
        self._events.append(Request(cookie, _CMDS[cmd], flags, offset, length))

    def _skip_done_write(self) -> None:
        assert self._pending_error is not None
        cookie, err, message = self._pending_error
        self._pending_error = None
        self._out.append(self._error_bytes(cookie, err, message))

    def _validate(self, flags: int, cmd: int, offset: int, length: int) -> tuple[int, str]:
        """qsd's order of checks; returns (_ERR_NONE, "") for a valid request."""
        if cmd in (Cmd.READ, Cmd.WRITE, Cmd.CACHE) and length > MAX_PAYLOAD:
            return NbdErrno.EINVAL, f"len ({length} ) is larger than max len ({MAX_PAYLOAD})"
        if self._ro and cmd in _WRITE_CMDS:
            return (NbdErrno.EPERM if self._spec_errnos else NbdErrno.EINVAL), "Export is read-only"
        size = self._size
        if offset > size or length > size - offset:
            err = NbdErrno.EINVAL
            if self._spec_errnos and cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES):
                err = NbdErrno.ENOSPC
            return err, f"operation past EOF; From: {offset}, Len: {length}, Size: {size}"
        known = cmd < len(_CMDS)
        if flags & ~(self._valid_flags[cmd] if known else int(CmdFlag.FUA)):
            name = COMMAND_NAMES.get(cmd, "<unknown>")
            return NbdErrno.EINVAL, f"unsupported flags for command {name} (got 0x{flags:x})"
        if cmd == Cmd.BLOCK_STATUS:
            if not length:
                return NbdErrno.EINVAL, "need non-zero length"
            if not self.meta_contexts:
                return NbdErrno.EINVAL, "CMD_BLOCK_STATUS not negotiated"
        if not known:
            return NbdErrno.EINVAL, f"invalid request type ({cmd}) received"
        if not self._cmd_ok[cmd]:
            return NbdErrno.EINVAL, f"unsupported command {COMMAND_NAMES[cmd]}"
        return _ERR_NONE, ""

    # --- transmission: replies --------------------------------------------------------------

    def _error_bytes(self, cookie: int, err: int, message: str) -> bytes:
        if self.structured_replies:
            return error_chunk(cookie, err, message)
        return simple_reply(cookie, err)
