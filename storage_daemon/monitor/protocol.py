"""The QMP session as a sans-IO state machine: bytes in, events and reply bytes out.

Pure core (ring 1): no sockets, no clock (event timestamps are passed in).
Invariant: replies leave in request order; at most one `Execute` is outstanding per session,
and nothing after it (not even an error reply to a later malformed message) is emitted
before the caller has answered it with `reply()` or `reply_error()`.

Theory of operation
-------------------
A session starts in NEGOTIATION. The caller sends `greeting()`, then passes received bytes
to `receive_data()` and pulls `next_event()` until it returns None:

    state        input (in order of arrival)              -> output                next state
    -----------  ---------------------------------------  ---------------------  -----------
    any          JSON parse error                         SendBytes(error)       same
    any          not an object / bad envelope member      SendBytes(error + id)  same
    NEGOTIATION  qmp_capabilities, arguments valid        SendBytes(return {})   COMMAND
    NEGOTIATION  qmp_capabilities, arguments invalid      SendBytes(error)       NEGOTIATION
    NEGOTIATION  any other command, known or not          SendBytes(CommandNotFound
                                                          "Expecting capabilities negotiation
                                                          with 'qmp_capabilities'")
    COMMAND      unknown command (if `commands` given)    SendBytes(CommandNotFound)
    COMMAND      exec-oob (oob enabled) of a non-OOB cmd  SendBytes(error)
    COMMAND      qmp_capabilities                         SendBytes(argument error, or
                                                          CommandNotFound "... already
                                                          complete, command ignored")
    COMMAND      any other command                        Execute(...)  -> caller runs it and
                                                          calls reply()/reply_error()

Envelope members are checked in the order qsd iterates its hash table, which decides which
error a request with several bad members gets. Events (`event()`) are only produced once the
session reached COMMAND. Peer mistakes never raise; `LocalProtocolError` means the caller
misused the session.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from enum import Enum

from storage_daemon.errors import QmpError
from storage_daemon.monitor.jsonstream import (
    JsonParseError,
    JsonStream,
    JsonValue,
    to_json,
)
from storage_daemon.qdict import qdict_order

QMP_CAPABILITIES = "qmp_capabilities"
CAPABILITIES = ("oob",)  # QMPCapability, in schema order


class SessionState(Enum):
    NEGOTIATION = "negotiation"
    COMMAND = "command"


class LocalProtocolError(Exception):
    """The caller used the session wrongly (e.g. replied to a request that is not pending)."""


@dataclass(frozen=True)
class SendBytes:
    """Bytes to write to the peer, already framed (`\\r\\n` line ends)."""

    data: bytes


@dataclass(frozen=True, eq=False)
class Execute:
    """A well-formed request the caller must run and answer (compared by identity).

    `arguments` is None when the request had no `arguments` member; `id` is the request's
    `id` verbatim (meaningful only when `has_id`); `oob` is True for `exec-oob`."""

    command: str
    arguments: dict[str, JsonValue] | None
    id: JsonValue = None
    has_id: bool = False
    oob: bool = False
    _token: object = field(default=None, repr=False)


Event = SendBytes | Execute


class QmpSession:
    """One QMP conversation (one client connection).

    `version` is the greeting's `version` object (as `query-version` returns it).
    `pretty` selects QEMU's pretty-printer. `oob_offered` advertises the `oob` capability.
    `commands`, if given, is the set of command names the dispatcher knows; the session then
    answers unknown commands itself (needed so `exec-oob` of an unknown command gets
    CommandNotFound rather than the "does not support OOB" error). `oob_commands` lists
    commands allowed with `exec-oob` (none in qsd 7.2). `qdict` prints object members in
    qsd's hash-table order (byte-identical to qsd); False keeps each dict's own order.
    `stream` replaces the default `JsonStream` (e.g. for smaller limits).
    """

    def __init__(
        self,
        version: Mapping[str, JsonValue],
        *,
        pretty: bool = False,
        oob_offered: bool = True,
        commands: Container[str] | None = None,
        oob_commands: Container[str] = frozenset(),
        qdict: bool = True,
        stream: JsonStream | None = None,
    ) -> None:
        self.version = dict(version)
        self.pretty = pretty
        self.oob_offered = oob_offered
        self.commands = commands
        self.oob_commands = oob_commands
        self.qdict = qdict
        self.state = SessionState.NEGOTIATION
        self.oob_enabled = False
        self._stream = stream if stream is not None else JsonStream()
        self._inbox: deque[JsonValue | JsonParseError] = deque()
        self._pending: Execute | None = None

    # -- output framing ------------------------------------------------------------------

    def encode(self, message: Mapping[str, object]) -> bytes:
        """One framed message: JSON, then `\\r\\n` (pretty output uses `\\r\\n` throughout)."""
        text = to_json(message, pretty=self.pretty, qdict=self.qdict)
        if self.pretty:
            text = text.replace("\n", "\r\n")
        return (text + "\r\n").encode("ascii")

    def greeting(self) -> bytes:
        caps = ["oob"] if self.oob_offered else []
        return self.encode({"QMP": {"version": self.version, "capabilities": caps}})

    def _error(self, error: QmpError, id_: JsonValue, has_id: bool) -> bytes:
        body = {"class": error.error_class, "desc": error.desc}
        msg: dict[str, object] = {"id": id_, "error": body} if has_id else {"error": body}
        return self.encode(msg)

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._inbox.extend(self._stream.feed(data))

    def receive_eof(self) -> None:
        """The peer closed its side: complete what the input stream still holds."""
        self._inbox.extend(self._stream.finish())

    @property
    def backlog(self) -> int:
        """Parsed messages not yet turned into events."""
        return len(self._inbox)

    @property
    def awaiting_reply(self) -> Execute | None:
        """The `Execute` the caller still has to answer, if any."""
        return self._pending

    def next_event(self) -> Event | None:
        """The next thing to do, or None (need more data, or waiting for a reply)."""
        while self._pending is None and self._inbox:
            event = self._process(self._inbox.popleft())
            if event is not None:
                return event
        return None

    def _process(self, item: JsonValue | JsonParseError) -> Event | None:
        if isinstance(item, JsonParseError):
            return SendBytes(self._error(QmpError(item.desc), None, False))
        if not isinstance(item, dict):
            return SendBytes(self._error(QmpError("QMP input must be a JSON object"), None, False))
        has_id = "id" in item
        id_ = item.get("id")
        try:
            name, oob, args = self._check_envelope(item)
            if self.state is SessionState.NEGOTIATION:
                if name != QMP_CAPABILITIES:
                    raise QmpError(
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                        "CommandNotFound",
                    )
                enable = self._check_capabilities(args)
                self.state = SessionState.COMMAND
                self.oob_enabled = "oob" in enable
                return SendBytes(self._return({}, id_, has_id))
            if self.commands is not None and name != QMP_CAPABILITIES and name not in self.commands:
                raise QmpError(f"The command {name} has not been found", "CommandNotFound")
            if oob and name not in self.oob_commands:
                raise QmpError(f"The command {name} does not support OOB")
            if name == QMP_CAPABILITIES:
                self._check_capabilities(args)
                raise QmpError(
                    "Capabilities negotiation is already complete, command ignored",
                    "CommandNotFound",
                )
        except QmpError as exc:
            return SendBytes(self._error(exc, id_, has_id))
        self._pending = Execute(name, args, id_, has_id, oob, object())
        return self._pending

    def _check_envelope(
        self, req: dict[str, JsonValue]
    ) -> tuple[str, bool, dict[str, JsonValue] | None]:
        allow_oob = self.oob_enabled
        for key in qdict_order(req):
            value = req[key]
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if not isinstance(value, str):
                    raise QmpError(f"QMP input member '{key}' must be a string")
                if key == "execute" and allow_oob and "exec-oob" in req:
                    raise QmpError("QMP input member 'execute' clashes with 'exec-oob'")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if "execute" in req:
            name, oob = req["execute"], False
        elif allow_oob and "exec-oob" in req:
            name, oob = req["exec-oob"], True
        else:
            raise QmpError("QMP input lacks member 'execute'")
        assert isinstance(name, str)
        args = req.get("arguments")
        assert args is None or isinstance(args, dict)
        return name, oob, args

    def _check_capabilities(self, args: dict[str, JsonValue] | None) -> list[str]:
        """Validate qmp_capabilities' arguments the way qsd's input visitor does."""
        if not args:
            return []
        enable: list[str] = []
        if "enable" in args:
            value = args["enable"]
            if not isinstance(value, list):
                raise QmpError("Invalid parameter type for 'enable', expected: array")
            for i, cap in enumerate(value):
                if not isinstance(cap, str):
                    raise QmpError(f"Invalid parameter type for 'enable[{i}]', expected: string")
                if cap not in CAPABILITIES:
                    # qsd 7.2 names list elements 'null' in this message.
                    raise QmpError(f"Parameter 'null' does not accept value '{cap}'")
                enable.append(cap)
        for key in qdict_order(args):
            if key != "enable":
                raise QmpError(f"Parameter '{key}' is unexpected")
        if "oob" in enable and not self.oob_offered:
            raise QmpError("Capability 'oob' not available")
        return enable

    # -- replies and events --------------------------------------------------------------

    def _return(self, result: object, id_: JsonValue, has_id: bool) -> bytes:
        msg: dict[str, object] = {"return": result}
        if has_id:
            msg["id"] = id_
        return self.encode(msg)

    def _take(self, execute: Execute) -> None:
        if self._pending is None or execute is not self._pending:
            raise LocalProtocolError("reply to a request that is not pending")
        self._pending = None

    def reply(self, execute: Execute, result: object) -> bytes:
        """The success reply to `execute`; `result` must be JSON-serialisable."""
        data = self._return(result, execute.id, execute.has_id)  # may raise TypeError first
        self._take(execute)
        return data

    def reply_error(self, execute: Execute, error: QmpError) -> bytes:
        self._take(execute)
        return self._error(error, execute.id, execute.has_id)

    def event(self, name: str, data: object | None, timestamp_ns: int) -> bytes | None:
        """An event message, or None while capabilities are not negotiated.
        `data` None omits the member, as QEMU does for events without data."""
        if self.state is not SessionState.COMMAND:
            return None
        return encode_event(self, name, data, timestamp_ns)


def encode_event(session: QmpSession, name: str, data: object | None, timestamp_ns: int) -> bytes:
    """Encode an event for `session`'s output format regardless of its state."""
    seconds, rest = divmod(timestamp_ns, 1_000_000_000)
    msg: dict[str, object] = {
        "timestamp": {"seconds": seconds, "microseconds": rest // 1000},
        "event": name,
    }
    if data is not None:
        msg["data"] = data
    return session.encode(msg)
