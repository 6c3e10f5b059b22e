"""QMP compat: the same transcripts run on the reference qsd and on ours, replies compared.

Test ring (compat). Each test starts a fresh pair of daemons (stopped by PID at teardown);
replies are normalised by tests/compat/harness.py, so only meaningful differences fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import (
    Cmd,
    Compat,
    ExpectEof,
    Normaliser,
    Raw,
    StepLike,
    WaitEvent,
    as_step,
    canonical,
    canonical_block_graph,
    make_raw_image,
    normalise_transcript,
    ours_is_reference,
)
from tests.integration.daemon import QmpEof

pytestmark = pytest.mark.compat

QV = Cmd("query-version")


def null(name: str, **opts: Any) -> Cmd:
    return Cmd("blockdev-add", {"driver": "null-co", "node-name": name, **opts})


# -- protocol --------------------------------------------------------------------------------


def test_negotiation_gate(compat: Compat) -> None:
    compat.check_transcript(
        [
            QV,
            Cmd("query-version", id="before"),
            Cmd("nosuch-command"),
            Raw(b'{"execute":"query-version","arguments":[]}\n'),
            Raw(b"[1]\n"),
            Cmd("qmp_capabilities", {"enable": ["nosuch"]}),
            Cmd("qmp_capabilities", {"enable": "oob"}),
            Cmd("qmp_capabilities", {"bogus": 1}),
            Cmd("qmp_capabilities", {"enable": ["oob"]}, id=7),
            Cmd("qmp_capabilities"),
            QV,
        ],
        negotiate=False,
    )


def test_plain_negotiation_then_second(compat: Compat) -> None:
    compat.check_transcript([Cmd("qmp_capabilities"), Cmd("qmp_capabilities", {"enable": []}), QV])


def test_unknown_command_and_bad_arguments(compat: Compat) -> None:
    compat.check_transcript(
        [
            Cmd("nosuch-command"),
            Cmd("nosuch-command", id="x"),
            Cmd("query-version", {"x": 1}),
            Cmd("query-version", {"x": 1, "y": 2}, id=[1]),
            Cmd("query-version", {}),
            Cmd("Query-Version"),
            Cmd(""),
        ]
    )


ID_VALUES: list[Any] = [
    "abc",
    "",
    1,
    -5,
    2**53,
    1.5,
    {"a": [1]},
    [1, "x", None],
    None,
    True,
    False,
    {},
]


def test_id_echo(compat: Compat) -> None:
    """One daemon pair for all ids (startup cost); the diff names the failing step."""
    steps: list[StepLike] = []
    for ident in ID_VALUES:
        steps += [
            Cmd("query-version", id=ident),
            Cmd("nosuch-command", id=ident),
            Cmd("query-version", {"x": 1}, id=ident),
        ]
    compat.check_transcript(steps)


ENVELOPE_ERRORS = [
    b'{"arguments":{}}\n',
    b"{}\n",
    b'{"execute":1}\n',
    b'{"execute":null}\n',
    b'{"execute":["query-version"]}\n',
    b"[1,2]\n",
    b'"query-version"\n',
    b"42\n",
    b"null\n",
    b'{"execute":"query-version","arguments":[]}\n',
    b'{"execute":"query-version","arguments":"x"}\n',
    b'{"execute":"query-version","arguments":null}\n',
    b'{"execute":"query-version","id":1,"bogus":2}\n',
    b'{"execute":"query-version","bogus":2}\n',
    b'{"execute":"query-version","exec-oob":"query-version"}\n',
    b'{"execute":"query-version","control":{}}\n',
    b"{bad json}\n",
    b'{"execute":"query-version",}\n',
    b"{'execute':'query-version'}\n",
    b'{"execute":"query-version"}{"execute":"query-version","id":2}\n',
    b'{"execute":"query-version","id":1,"id":2}\n',
    b"   \n",
    b"garbage\n",
    b"}\n",
]


def test_envelope_errors(compat: Compat) -> None:
    """Each malformed envelope, then a command proving the connection still works."""
    steps: list[StepLike] = []
    for data in ENVELOPE_ERRORS:
        steps += [Raw(data), QV]
    compat.check_transcript(steps)


def test_exec_oob(compat: Compat) -> None:
    # Without the capability, then with it.
    compat.check_transcript(
        [
            Cmd("query-version", oob=True),
            Cmd("nosuch", oob=True),
            Cmd("query-version", oob=True, id=3),
        ]
    )
    compat.check_transcript(
        [
            Cmd("qmp_capabilities", {"enable": ["oob"]}),
            Cmd("query-version", oob=True),
            Cmd("query-version", oob=True, id="o"),
            Cmd("nosuch", oob=True),
            Cmd("qmp_capabilities", oob=True),
            QV,
        ],
        negotiate=False,
    )


def test_query_version(compat: Compat) -> None:
    result = compat.check_transcript([QV, Cmd("query-version", id="v")])
    # The normalised shape must still be the VersionInfo shape, not "anything".
    for side in ("reference", "ours"):
        reply = result.raw[side][2]["reply"]["return"]
        assert set(reply) == {"qemu", "package"}
        assert all(isinstance(reply["qemu"][k], int) for k in ("major", "minor", "micro"))


# Commands we have on purpose that qsd 7.2 lacks: QEMU 10.0's inactive nodes, and our own
# structured single-node query.
BEYOND_7_2 = {"blockdev-set-active", "x-query-block-node"}


def test_query_commands(compat: Compat) -> None:
    """Ours lists a subset of qsd's commands, and each entry we list equals qsd's entry."""
    pair = compat.daemons()
    listed: dict[str, dict[str, Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        reply = client.cmd("query-commands")
        assert "return" in reply, reply
        entries = reply["return"]
        listed[side] = {e["name"]: e for e in entries}
        assert len(listed[side]) == len(entries), f"{side} lists a command twice"
    ref, ours = listed["reference"], listed["ours"]
    extra = sorted(set(ours) - set(ref) - BEYOND_7_2)
    assert not extra, f"ours lists commands qsd 7.2 does not have: {extra}"
    assert {"qmp_capabilities", "query-version", "query-commands"} <= set(ours)
    differing = {
        n: (ref[n], ours[n])
        for n in set(ours) & set(ref)
        if canonical(ref[n]) != canonical(ours[n])
    }
    assert not differing, differing


# -- block nodes -----------------------------------------------------------------------------


def test_blockdev_add_null_options(compat: Compat) -> None:
    compat.check_transcript(
        [
            null("n0"),
            null("n1", size=4096, **{"read-zeroes": True, "latency-ns": 1000}),
            Cmd("blockdev-add", {"driver": "null-aio", "node-name": "a0", "size": 1 << 30}),
            Cmd(
                "blockdev-add",
                {
                    "driver": "null-aio",
                    "node-name": "a1",
                    "read-only": True,
                    "cache": {"direct": True, "no-flush": True},
                },
            ),
            null("n2", **{"detect-zeroes": "unmap", "discard": "unmap"}),
            null("n3", **{"detect-zeroes": "on", "force-share": True, "read-only": True}),
            null("n4", **{"force-share": True}),
            null("n5", **{"detect-zeroes": "unmap"}),
            null("n6", **{"cache": {"direct": False}, "auto-read-only": True}),
            null("n7", size=0),
            null("n8", size=2**63 - 1),
            null("n9", size=2**62),
            null("n9b", size=2**63),
            null("n9c", size=2**64),
            null("n10", **{"latency-ns": -1}),
            null("n11", **{"detect-zeroes": "maybe"}),
            null("n12", **{"discard": "maybe"}),
            null("n13", **{"cache": {"bogus": True}}),
            null("n14", **{"read-only": "yes"}),
            Cmd("query-named-block-nodes"),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("query-named-block-nodes", {"flat": False}, sort_by="node-name"),
            Cmd("x-debug-query-block-graph"),
        ]
    )


def test_blockdev_add_negative_size(compat: Compat) -> None:
    """qsd 7.2 aborts on a negative `size` (same bug as on the command line); ours must answer
    with the message qsd prints before aborting and keep serving. Not a transcript comparison."""
    pair = compat.daemons()
    args = {"driver": "null-co", "node-name": "n", "size": -1}
    ref = compat.connect(pair["reference"])
    ref.negotiate()
    with pytest.raises(QmpEof):
        ref.cmd("blockdev-add", args)
    if ours_is_reference():
        return
    ours = compat.connect(pair["ours"])
    ours.negotiate()
    assert ours.cmd("blockdev-add", args) == {
        "error": {
            "class": "GenericError",
            "desc": "Parameter 'size' expects a non-negative number below 2^64",
        }
    }
    assert "return" in ours.cmd("query-version")


def test_blockdev_add_errors(compat: Compat) -> None:
    compat.check_transcript(
        [
            null("n0"),
            null("n0"),
            null("1bad"),
            null("#x"),
            null("a" * 31),
            null("b" * 32),
            null("c" * 40),
            null(""),
            null("bad name"),
            null("ok-._9"),
            null("n1", size="abc"),
            null("n1", bogus=1),
            null("n1", size=1.5),
            Cmd("blockdev-add", {"driver": "nosuch", "node-name": "a"}),
            Cmd("blockdev-add", {"driver": "null-co"}),
            Cmd("blockdev-add", {"node-name": "n2"}),
            Cmd("blockdev-add", {}),
            Cmd("blockdev-add"),
            Cmd("blockdev-add", {"driver": 5, "node-name": "n2"}),
            Cmd("blockdev-add", {"driver": "null-co", "node-name": 5}),
            Cmd("query-named-block-nodes", {"flat": True}),
        ]
    )


def test_blockdev_del(compat: Compat) -> None:
    compat.check_transcript(
        [
            null("n0"),
            null("n1"),
            Cmd("blockdev-del", {"node-name": "n0"}),
            Cmd("blockdev-del", {"node-name": "n0"}),
            Cmd("blockdev-del", {"node-name": "nosuch"}),
            Cmd("blockdev-del", {}),
            Cmd("blockdev-del", {"node-name": 1}),
            Cmd("query-named-block-nodes", {"flat": True}),
            null("n0"),
            Cmd("query-named-block-nodes", {"flat": True}),
        ]
    )


def test_file_raw_and_auto_named_children(compat: Compat) -> None:
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "$D/img.raw"}),
            Cmd("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"}),
            Cmd(
                "blockdev-add", {"driver": "raw", "node-name": "r1", "file": {"driver": "null-co"}}
            ),
            Cmd("blockdev-add", {"driver": "raw", "node-name": "r2", "file": "nosuch"}),
            Cmd(
                "blockdev-add", {"driver": "file", "node-name": "f1", "filename": "/nonexistent/x"}
            ),
            Cmd("query-named-block-nodes"),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("x-debug-query-block-graph"),
            Cmd("blockdev-del", {"node-name": "f0"}),
            Cmd("blockdev-del", {"node-name": "r1"}),
            Cmd("query-named-block-nodes", {"flat": True}),
        ],
        setup=make_raw_image,
    )


def test_nodes_from_command_line(compat: Compat) -> None:
    compat.check_transcript(
        [Cmd("query-named-block-nodes", {"flat": True}), Cmd("x-debug-query-block-graph")],
        args=[
            "--blockdev",
            "driver=null-co,node-name=c0",
            "--blockdev",
            '{"driver":"null-aio","node-name":"c1","size":512}',
        ],
    )


def test_quit(compat: Compat) -> None:
    result = compat.check_transcript([null("n0"), Cmd("quit", id="bye"), ExpectEof()])
    final = result.norm["reference"][-2]
    assert final["eof"] is True
    assert final["exit"] == 0


# -- malformed input robustness --------------------------------------------------------------

MALFORMED = {
    "nesting-1024": b"[" * 1024 + b"]" * 1024 + b"\n",
    "nesting-1025": b"[" * 1025 + b"]" * 1025 + b"\n",
    "nesting-objects": b'{"a":' * 1100 + b"1" + b"}" * 1100 + b"\n",
    "huge-arguments": b'{"execute":"query-version","arguments":{"x":"' + b"a" * 65536 + b'"}}\n',
    "huge-id": b'{"execute":"query-version","id":"' + b"i" * 65536 + b'"}\n',
    "huge-list": b'{"execute":"query-version","id":[' + b"1," * 20000 + b"1]}\n",
    "garbage-bytes": b"\xff\xfe garbage \x00\x01\n",
    "nul-bytes": b"\x00\x00\x00\n",
    "utf8-in-id": b'{"execute":"query-version","id":"\xc3\xa9\xe2\x82\xac"}\n',
    "invalid-utf8-in-id": b'{"execute":"query-version","id":"\xff"}\n',
    "overlong-utf8": b'{"execute":"query-version","id":"\xc0\xaf"}\n',
    "surrogate-utf8": b'{"execute":"query-version","id":"\xed\xa0\x80"}\n',
    "lone-surrogate-escape": b'{"execute":"query-version","id":"\\ud800"}\n',
    "escapes": b'{"execute":"query-version","id":"\\u00e9\\n\\t\\"\\\\\\/"}\n',
    "bare-utf8": b"\xc3\xa9\n",
    "control-char-in-string": b'{"execute":"query-version","id":"a\x01b"}\n',
    "big-number": b'{"execute":"query-version","id":123456789012345678901234567890}\n',
    "float-forms": b'{"execute":"query-version","id":[1e3,-0,0.5,1E-2]}\n',
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input(compat: Compat, name: str) -> None:
    """Replies match, and the connection still answers afterwards (both sides)."""
    result = compat.check_transcript([Raw(MALFORMED[name]), QV], timeout=15.0)
    for side in ("reference", "ours"):
        after = result.norm[side][-2]
        assert "reply" in after and "return" in after["reply"], (side, after)


# -- harness self-checks (no daemon needed) --------------------------------------------------


def test_normaliser_placeholders(tmp_path: Path) -> None:
    n = Normaliser(tmp_path)
    reply = {
        "return": [
            {"node-name": "#block371", "file": f'json:{{"x": "#block12", "p": "{tmp_path}/a"}}'},
            {"node-name": "#block12"},
        ]
    }
    assert n.value(reply) == {
        "return": [
            {"file": 'json:{"x": "#block<1>", "p": "$D/a"}', "node-name": "#block<2>"},
            {"node-name": "#block<1>"},
        ]
    }
    event = {"event": "X", "timestamp": {"seconds": 1, "microseconds": 2}, "data": {}}
    assert n.value(event)["timestamp"] == "<TS>"
    version = {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "p"}
    assert n.value({"QMP": {"version": version}})["QMP"]["version"]["package"] == "<PKG>"
    assert n.output("/usr/bin/qemu-storage-daemon: x\n__main__.py: y\n") == ["PROG: x", "PROG: y"]
    # Exactness survives normalisation: 1 vs 1.0 vs true are different answers.
    assert canonical(n.value({"a": 1})) != canonical(n.value({"a": 1.0}))
    assert canonical(n.value({"a": 1})) != canonical(n.value({"a": True}))


def test_block_graph_renumbering() -> None:
    a = {
        "nodes": [
            {"name": "x", "type": "block-driver", "id": 9},
            {"name": "f", "type": "block-driver", "id": 4},
        ],
        "edges": [{"name": "file", "parent": 9, "child": 4, "perm": [], "shared-perm": []}],
    }
    b = {
        "nodes": [
            {"name": "f", "type": "block-driver", "id": 1},
            {"name": "x", "type": "block-driver", "id": 2},
        ],
        "edges": [{"name": "file", "parent": 2, "child": 1, "perm": [], "shared-perm": []}],
    }
    assert canonical(canonical_block_graph(a)) == canonical(canonical_block_graph(b))
    b["edges"][0]["parent"] = 1
    b["edges"][0]["child"] = 2
    assert canonical(canonical_block_graph(a)) != canonical(canonical_block_graph(b))


def test_sort_by_and_exact_order(tmp_path: Path) -> None:
    def rec(order: list[str], sort_by: str | None) -> list[Any]:
        r: dict[str, Any] = {
            "send": {"execute": "query-named-block-nodes"},
            "reply": {"return": [{"node-name": x} for x in order]},
        }
        if sort_by:
            r["_sort_by"] = sort_by
        return normalise_transcript([r], tmp_path)

    assert canonical(rec(["a", "b"], None)) != canonical(rec(["b", "a"], None))
    assert canonical(rec(["a", "b"], "node-name")) == canonical(rec(["b", "a"], "node-name"))


def test_tuple_steps() -> None:
    """Tuple shorthand builds the same steps as the dataclasses."""
    steps: list[StepLike] = [
        ("cmd", "query-version"),
        ("cmd", "blockdev-del", {"node-name": "n"}, {"id": 1}),
        ("raw", b"{}\n"),
        ("event", "JOB_STATUS_CHANGE"),
        ("eof",),
    ]
    assert [as_step(s) for s in steps] == [
        QV,
        Cmd("blockdev-del", {"node-name": "n"}, id=1),
        Raw(b"{}\n"),
        WaitEvent("JOB_STATUS_CHANGE"),
        ExpectEof(),
    ]


def test_block_resize_blockstats_and_query_block(compat: Compat) -> None:
    """block_resize through a temporary backend (conflicts name it), node lookup texts,
    negative sizes, drivers without resize; query-blockstats before any I/O; query-block."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "$D/img.raw"}),
            Cmd("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"}),
            Cmd("block_resize", {"node-name": "r0", "size": 2097152}),
            Cmd("block_resize", {"node-name": "f0", "size": -1}),
            Cmd("block_resize", {"node-name": "f0", "size": 1000}),
            Cmd("block_resize", {"device": "f0", "size": 4096}),
            Cmd("block_resize", {"device": "f0", "node-name": "f0", "size": 4096}),
            Cmd("block_resize", {"node-name": "nosuch", "size": 4096}),
            Cmd("block_resize", {"size": 4096}),
            Cmd("block_resize", {"node-name": "f0", "size": 3000000}),
            Cmd("query-named-block-nodes"),
            Cmd("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "f0", "size": 512}),
            Cmd("block_resize", {"node-name": "f0", "size": 8192}),
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "n0"}),
            Cmd("block_resize", {"node-name": "n0", "size": 4096}),
            Cmd("query-blockstats"),
            Cmd("query-blockstats", {"query-nodes": True}),
            Cmd("query-block"),
        ],
        setup=make_raw_image,
    )


def test_nul_in_file_names(compat: Compat) -> None:
    """JSON may put U+0000 in a name: qsd keeps it as the bytes C0 80 (modified UTF-8), so
    opening a missing file fails as usual, and files and sockets are created under that
    name; never an internal error."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "file", "node-name": "x", "filename": "$D/a\0b"}),
            Cmd(
                "chardev-add",
                {"id": "c1", "backend": {"type": "file", "data": {"out": "$D/e\0f"}}},
            ),
            Cmd("blockdev-add", {"driver": "file", "node-name": "y", "filename": "$D/e\0f"}),
            Cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "$D/n\0s"}}}),
            Cmd("query-named-block-nodes", {"flat": True}),
        ]
    )
