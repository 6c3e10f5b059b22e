"""Objects, QOM and filter nodes run on the reference qsd and on ours; replies compared.

Test ring (compat). qom-list answers come in QEMU's hash-table order, which we do not
reproduce: those replies are compared sorted by name. Daemons are stopped by PID at teardown.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, all_of, make_raw_image, raw_image

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


@pytest.mark.xfail(
    strict=True,
    reason="not in this module's files: the file driver's json: form lacks 'filename', and "
    "ImageInfo always carries actual-size (qsd omits it for blkdebug)",
)
def test_filter_filenames_and_image_info(compat: Compat) -> None:
    setup = all_of(make_raw_image, raw_image("b.raw"))
    result = compat.run_transcript(
        [
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
        ],
        setup=setup,
    )
    ref, ours = (_strip_active(result.norm[side]) for side in ("reference", "ours"))
    assert ref == ours
