"""Objects, QOM and filter nodes run on the reference qsd and on ours; replies compared.

Test ring (compat). qom-list answers come in QEMU's hash-table order, which we do not
reproduce: those replies are compared sorted by name. Daemons are stopped by PID at teardown.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import SIDES, Cmd, Compat, all_of, make_raw_image, raw_image

pytestmark = pytest.mark.compat


def add(qom_type: str, object_id: str, **props: Any) -> Cmd:
    return Cmd("object-add", {"qom-type": qom_type, "id": object_id, **props})


def qget(path: str, prop: str) -> Cmd:
    return Cmd("qom-get", {"path": path, "property": prop})


def qset(path: str, prop: str, value: Any) -> Cmd:
    return Cmd("qom-set", {"path": path, "property": prop, "value": value})


def qlist(path: str) -> Cmd:
    return Cmd("qom-list", {"path": path}, sort_by="name")


def test_object_add_del_and_qom(compat: Compat) -> None:
    compat.check_transcript(
        [
            qlist("/"),
            qlist("/objects"),
            add("throttle-group", "tg0", limits={"bps-total": 1048576}),
            add("throttle-group", "tg0"),
            add("nosuch", "x"),
            qlist("/"),
            qlist("/objects"),
            qlist("/objects/tg0"),
            qget("/objects/tg0", "limits"),
            qget("/objects/tg0", "x-bps-total"),
            qset("/objects/tg0", "x-bps-total", 2000),
            qset("/objects/tg0", "limits", {"iops-read": 10}),
            qget("tg0", "limits"),
            qset("/objects/tg0", "limits", {"bogus": 5}),
            qset("/objects/tg0", "limits", 5),
            qset("/objects/tg0", "limits", {"bps-read": 5}),
            qset("/objects/tg0", "type", "x"),
            qget("/objects/tg0", "type"),
            qget("/objects/tg0", "nosuch"),
            qget("/objects", "tg0"),
            qget("/objects/", "type"),
            qget("/", "type"),
            qget("", "type"),
            qget("/objects/nosuch", "type"),
            add("throttle-group", "t1", **{"x-bps-total": -1}),
            add("throttle-group", "t2", limits={"bps-total": -1}),
            add("throttle-group", "t3", **{"x-bps-total": 1, "x-bps-read": 1}),
            add("throttle-group", "t4", **{"x-iops-size": 10}),
            add("throttle-group", "t5", **{"x-bps-total-max": 10}),
            add("throttle-group", "t6", **{"x-bps-total": 100, "x-bps-total-max": 10}),
            add("throttle-group", "t7", **{"x-bps-total-max-length": 0}),
            add("throttle-group", "t8", **{"x-bps-total-max-length": 5, "x-bps-total": 1}),
            add("throttle-group", "t9", limits={"bps-total-max-length": 5000000000}),
            add("throttle-group", "t10", **{"x-bps-total-max-length": 5000000000}),
            Cmd("object-del", {"id": "tg0"}),
            Cmd("object-del", {"id": "tg0"}),
            qlist("/objects"),
        ]
    )


def test_secret_and_authz(compat: Compat) -> None:
    compat.check_transcript(
        [
            add("secret", "s0", data="abc"),
            qlist("/objects/s0"),
            qget("/objects/s0", "data"),
            qget("/objects/s0", "format"),
            qget("/objects/s0", "loaded"),
            add("secret", "s1", data="YWJj", format="base64"),
            add("secret", "s2", data="!!!", format="base64"),
            add("secret", "s3", data="a", file="/etc/hostname"),
            add("secret", "s4", file="/nonexist"),
            add("secret", "s5"),
            add("secret", "s6", data="abc", keyid="s0"),
            add("secret", "s7", data="abc", keyid="nosuch", iv="AAAAAAAAAAAAAAAAAAAAAA=="),
            # glib's lenient base64: newlines, an incomplete last group, '=' inside a group
            add("secret", "b0", data="pw", format="base64"),
            add("secret", "b1", data="c\nHc=", format="base64"),
            add("secret", "b2", data="cH=cabcd", format="base64"),
            add("secret", "b3", data="a b=", format="base64"),
            add("secret", "k0", data="A" * 43, format="base64"),  # 30 bytes, the rest dropped
            add("secret", "e0", data="abc", keyid="k0", iv="AAAAAAAAAAAAAAAAAAAAAA=="),
            add("authz-simple", "a0", identity="bob"),
            qlist("/objects/a0"),
            qset("/objects/a0", "identity", "alice"),
            qget("/objects/a0", "identity"),
            add(
                "authz-list",
                "a1",
                policy="allow",
                rules=[
                    {"match": "bob", "policy": "deny"},
                    {"match": "a*", "policy": "allow", "format": "glob"},
                ],
            ),
            qlist("/objects/a1"),
            qget("/objects/a1", "rules"),
            qget("/objects/a1", "policy"),
            add("iothread", "io0"),
            qlist("/objects/io0"),
            qget("/objects/io0", "poll-max-ns"),
            qlist("/objects"),
        ]
    )


def test_qom_types(compat: Compat) -> None:
    compat.check_transcript(
        [
            Cmd("qom-list-types", {"implements": "user-creatable"}, sort_by="name"),
            Cmd("qom-list-types", {"implements": "authz"}, sort_by="name"),
            Cmd("qom-list-types", {"implements": "nosuch"}),
            Cmd("qom-list-properties", {"typename": "throttle-group"}, sort_by="name"),
            Cmd("qom-list-properties", {"typename": "secret"}, sort_by="name"),
            Cmd("qom-list-properties", {"typename": "authz"}),
            Cmd("qom-list-properties", {"typename": "nosuch"}),
        ]
    )


def graph_and_names() -> list[Cmd]:
    return [Cmd("x-debug-query-block-graph"), Cmd("query-block")]


def test_filters_blockdev_add(compat: Compat) -> None:
    setup = all_of(make_raw_image, raw_image("b.raw"))
    compat.check_transcript(
        [
            add("throttle-group", "tg0", **{"x-bps-total": 1048576}),
            Cmd(
                "blockdev-add",
                {
                    "driver": "throttle",
                    "node-name": "th",
                    "throttle-group": "nosuch",
                    "file": {"driver": "null-co"},
                },
            ),
            Cmd(
                "blockdev-add",
                {
                    "driver": "throttle",
                    "node-name": "th",
                    "throttle-group": "tg0",
                    "file": {"driver": "null-co"},
                },
            ),
            Cmd("object-del", {"id": "tg0"}),
            Cmd(
                "blockdev-add",
                {
                    "driver": "copy-on-read",
                    "node-name": "cor",
                    "file": {"driver": "file", "filename": "$D/img.raw"},
                },
            ),
            Cmd(
                "blockdev-add",
                {
                    "driver": "blkdebug",
                    "node-name": "bd",
                    "image": {"driver": "null-co"},
                    "inject-error": [{"event": "read_aio", "sector": 0}],
                },
            ),
            Cmd(
                "blockdev-add",
                {"driver": "blkdebug", "node-name": "bd2", "image": {"driver": "null-co"}},
            ),
            Cmd(
                "blockdev-add",
                {"driver": "compress", "node-name": "cmp", "file": {"driver": "null-co"}},
            ),
            Cmd(
                "blockdev-add",
                {
                    "driver": "preallocate",
                    "node-name": "pre",
                    "file": {"driver": "file", "filename": "$D/b.raw"},
                },
            ),
            Cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "$D/nbd.sock"}}}),
            *[
                Cmd(
                    "block-export-add",
                    {"type": "nbd", "id": f"e{n}", "node-name": n, "writable": True},
                )
                for n in ("th", "cor", "bd", "pre")
            ],
            Cmd("x-debug-query-block-graph"),
            *[Cmd("block-export-del", {"id": f"e{n}"}) for n in ("th", "cor", "bd", "pre")],
            Cmd("blockdev-del", {"node-name": "th"}),
            Cmd("object-del", {"id": "tg0"}),
        ],
        setup=setup,
    )


def _strip_active(value: Any) -> Any:
    # `active` (BlockDeviceInfo, qsd 10.0) is not ours to judge here; everything else is.
    if isinstance(value, dict):
        return {k: _strip_active(v) for k, v in value.items() if k != "active"}
    if isinstance(value, list):
        return [_strip_active(v) for v in value]
    return value


def _filter_nodes() -> list[Cmd]:
    return [
        add("throttle-group", "tg0"),
        Cmd(
            "blockdev-add",
            {
                "driver": "throttle",
                "node-name": "th",
                "throttle-group": "tg0",
                "file": {"driver": "file", "filename": "$D/img.raw"},
            },
        ),
        Cmd(
            "blockdev-add",
            {
                "driver": "copy-on-read",
                "node-name": "cor",
                "file": {"driver": "file", "filename": "$D/b.raw"},
            },
        ),
        Cmd(
            "blockdev-add",
            {
                "driver": "blkdebug",
                "node-name": "bd",
                "image": {"driver": "null-co", "read-zeroes": True},
                "inject-error": [
                    {"event": "read_aio", "sector": 8},
                    {"event": "write_aio", "errno": 28, "once": True},
                ],
            },
        ),
        Cmd(
            "blockdev-add",
            {"driver": "blkdebug", "node-name": "bd2", "image": {"driver": "null-co"}},
        ),
        Cmd("query-named-block-nodes", {"flat": True}, sort_by="node-name"),
    ]


def test_filter_filenames_and_image_info(compat: Compat) -> None:
    result = compat.run_transcript(
        _filter_nodes(), setup=all_of(make_raw_image, raw_image("b.raw"))
    )
    ref, ours = (_strip_active(result.norm[side]) for side in ("reference", "ours"))
    assert ref == ours


def _without_filenames(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_filenames(v) for k, v in value.items() if k not in ("file", "filename")}
    if isinstance(value, list):
        return [_without_filenames(v) for v in value]
    return value


def test_filter_image_info_without_filenames(compat: Compat) -> None:
    """Everything but the names: actual-size is left out for blkdebug, as qsd does."""
    result = compat.run_transcript(
        _filter_nodes(), setup=all_of(make_raw_image, raw_image("b.raw"))
    )
    ref, ours = (_without_filenames(_strip_active(result.norm[side])) for side in SIDES)
    assert ref == ours
    nodes = {n["node-name"]: n["image"] for n in result.norm["reference"][-2]["reply"]["return"]}
    assert "actual-size" not in nodes["bd"] and "actual-size" in nodes["th"]


def _image_with_data(d: Path) -> None:
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(d / "q.qcow2"), "4M"],
        check=True,
        capture_output=True,
    )
    with open(d / "a.raw", "wb") as handle:
        handle.write(b"x" * 200000)
        handle.truncate(4 << 20)


def test_actual_size_through_filters_and_formats(compat: Compat) -> None:
    """actual-size as qsd works it out: a filter's child's, a format's children's sum, none
    where a blkdebug node is in the way (a protocol driver that cannot tell)."""
    steps = [
        Cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "$D/a.raw"}),
        Cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"}),
        Cmd("blockdev-add", {"driver": "blkdebug", "node-name": "bd", "image": "f"}),
        Cmd("blockdev-add", {"driver": "raw", "node-name": "rbd", "file": "bd"}),
        Cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "f"}),
        Cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "cor2", "file": "r"}),
        Cmd("blockdev-add", {"driver": "compress", "node-name": "cmp", "file": "f"}),
        Cmd("blockdev-add", {"driver": "preallocate", "node-name": "pre", "file": "f"}),
        add("throttle-group", "tg"),
        Cmd(
            "blockdev-add",
            {"driver": "throttle", "node-name": "th", "file": "bd", "throttle-group": "tg"},
        ),
        Cmd(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "q",
                "file": {"driver": "file", "filename": "$D/q.qcow2", "node-name": "qf"},
            },
        ),
        Cmd(
            "blockdev-add",
            {
                "driver": "blkdebug",
                "node-name": "bdq",
                "image": {"driver": "copy-on-read", "file": "q"},
            },
        ),
        Cmd("blockdev-add", {"driver": "null-co", "node-name": "nul"}),
        Cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "cornul", "file": "nul"}),
        Cmd("query-named-block-nodes", {"flat": True}),
    ]
    result = compat.run_transcript(steps, setup=_image_with_data)
    sizes = {
        side: {
            n["node-name"]: n["image"].get("actual-size")
            for n in result.norm[side][-2]["reply"]["return"]
        }
        for side in SIDES
    }
    assert sizes["reference"] == sizes["ours"]
    assert sizes["reference"]["r"] == sizes["reference"]["f"] > 0
    assert sizes["reference"]["rbd"] is None


def _secret_vectors() -> dict[str, str]:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key, iv = bytes(range(32)), bytes(range(16))

    def enc(plain: bytes, pad: bool = True) -> str:
        if pad:
            plain += bytes([16 - len(plain) % 16]) * (16 - len(plain) % 16)
        encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()

    return {
        "key": base64.b64encode(key).decode(),
        "iv": base64.b64encode(iv).decode(),
        "good": enc(b"hello world"),
        "b64inner": enc(base64.b64encode(b"xyz")),
        "nopad": enc(b"0123456789abcdef", pad=False),
        "zeropad": enc(b"0123456789abcde\x00", pad=False),
        "empty": enc(b""),
    }


def test_encrypted_secrets(compat: Compat) -> None:
    v = _secret_vectors()
    k64 = {"keyid": "k", "iv": v["iv"], "format": "base64"}
    compat.check_transcript(
        [
            add("secret", "k", data=v["key"], format="base64"),
            add("secret", "k2", data="0123456789abcdef0123456789abcdef"),
            add("secret", "kshort", data="abc"),
            add("throttle-group", "tg"),
            add("secret", "g1", data=v["good"], **k64),
            add("secret", "g2", data=v["b64inner"], **k64),
            add("secret", "g3", data=v["zeropad"], **k64),
            add("secret", "g4", data=v["empty"], **k64),
            add("secret", "g5", data="", **k64),
            add("secret", "r1", data="0123456789abcdef", keyid="k", iv=v["iv"]),
            add("secret", "e1", data=v["nopad"], **k64),
            add("secret", "e2", data=v["good"], keyid="k", iv=v["iv"]),
            add("secret", "e3", data="YWJj", **k64),
            add("secret", "e4", data="!!", **k64),
            add("secret", "e5", data=v["good"], keyid="k", format="base64"),
            add("secret", "e6", data=v["good"], keyid="k", iv="AAAA", format="base64"),
            add("secret", "e7", data=v["good"], keyid="k", iv="!!", format="base64"),
            add("secret", "e8", data=v["good"], keyid="kshort", iv=v["iv"]),
            add("secret", "e9", data=v["good"], keyid="nosuch", iv=v["iv"]),
            add("secret", "e10", data=v["good"], keyid="tg", iv=v["iv"]),
            add("secret", "e11", data="0123456789abcdef", keyid="k2", iv=v["iv"]),
            add("secret", "e12", data=v["good"], keyid="g1", iv=v["iv"], format="base64"),
            add("secret", "e13", data="abc", loaded=True),
            qget("/objects/g1", "keyid"),
            qget("/objects/g1", "iv"),
            qset("/objects/g1", "iv", "x"),
            qget("/objects/g1", "iv"),
            qset("/objects/g1", "loaded", False),
            qget("/objects/g1", "loaded"),
            qget("/objects/k", "keyid"),
            qlist("/objects"),
        ]
    )


def test_authz_listfile(compat: Compat) -> None:
    """qsd 7.2 validates authz-listfile's properties, then has no class of that name."""

    def setup(d: Path) -> None:
        (d / "acl.json").write_text('{"policy": "allow", "rules": []}')

    compat.check_transcript(
        [
            add("authz-listfile", "a0", filename="$D/acl.json"),
            add("authz-listfile", "a1", filename="$D/acl.json", refresh=True),
            add("authz-listfile", "a2"),
            add("authz-listfile", "a3", filename="$D/acl.json", refresh="yes"),
            add("authz-listfile", "a4", filename="$D/acl.json", bogus=1),
            add("authz-listfile", "9bad", filename="$D/acl.json"),
            add("authz-list-file", "a5", filename="$D/acl.json"),
            Cmd("qom-list-properties", {"typename": "authz-list-file"}),
            Cmd("qom-list-properties", {"typename": "authz-listfile"}),
            Cmd("qom-list", {"path": "/objects"}),
        ]
    )


def test_iothread_parameters(compat: Compat) -> None:
    """Range errors come from the property setters (before /objects exists), pool-size errors
    from `complete` or after the value was stored by qom-set."""
    names = ["poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"]
    names += ["thread-pool-min", "thread-pool-max"]
    cases: list[dict[str, Any]] = [
        {name: -1 for name in names},
        {"poll-grow": -1, "poll-shrink": -2},
        {"thread-pool-min": 10, "thread-pool-max": 5},
        {"thread-pool-max": 0},
        {"thread-pool-max": 1 << 31},
    ]
    steps = [add("iothread", "io0", **cases[0]), qlist("/")]
    steps += [add("iothread", f"io{n}", **case) for n, case in enumerate(cases[1:], 1)]
    steps += [
        qlist("/"),
        add("iothread", "ok"),
        qset("/objects/ok", "thread-pool-min", 100),
        qget("/objects/ok", "thread-pool-min"),
        qset("/objects/ok", "poll-grow", -1),
        qget("/objects/ok", "poll-grow"),
        qset("/objects/ok", "thread-pool-max", 0),
        qget("/objects/ok", "thread-pool-max"),
    ]
    compat.check_transcript(steps)
