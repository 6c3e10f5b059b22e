"""Option help and the man page from the schema docs; typed --chardev parsing (pure parts).

Unit ring. The schema walk here is written independently of storage_daemon.help, so an option
the help generator forgets (or a member left undocumented) fails a test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storage_daemon.chardevs import (
    LEGACY_KEYS,
    backend_from_legacy,
    is_typed_chardev,
    parse_typed_chardev,
)
from storage_daemon.cli import CHARDEV_OPTS, help_text
from storage_daemon.errors import QmpError
from storage_daemon.help import (
    MAN_PATH,
    OPTION_TYPES,
    chardev_help,
    main,
    man_page,
    option_help,
    shown_kind,
    split_default,
)
from storage_daemon.keyval import KeyvalError
from storage_daemon.qapi.runtime import to_wire
from storage_daemon.qapi_generated.types import TYPES

REPO = Path(__file__).resolve().parents[2]


# ---- an independent walk of the schema ---------------------------------------------------------


def _leaves(
    type_name: str, prefix: str, seen: tuple[str, ...], variants: bool = True
) -> list[tuple[str, str]]:
    """(dotted keyval name, doc) of every member reachable from struct/union `type_name`;
    the name is "" for struct/union members, which are listed as their own members."""
    spec = TYPES[type_name]
    out: list[tuple[str, str]] = []
    members = list(spec.members)
    for v in spec.variants if variants else ():
        members += TYPES[v.type].members
    for m in members:
        name, mtype = prefix + m.name, TYPES[m.type]
        while mtype.kind == "array":
            assert mtype.element is not None
            name, mtype = name + ".N", TYPES[mtype.element]
        # a struct or union member is listed as its members (`cache.direct`), not by itself
        out.append((name if mtype.kind != "object" else "", m.doc))
        if mtype.kind == "object" and mtype.name not in seen:
            out += _leaves(mtype.name, name + ".", (*seen, mtype.name))
        if mtype.kind == "alternate":
            for b in mtype.branches:
                btype = TYPES[b.type]
                if btype.kind == "object" and b.type != "BlockdevOptions" and b.type not in seen:
                    out += _leaves(b.type, name + ".", (*seen, b.type))
    return out


def _help_cases() -> list[tuple[str, str | None, str]]:
    """(option, kind, schema type whose members that help must list)."""
    cases: list[tuple[str, str | None, str]] = []
    for option, (type_name, _) in OPTION_TYPES.items():
        spec = TYPES[type_name]
        if spec.tag is None:
            cases.append((option, None, type_name))
        for v in spec.variants:
            cases.append((option, v.case, v.type))
    return cases


@pytest.mark.parametrize(("option", "kind", "type_name"), _help_cases())
def test_every_option_is_documented_and_listed(
    option: str, kind: str | None, type_name: str
) -> None:
    text = option_help(option, kind if kind is None else shown_kind(option, kind))
    listed = {line.split("=", 1)[0].strip() for line in text.splitlines() if "=<" in line}
    leaves = _leaves(type_name, "", (type_name,))
    if option != "--object" and kind is not None:  # the union's base members are listed too
        base = TYPES[OPTION_TYPES[option][0]]
        leaves += [(n, d) for n, d in _leaves(base.name, "", (), False) if n != base.tag]
    assert leaves, type_name
    for name, doc in leaves:
        assert doc.strip(), f"{type_name}: member {name} is undocumented"
        assert not name or name in listed, f"{option} {kind},help does not list {name}"


def test_union_help_lists_every_kind_with_its_doc() -> None:
    for option, (type_name, _) in OPTION_TYPES.items():
        spec = TYPES[type_name]
        if spec.tag is None:
            continue
        text = option_help(option, None)
        tag_enum = TYPES[next(m.type for m in spec.members if m.name == spec.tag)]
        for v in spec.variants:
            doc = tag_enum.value_docs[tag_enum.values.index(v.case)]
            shown = shown_kind(option, v.case)
            line = next(x for x in text.splitlines() if x.split()[:1] == [shown])
            assert doc and line.endswith(doc.replace("@", "")), (option, v.case, line)


def test_blockdev_help_lines() -> None:
    text = option_help("--blockdev", "null-co")
    assert text.startswith("null-co options:\n")
    lines = text.splitlines()[1:]
    assert lines == sorted(lines, key=lambda x: x.split("=", 1)[0])
    assert "  size=<int>             - size of the device in bytes (default: 1 GiB)" in lines
    assert any(x.startswith("  detect-zeroes=<off|on|unmap> - ") for x in lines)
    assert any(x.startswith("  cache.direct=<bool> ") for x in lines)
    assert not any(x.startswith("  driver=") for x in lines)  # given already
    with pytest.raises(QmpError, match="Parameter 'driver' does not accept value 'nosuch'"):
        option_help("--blockdev", "nosuch")


def test_qcow2_help_has_node_references() -> None:
    text = option_help("--blockdev", "qcow2")
    assert "  file=<node reference> " in text
    assert "  backing=<node reference or null> " in text


def test_object_help_keeps_qsd_names_and_order() -> None:
    text = option_help("--object", "iothread")
    names = [x.split("=")[0].strip() for x in text.splitlines()[1:]]
    # the same lines as qsd 7.2's `--object iothread,help`, descriptions added
    assert names == [
        "aio-max-batch",
        "poll-grow",
        "poll-max-ns",
        "poll-shrink",
        "thread-pool-max",
        "thread-pool-min",
    ]
    assert text.splitlines()[1].startswith("  aio-max-batch=<int>    - ")
    assert option_help("--object", "nosuch") == option_help("--object", None)
    listing = option_help("--object", None)
    assert listing.startswith("List of user creatable objects:\n")
    types = [line.split()[0] for line in listing.splitlines()[1:]]
    assert types == sorted(types) and "iothread" in types  # qsd lists them sorted


def test_chardev_help_has_typed_and_legacy_names() -> None:
    listing = chardev_help(None)
    assert listing.startswith("Available chardev backend types: \n")
    for backend in LEGACY_KEYS:
        assert f"\n  {backend} " in listing
    text = chardev_help("socket")
    typed, _, legacy = text.partition("socket options (legacy syntax")
    for key in LEGACY_KEYS["socket"]:
        assert f"\n  {key}=<" in legacy
        assert key in CHARDEV_OPTS
    assert "  addr.path=<str> " in typed and "  server=<bool> " in typed
    server = next(x for x in legacy.splitlines() if x.startswith("  server="))
    assert server.endswith("(default: off)")  # the legacy default differs from the typed one
    assert next(x for x in typed.splitlines() if x.startswith("  server=")).endswith(
        "(default: on)"
    )
    with pytest.raises(QmpError, match="'pty' is not a valid char driver name"):
        chardev_help("pty")


@pytest.mark.parametrize(
    ("doc", "text", "default"),
    [
        ("open the node read-only (default off)", "open the node read-only", "off"),
        ("name (default: the node name)", "name", "the node name"),
        (
            "bypass the host page cache (O_DIRECT); default off",
            "bypass the host page cache (O_DIRECT)",
            "off",
        ),
        ("maximum (0: default)", "maximum (0: default)", None),
        ("append to @out instead", "append to out instead", None),
    ],
)
def test_split_default(doc: str, text: str, default: str | None) -> None:
    assert split_default(doc) == (text, default)


def test_help_text_points_to_the_help_options() -> None:
    text = help_text("storage-daemon")
    for request in ("--blockdev help", "--blockdev <driver>,help", "--chardev <backend>,help"):
        assert request in text
    assert "storage-daemon(1)" in text


# ---- the man page --------------------------------------------------------------------------------


def test_man_page_is_fresh() -> None:
    assert (REPO / MAN_PATH).read_text(encoding="utf-8") == man_page(), (
        "run: python -m storage_daemon.help --man"
    )
    assert main(["--check"]) == 0


def test_man_page_covers_every_kind_and_option() -> None:
    page = man_page().replace("\\-", "-")
    assert page.startswith('.\\" Generated') and ".TH STORAGE" in page
    for option, (type_name, _) in OPTION_TYPES.items():
        assert f"\\fB{option}" in page
        for v in TYPES[type_name].variants:
            assert f".SS {v.case}\n" in page
            for name, _ in _leaves(v.type, "", (v.type,)):
                assert not name or f"\\fB{name}\\fR=<" in page, (option, v.case, name)


# ---- typed --chardev (pure parts) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "typed"),
    [
        ("socket,id=c0,path=/x,server=on,wait=off", False),
        ("null,id=c0", False),
        ("ringbuf,id=r,size=1024", False),
        ("socket,id=c,path=/s,server,nowait", False),
        ('{"id":"c0","backend":{"type":"null","data":{}}}', True),
        ("socket,id=m,addr.type=unix,addr.path=/x", True),
        ("file,id=f,out=/x", True),
        ("file,id=f,path=/x", False),
        ("null,id=c0,path=a,,addr.type=x", False),  # `,,`: part of path's value
    ],
)
def test_is_typed_chardev(arg: str, typed: bool) -> None:
    assert is_typed_chardev(arg) is typed


def _wire(arg: str) -> tuple[str, Any]:
    chardev_id, backend = parse_typed_chardev(arg)
    return chardev_id, to_wire(backend)


UNIX_SERVER = {
    "type": "socket",
    "data": {"addr": {"type": "unix", "data": {"path": "/x"}}, "server": True, "wait": False},
}


def test_typed_chardev_forms_agree() -> None:
    forms = [
        "socket,id=m,addr.type=unix,addr.path=/x,server=on,wait=off",
        "backend=socket,id=m,addr.type=unix,addr.path=/x,server=yes,wait=no",
        '{"id":"m","backend":"socket","addr":{"type":"unix","path":"/x"},'
        '"server":true,"wait":false}',
        '{"id":"m","backend":{"type":"socket","data":{"addr":{"type":"unix",'
        '"data":{"path":"/x"}},"server":true,"wait":false}}}',
    ]
    for form in forms:
        assert _wire(form) == ("m", UNIX_SERVER), form
    assert _wire("file,id=f,out=/o,append=on") == (
        "f",
        {"type": "file", "data": {"out": "/o", "append": True}},
    )
    assert _wire('{"id":"r","backend":"memory","size":4096}') == (
        "r",
        {"type": "memory", "data": {"size": 4096}},
    )
    inet = _wire("socket,id=t,addr.type=inet,addr.host=127.0.0.1,addr.port=0,reconnect=2")
    assert inet[1]["data"] == {
        "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
        "reconnect": 2,
    }


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("socket,id=m,addr.type=unix", "Parameter 'addr.path' is missing"),
        (
            "socket,id=m,addr.type=unix,addr.path=/x,server=maybe",
            "Parameter 'server' expects 'on' or 'off'",
        ),
        ("socket,addr.type=unix,addr.path=/x", "Parameter 'id' is missing"),
        ("pty,id=p,addr.type=unix", "Parameter 'backend' does not accept value 'pty'"),
        ("socket,id=m,addr.type=unix,addr.path=/x,bogus=1", "Parameter 'bogus' is unexpected"),
        ("file,id=f,out=/x,path=/y", "Parameter 'path' is unexpected"),
        (
            '{"id":"m","backend":"socket","addr":{"type":"unix"}}',
            "Parameter 'addr.path' is missing",
        ),
        ('{"id":"m","backend":{"type":"null"}}', "Parameter 'backend.data' is missing"),
        ('{"id":"m","backend":"null","server":1}', "Parameter 'server' is unexpected"),
    ],
)
def test_typed_chardev_errors(arg: str, message: str) -> None:
    with pytest.raises((QmpError, KeyvalError)) as info:
        parse_typed_chardev(arg)
    err = info.value
    assert isinstance(err, (QmpError, KeyvalError))
    assert (err.desc if isinstance(err, QmpError) else err.message) == message


def test_legacy_params_map_to_the_wrapped_form() -> None:
    params = {"backend": "socket", "id": "c", "path": "/s", "server": "on", "wait": "off"}
    assert to_wire(backend_from_legacy(params)) == {
        "type": "socket",
        "data": {
            "addr": {"type": "unix", "data": {"path": "/s"}},
            "server": True,
            "wait": False,
            "nodelay": False,
            "telnet": False,
            "tn3270": False,
            "websocket": False,
        },
    }
    client = to_wire(
        backend_from_legacy({"backend": "socket", "host": "h", "port": "1", "delay": "off"})
    )
    assert client["data"]["server"] is False and client["data"]["wait"] is True
    assert client["data"]["nodelay"] is True
    assert client["data"]["addr"] == {"type": "inet", "data": {"host": "h", "port": "1"}}
    assert to_wire(backend_from_legacy({"backend": "file", "path": "/o"})) == {
        "type": "file",
        "data": {"out": "/o"},
    }
    assert to_wire(backend_from_legacy({"backend": "ringbuf", "size": "4k"}))["data"] == {
        "size": 4096
    }
    for params, message in [
        ({"backend": "socket"}, "Unable to parse FD number "),
        ({"backend": "socket", "host": "h"}, "chardev: socket: no port given"),
        ({"backend": "file"}, "chardev: file: no filename given"),
    ]:
        with pytest.raises(QmpError) as info:
            backend_from_legacy(params)
        assert info.value.desc == message
