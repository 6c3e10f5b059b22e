"""Unit tests of the sans-IO QMP session (pure core).

Expected bytes are qemu-storage-daemon 7.2's replies to the same input, recorded by talking
raw bytes to its monitor (../shared/reference/qsd-7.2/qmp-errors.txt and own probes).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.errors import QmpError
from storage_daemon.monitor.jsonstream import JsonStream, JsonValue
from storage_daemon.monitor.protocol import (
    Execute,
    LocalProtocolError,
    QmpSession,
    SendBytes,
    SessionState,
)

VERSION: dict[str, JsonValue] = {
    "qemu": {"major": 7, "minor": 2, "micro": 22},
    "package": "Debian 1:7.2+dfsg-7+deb12u18+b3",
}
GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
    b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n'
)


def drain(session: QmpSession) -> list[SendBytes | Execute]:
    out: list[SendBytes | Execute] = []
    while (event := session.next_event()) is not None:
        out.append(event)
        if isinstance(event, Execute):
            break
    return out


def talk(session: QmpSession, data: bytes) -> bytes:
    """Feed data; answer every Execute with {"return": {}}; return all output."""
    session.receive_data(data)
    out = b""
    while (event := session.next_event()) is not None:
        if isinstance(event, SendBytes):
            out += event.data
        else:
            out += session.reply(event, {})
    return out


def negotiated(oob: bool = False) -> QmpSession:
    session = QmpSession(VERSION)
    caps = b',"arguments":{"enable":["oob"]}' if oob else b""
    assert talk(session, b'{"execute":"qmp_capabilities"' + caps + b"}") == b'{"return": {}}\r\n'
    assert session.state is SessionState.COMMAND
    assert session.oob_enabled is oob
    return session


def error(desc: str, cls: str = "GenericError", id_: str | None = None) -> bytes:
    body = f'{{"class": "{cls}", "desc": {json.dumps(desc)}}}'
    if id_ is None:
        return f'{{"error": {body}}}\r\n'.encode()
    return f'{{"id": {id_}, "error": {body}}}\r\n'.encode()


def test_greeting_matches_qsd() -> None:
    assert QmpSession(VERSION).greeting() == GREETING


NEGOTIATION_CASES = [
    (
        b'{"execute":"query-version"}',
        error("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"),
    ),
    (
        b'{"execute":"nosuch","id":1}',
        error("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound", "1"),
    ),
    (
        b'{"exec-oob":"query-version","id":1}',
        error("QMP input member 'exec-oob' is unexpected", id_="1"),
    ),
    (
        b'{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}',
        error("Parameter 'null' does not accept value 'bogus'"),
    ),
    (
        b'{"execute":"qmp_capabilities","arguments":{"enable":"x"}}',
        error("Invalid parameter type for 'enable', expected: array"),
    ),
    (
        b'{"execute":"qmp_capabilities","arguments":{"enable":null}}',
        error("Invalid parameter type for 'enable', expected: array"),
    ),
    (
        b'{"execute":"qmp_capabilities","arguments":{"enable":[1]}}',
        error("Invalid parameter type for 'enable[0]', expected: string"),
    ),
    (
        b'{"execute":"qmp_capabilities","arguments":{"x":1}}',
        error("Parameter 'x' is unexpected"),
    ),
    (b"{bad json}", error("JSON parse error, invalid keyword 'bad'")),
]


@pytest.mark.parametrize(("request_", "reply"), NEGOTIATION_CASES)
def test_negotiation_refusals(request_: bytes, reply: bytes) -> None:
    session = QmpSession(VERSION)
    assert talk(session, request_) == reply
    assert session.state is SessionState.NEGOTIATION


def test_negotiation_with_id_and_then_already_complete() -> None:
    session = QmpSession(VERSION)
    out = talk(session, b'{"execute":"qmp_capabilities","id":{"x":[1,2]}}')
    assert out == b'{"return": {}, "id": {"x": [1, 2]}}\r\n'
    out = talk(session, b'{"execute":"qmp_capabilities","id":{"x":[1,2]}}')
    assert out == error(
        "Capabilities negotiation is already complete, command ignored",
        "CommandNotFound",
        '{"x": [1, 2]}',
    )
    # Arguments are still checked first, as qsd's marshaller does.
    out = talk(session, b'{"execute":"qmp_capabilities","arguments":{"enable":"x"}}')
    assert out == error("Invalid parameter type for 'enable', expected: array")


def test_enable_empty_and_duplicates_are_accepted() -> None:
    for args in (b"{}", b'{"enable":[]}', b'{"enable":["oob","oob"]}'):
        session = QmpSession(VERSION)
        out = talk(session, b'{"execute":"qmp_capabilities","arguments":' + args + b"}")
        assert out == b'{"return": {}}\r\n'


COMMAND_CASES = [
    (b'{"arguments":{}}', error("QMP input lacks member 'execute'")),
    (b'{"id":7}', error("QMP input lacks member 'execute'", id_="7")),
    (b'{"execute":1}', error("QMP input member 'execute' must be a string")),
    (b"[1,2]", error("QMP input must be a JSON object")),
    (b'"str"', error("QMP input must be a JSON object")),
    (
        b'{"execute":"query-version","arguments":[]}',
        error("QMP input member 'arguments' must be an object"),
    ),
    (
        b'{"execute":"query-version","id":1,"bogus":2}',
        error("QMP input member 'bogus' is unexpected", id_="1"),
    ),
    # Several bad members: qsd reports the first in its hash-table order.
    (
        b'{"execute":1, "arguments": [], "id": 1}',
        error("QMP input member 'execute' must be a string", id_="1"),
    ),
    (
        b'{"arguments": [], "id": 1, "zzz": 1}',
        error("QMP input member 'zzz' is unexpected", id_="1"),
    ),
    (
        b'{"execute":"qmp_capabilities","id":1, "control": {}}',
        error("QMP input member 'control' is unexpected", id_="1"),
    ),
    (
        b'{"exec-oob":"query-version","id":2}',
        error("QMP input member 'exec-oob' is unexpected", id_="2"),
    ),
    (b'{"execute":"x"', b""),  # incomplete: nothing yet
]


@pytest.mark.parametrize(("request_", "reply"), COMMAND_CASES)
def test_envelope_errors(request_: bytes, reply: bytes) -> None:
    session = negotiated()
    assert talk(session, request_) == reply


OOB_CASES = [
    (
        b'{"exec-oob":"query-version","id":1}',
        error("The command query-version does not support OOB", id_="1"),
    ),
    (
        b'{"exec-oob":"qmp_capabilities","id":1}',
        error("The command qmp_capabilities does not support OOB", id_="1"),
    ),
    (
        b'{"exec-oob":"query-version","execute":"query-version","id":2}',
        error("QMP input member 'execute' clashes with 'exec-oob'", id_="2"),
    ),
    (b'{"exec-oob":1}', error("QMP input member 'exec-oob' must be a string")),
    (b'{"execute":1,"exec-oob":"x"}', error("QMP input member 'execute' must be a string")),
    (b'{"execute":"x","exec-oob":1}', error("QMP input member 'exec-oob' must be a string")),
    (
        b'{"execute":"query-version","exec-oob":"x", "arguments":[]}',
        error("QMP input member 'execute' clashes with 'exec-oob'"),
    ),
    (b'{"exec-oob":"nosuch"}', error("The command nosuch has not been found", "CommandNotFound")),
]


@pytest.mark.parametrize(("request_", "reply"), OOB_CASES)
def test_exec_oob_with_oob_enabled(request_: bytes, reply: bytes) -> None:
    session = negotiated(oob=True)
    session.commands = {"query-version", "qmp_capabilities"}
    assert talk(session, request_) == reply


def test_unknown_command_with_a_command_table() -> None:
    session = negotiated()
    session.commands = {"query-version"}
    out = talk(session, b'{"execute":"nosuch","arguments":{"a":1}}')
    assert out == error("The command nosuch has not been found", "CommandNotFound")


def test_execute_event_and_reply() -> None:
    session = negotiated()
    session.receive_data(b'{"execute":"query-version","id":"abc"}')
    (event,) = drain(session)
    assert isinstance(event, Execute)
    assert (event.command, event.arguments, event.id, event.has_id, event.oob) == (
        "query-version",
        None,
        "abc",
        True,
        False,
    )
    out = session.reply(event, VERSION)
    assert out == (
        b'{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
        b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "id": "abc"}\r\n'
    )
    with pytest.raises(LocalProtocolError):
        session.reply(event, {})


def test_reply_error_and_arguments() -> None:
    session = negotiated()
    session.receive_data(b'{"execute":"x","arguments":{"b":1,"a":[2]}}')
    (event,) = drain(session)
    assert isinstance(event, Execute)
    assert event.arguments == {"b": 1, "a": [2]}
    assert event.has_id is False
    out = session.reply_error(event, QmpError("Parameter 'x' is unexpected"))
    assert out == error("Parameter 'x' is unexpected")


def test_requests_are_answered_in_order() -> None:
    session = negotiated()
    session.receive_data(b'{"execute":"a","id":1}{bad}{"execute":"b","id":2}')
    first = drain(session)
    assert len(first) == 1 and isinstance(first[0], Execute)
    # Nothing else (not even the parse error) comes out before the reply.
    assert session.next_event() is None
    assert session.awaiting_reply is first[0]
    assert session.reply(first[0], 1) == b'{"return": 1, "id": 1}\r\n'
    second = drain(session)
    assert isinstance(second[0], SendBytes)
    assert second[0].data == error("JSON parse error, invalid keyword 'bad'")
    assert isinstance(second[1], Execute) and second[1].id == 2
    with pytest.raises(LocalProtocolError):
        session.reply(first[0], 1)


# Any string QEMU accepts: no surrogates, no noncharacters.
_chars = st.characters(blacklist_categories=["Cs"], max_codepoint=0xFFFD).filter(
    lambda c: not 0xFDD0 <= ord(c) <= 0xFDEF
)
_ids = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_chars, max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(_chars, max_size=3), c, max_size=3),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(_ids)
def test_id_is_echoed_verbatim(id_: JsonValue) -> None:
    session = negotiated()
    request = json.dumps({"execute": "x", "id": id_}).encode()
    out = talk(session, request)
    (reply,) = JsonStream().feed(out)
    assert reply == {"return": {}, "id": id_}
    out = talk(session, json.dumps({"execute": 1, "id": id_}).encode())
    (reply,) = JsonStream().feed(out)
    assert isinstance(reply, dict) and reply["id"] == id_


def test_events_only_after_negotiation() -> None:
    session = QmpSession(VERSION)
    assert session.event("BLOCK_EXPORT_DELETED", {"id": "e0"}, 1) is None
    session = negotiated()
    ts = 1795642922_307606_123
    assert session.event("BLOCK_EXPORT_DELETED", {"id": "e0"}, ts) == (
        b'{"timestamp": {"seconds": 1795642922, "microseconds": 307606}, '
        b'"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}}\r\n'
    )
    assert session.event("STOP", None, ts) == (
        b'{"timestamp": {"seconds": 1795642922, "microseconds": 307606}, "event": "STOP"}\r\n'
    )


def test_pretty_output_matches_qsd() -> None:
    session = QmpSession(VERSION, pretty=True)
    assert session.greeting() == (
        b'{\r\n    "QMP": {\r\n        "version": {\r\n            "qemu": {\r\n'
        b'                "micro": 22,\r\n                "minor": 2,\r\n'
        b'                "major": 7\r\n            },\r\n'
        b'            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"\r\n        },\r\n'
        b'        "capabilities": [\r\n            "oob"\r\n        ]\r\n    }\r\n}\r\n'
    )
    out = talk(session, b'{"exec-oob":"qmp_capabilities","id":1}{"execute":"qmp_capabilities"}')
    assert out == (
        b'{\r\n    "id": 1,\r\n    "error": {\r\n        "class": "GenericError",\r\n'
        b'        "desc": "QMP input member \'exec-oob\' is unexpected"\r\n    }\r\n}\r\n'
        b'{\r\n    "return": {\r\n    }\r\n}\r\n'
    )


def test_non_json_result_leaves_the_request_pending() -> None:
    session = negotiated()
    session.receive_data(b'{"execute":"x"}')
    (event,) = drain(session)
    assert isinstance(event, Execute)
    with pytest.raises(TypeError):
        session.reply(event, {"a": object()})
    assert session.awaiting_reply is event
    assert session.reply_error(event, QmpError("boom")) == error("boom")


def test_parse_error_then_recovery_in_one_write() -> None:
    session = negotiated()
    out = talk(session, b'{bad json}{"execute":"x"}')
    assert out == error("JSON parse error, invalid keyword 'bad'") + b'{"return": {}}\r\n'
