"""blockdev-reopen of driver options qsd applies to a live node (raw's window, qcow2's runtime
options, the file driver's cache mode), on the reference qsd and on ours, compared live.

Test ring (compat). Each test starts a fresh pair of daemons, stopped by PID at teardown.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import (
    Cmd,
    Compat,
    diff_text,
    normalise_transcript,
    qemu_io_nbd,
    raw_image,
    without_10_0_members,
)

pytestmark = pytest.mark.compat

QCOW2 = {"driver": "qcow2", "node-name": "w", "file": "wf"}
NODES = Cmd("query-named-block-nodes", {"flat": True}, sort_by="node-name")


def reopen(*options: dict[str, Any]) -> Cmd:
    return Cmd("blockdev-reopen", {"options": list(options)})


def test_reopen_raw_window(compat: Compat) -> None:
    def raw(**extra: Any) -> dict[str, Any]:
        return {"driver": "raw", "node-name": "r", "file": "f", **extra}

    compat.check_transcript(
        [
            reopen(raw(offset=4096, size=8192)),
            NODES,
            reopen(raw(offset=512)),  # size back to the rest of the file
            NODES,
            reopen(raw(offset=2 << 20)),
            reopen(raw(offset=4096, size=(1 << 20))),
            reopen(raw(size=1000)),
            reopen(raw(offset=-1)),
            NODES,
            reopen(raw()),
            NODES,
            reopen(raw(size=65536, **{"read-only": True})),
            NODES,
        ],
        args=[
            "--blockdev",
            "driver=file,filename=$D/img.raw,node-name=f",
            "--blockdev",
            "driver=raw,file=f,node-name=r,offset=1024,size=4096",
        ],
        setup=raw_image(),
    )


def _make_qcow2(d: Path) -> None:
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", f"{d}/w.qcow2", "4M"], check=True, capture_output=True
    )


# (command, arguments) or ("qemu-io", command line for the export).
QCOW2_STEPS: list[tuple[str, Any]] = [
    ("blockdev-reopen", {"options": [{**QCOW2, "lazy-refcounts": True, "l2-cache-size": 8192}]}),
    ("qemu-io", "write -P 1 0 64k"),
    ("query-named-block-nodes", {"flat": True}),  # lazy refcounts: the image is dirty
    ("qemu-io", "read -P 1 0 64k"),
    ("blockdev-reopen", {"options": [{**QCOW2, "lazy-refcounts": True, "cache-size": 1 << 20}]}),
    ("query-named-block-nodes", {"flat": True}),  # still dirty
    ("blockdev-reopen", {"options": [QCOW2]}),  # lazy refcounts off: clean again
    ("query-named-block-nodes", {"flat": True}),
    ("qemu-io", "write -P 2 64k 64k"),
    ("qemu-io", "read -P 2 64k 64k"),
    ("query-named-block-nodes", {"flat": True}),
    ("blockdev-reopen", {"options": [{**QCOW2, "overlap-check": "all"}]}),
    ("qemu-io", "write -P 3 0 128k"),
    ("blockdev-reopen", {"options": [{**QCOW2, "cache-clean-interval": 0}]}),
    ("qemu-io", "read -P 3 0 128k"),
]


def test_reopen_qcow2_runtime_options(compat: Compat) -> None:
    args = [
        "--blockdev", "driver=file,filename=$D/w.qcow2,node-name=wf",
        "--blockdev", "driver=qcow2,file=wf,node-name=w",
        "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock",
        "--export", "type=nbd,id=e0,node-name=w,writable=on",
    ]  # fmt: skip
    pair = compat.daemons(args, _make_qcow2)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        records: list[Any] = []
        for name, value in QCOW2_STEPS:
            if name == "qemu-io":
                records.append(qemu_io_nbd(daemon.workdir, "w", value))
            else:
                reply = client.cmd(name, value)
                if name == "query-named-block-nodes" and "return" in reply:
                    reply["return"] = without_10_0_members(reply["return"])
                records.append(reply)
        records.append({"events": client.events[:]})
        out[side] = normalise_transcript(records, daemon.workdir)
        # What the transcript is about: lazy refcounts set and cleared the dirty bit live.
        dirty = [
            node["image"]["dirty-flag"]
            for reply in records
            if isinstance(reply.get("return"), list)
            for node in reply["return"]
            if node["node-name"] == "w"
        ]
        assert dirty == [True, True, False, False], (side, dirty)
        assert all(r.get("status", 0) == 0 for r in records), (side, records)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))
