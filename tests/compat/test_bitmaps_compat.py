"""Dirty bitmaps on the reference qsd and on ours: every block-dirty-bitmap-* command and
error, the bitmap transaction actions with their rollback, and the counts and sha256 that
writes through an NBD export leave, compared live.

Test ring (compat). Each test starts a fresh pair of daemons, stopped by PID at teardown.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.compat.harness import (
    Cmd,
    Compat,
    all_of,
    diff_text,
    normalise_transcript,
    raw_image,
)

pytestmark = pytest.mark.compat

NODES = Cmd("query-named-block-nodes", {"flat": True})


def add(node: str, name: str, **extra: Any) -> Cmd:
    return Cmd("block-dirty-bitmap-add", {"node": node, "name": name, **extra})


def on(command: str, node: str, name: str) -> Cmd:
    return Cmd(f"block-dirty-bitmap-{command}", {"node": node, "name": name})


def sha(node: str, name: str) -> Cmd:
    return Cmd("x-debug-block-dirty-bitmap-sha256", {"node": node, "name": name})


def merge(node: str, target: str, *sources: Any) -> Cmd:
    return Cmd(
        "block-dirty-bitmap-merge", {"node": node, "target": target, "bitmaps": list(sources)}
    )


def txn(*actions: tuple[str, dict[str, Any]], **props: Any) -> Cmd:
    body: dict[str, Any] = {"actions": [{"type": t, "data": d} for t, d in actions]}
    if props:
        body["properties"] = props
    return Cmd("transaction", body)


def backup(**extra: Any) -> Cmd:
    return Cmd("blockdev-backup", {"device": "r0", "target": "n0", "job-id": "j", **extra})


# Refused before any job exists (the last one by qsd too, n0 being smaller than r0).
BACKUPS: list[dict[str, Any]] = [
    {"sync": "incremental"},
    {"sync": "bitmap", "bitmap-mode": "always"},
    {"sync": "incremental", "bitmap": "b0", "bitmap-mode": "never"},
    {"sync": "incremental", "bitmap": "nosuch"},
    {"sync": "full", "bitmap": "nosuch"},
    {"sync": "full", "bitmap": "b0"},
    {"sync": "none", "bitmap": "b0", "bitmap-mode": "always"},
    {"sync": "full", "bitmap": "b0", "bitmap-mode": "never"},
    {"sync": "top", "bitmap": "b0", "bitmap-mode": "never"},
    {"sync": "full", "bitmap-mode": "never"},
    {"sync": "full", "bitmap": "d", "bitmap-mode": "never"},
]

ARGS = [
    "--blockdev", "driver=file,filename=$D/a.raw,node-name=f0",
    "--blockdev", "driver=raw,file=f0,node-name=r0",
    "--blockdev", "driver=null-co,node-name=n0,size=1000",
    "--blockdev", "driver=file,filename=$D/b.raw,node-name=ro,read-only=on",
]  # fmt: skip
SETUP = all_of(raw_image("a.raw"), raw_image("b.raw"))


def test_bitmap_commands_and_errors(compat: Compat) -> None:
    compat.check_transcript(
        [
            add("r0", "b0"),
            sha("r0", "b0"),
            add("r0", "b0"),
            add("nosuch", "b0"),
            add("nosuch", ""),
            add("r0", ""),
            add("r0", "g", granularity=1000),
            add("r0", "g", granularity=256),
            add("r0", "g", granularity=0),
            add("r0", "g", granularity=1 << 32),
            add("r0", "g", granularity=-512),
            add("r0", "g", granularity="512"),
            add("r0", "g", granularity=512),
            add("r0", "h", granularity=1 << 31),
            add("r0", "p", persistent=True),
            add("f0", "p", persistent=True, disabled=True),
            add("n0", "d", disabled=True),
            add("ro", "r"),
            add("r0", "x" * 1024),
            add("r0", "é" * 512),  # 1024 bytes in UTF-8
            add("r0", "y" * 1023),
            NODES,
            sha("r0", "g"),
            sha("r0", "nosuch"),
            sha("nosuch", "b0"),
            *(on(c, "nosuch", "b0") for c in ("remove", "clear", "enable", "disable")),
            *(on(c, "r0", "nosuch") for c in ("remove", "clear", "enable", "disable")),
            on("enable", "n0", "d"),
            on("enable", "n0", "d"),
            on("disable", "n0", "d"),
            on("disable", "n0", "d"),
            on("clear", "ro", "r"),
            merge("r0", "b0", "g"),
            merge("r0", "b0", "nosuch"),
            merge("r0", "nosuch", "g"),
            merge("nosuch", "b0", "g"),
            merge("r0", "b0", {"node": "n0", "name": "d"}),
            merge("r0", "b0", {"node": "nosuch", "name": "d"}),
            merge("r0", "b0", {"node": "n0", "name": "zz"}),
            merge("r0", "b0", {"node": "r0", "name": "b0"}, "h"),
            merge("r0", "b0", "g", "nosuch"),
            merge("n0", "d", "d"),
            *(backup(**kw) for kw in BACKUPS),
            on("remove", "r0", "y" * 1023),
            on("remove", "r0", "b0"),
            on("remove", "r0", "b0"),
            NODES,
            Cmd("blockdev-del", {"node-name": "n0"}),
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "n0"}),
            sha("n0", "d"),
        ],
        args=ARGS,
        setup=SETUP,
    )


def test_bitmap_transactions(compat: Compat) -> None:
    a = {"node": "r0", "name": "a"}
    b = {"node": "r0", "name": "b"}
    compat.check_transcript(
        [
            add("r0", "a", granularity=512),
            Cmd("block-dirty-bitmap-disable", a),
            # Each action done, then all undone by the failing last one.
            txn(
                ("block-dirty-bitmap-add", {"node": "r0", "name": "b", "disabled": True}),
                ("block-dirty-bitmap-enable", a),
                ("block-dirty-bitmap-merge", {"node": "r0", "target": "b", "bitmaps": ["a"]}),
                ("block-dirty-bitmap-clear", a),
                ("block-dirty-bitmap-disable", b),
                ("block-dirty-bitmap-remove", a),
                ("abort", {}),
            ),
            NODES,
            # A removed bitmap is busy for the rest of its transaction.
            txn(("block-dirty-bitmap-remove", a), ("block-dirty-bitmap-clear", a)),
            txn(("block-dirty-bitmap-remove", a), ("block-dirty-bitmap-remove", a)),
            txn(("block-dirty-bitmap-add", b), ("block-dirty-bitmap-add", b)),
            txn(("block-dirty-bitmap-clear", {"node": "nosuch", "name": "a"})),
            txn(("block-dirty-bitmap-add", b), completion_mode="grouped"),
            txn(("block-dirty-bitmap-enable", a), completion_mode="grouped"),
            NODES,
            txn(
                ("block-dirty-bitmap-add", b),
                ("block-dirty-bitmap-merge", {"node": "r0", "target": "b", "bitmaps": ["a"]}),
                ("block-dirty-bitmap-remove", a),
            ),
            NODES,
        ],
        args=ARGS,
        setup=SETUP,
    )


NBD = ["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"]

# (command, arguments) or ("qemu-io", command line for the export r0).
DATA_STEPS: list[tuple[str, Any]] = [
    ("block-dirty-bitmap-add", {"node": "r0", "name": "a", "granularity": 512}),
    ("block-dirty-bitmap-add", {"node": "r0", "name": "b"}),
    ("block-dirty-bitmap-add", {"node": "f0", "name": "c", "granularity": 4096}),
    ("qemu-io", "write 0 1"),
    ("qemu-io", "write 1023999 1"),
    ("qemu-io", "write -z 300000 70000"),
    ("qemu-io", "discard 600k 4k"),  # discard=ignore: marks nothing
    ("block-dirty-bitmap-disable", {"node": "r0", "name": "b"}),
    ("qemu-io", "write 100k 1"),
    ("qemu-io", "write 2000000 1"),  # past the end: EIO, no mark
    ("block-dirty-bitmap-merge", {"node": "r0", "target": "b", "bitmaps": ["a"]}),
    ("block-dirty-bitmap-merge", {"node": "r0", "target": "a", "bitmaps": ["b"]}),
    ("block-dirty-bitmap-clear", {"node": "r0", "name": "b"}),
    ("block-dirty-bitmap-enable", {"node": "r0", "name": "b"}),
    ("qemu-io", "write -P 1 512k 200k"),
    ("block_resize", {"node-name": "f0", "size": 2 << 20}),
    ("block-dirty-bitmap-merge", {"node": "r0", "target": "a", "bitmaps": ["b"]}),
]


def test_bitmap_counts_and_hashes_after_nbd_writes(compat: Compat) -> None:
    args = [
        "--blockdev", "driver=file,filename=$D/a.raw,node-name=f0",
        "--blockdev", "driver=raw,file=f0,node-name=r0",
        *NBD,
        "--export", "type=nbd,id=e0,node-name=r0,writable=on",
    ]  # fmt: skip
    pair = compat.daemons(args, raw_image("a.raw", 1000 << 10))
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        records: list[Any] = []
        for name, value in DATA_STEPS:
            if name == "qemu-io":
                url = f"nbd+unix:///r0?socket={daemon.workdir}/nbd.sock"
                proc = subprocess.run(
                    ["qemu-io", "-f", "raw", "-c", value, url], capture_output=True, timeout=30
                )
                records.append({"qemu-io": value, "status": proc.returncode})
            else:
                records.append(client.cmd(name, value))
            nodes = client.cmd("query-named-block-nodes", {"flat": True})
            records.append(
                {n["node-name"]: n.get("dirty-bitmaps") for n in nodes.get("return", [])}
            )
            for node, bitmap in (("r0", "a"), ("r0", "b"), ("f0", "c")):
                records.append(
                    client.cmd("x-debug-block-dirty-bitmap-sha256", {"node": node, "name": bitmap})
                )
        out[side] = normalise_transcript(records, daemon.workdir)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))
