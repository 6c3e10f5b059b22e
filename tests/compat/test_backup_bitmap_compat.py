"""Backups with a dirty bitmap on the reference qsd and on ours: for each sync mode, bitmap
mode and outcome (success, failure injected with blkdebug on the target, cancel while
pending), the events, query-jobs progress, and the bitmap's count, busy flag and sha256
before, during and after the job, compared live; then the classic incremental flow (full
backup, writes through NBD, incremental backup into an overlay of the full one) checked with
qemu-img compare. Test ring (compat); every daemon is stopped by PID at teardown.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Compat, all_of, diff_text, normalise_transcript, raw_image
from tests.integration.daemon import RawQmp

pytestmark = pytest.mark.compat

STATUS = "JOB_STATUS_CHANGE"
FAIL_SECTOR = 2048  # 1 MiB: the bitmap's third run (clusters 16-20) fails to copy


def args(fail: bool) -> list[str]:
    rule = f",inject-error.0.event=write_aio,inject-error.0.errno=5,inject-error.0.sector={FAIL_SECTOR},inject-error.0.once=off"
    return [
        "--blockdev", "driver=file,filename=$D/a.raw,node-name=f0",
        "--blockdev", "driver=raw,file=f0,node-name=r0",
        "--blockdev", "driver=file,filename=$D/b.raw,node-name=fb",
        "--blockdev", "driver=blkdebug,image=fb,node-name=dbg" + (rule if fail else ""),
        "--blockdev", "driver=raw,file=dbg,node-name=tgt",
        "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock",
        "--export", "type=nbd,id=e0,node-name=r0,name=r0,writable=on",
    ]  # fmt: skip


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def data_image(d: Path) -> None:
    _run("qemu-io", "-f", "raw", "-c", "write -P 7 0 4M", f"{d}/a.raw")


SETUP = all_of(raw_image("a.raw", 4 << 20), raw_image("b.raw", 4 << 20), data_image)


def qemu_io(workdir: Path, command: str, export: str = "r0") -> dict[str, Any]:
    url = f"nbd+unix:///{export}?socket={workdir}/nbd.sock"
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", command, url], capture_output=True)
    return {"qemu-io": command, "status": proc.returncode}


def wait_status(client: RawQmp, status: str) -> None:
    """Read messages until the job reaches `status` (every event stays in `events`)."""
    seen = 0
    while True:
        for event in client.events[seen:]:
            if event["event"] == STATUS and event["data"]["status"] == status:
                return
        seen = len(client.events)
        client.events.append(client.recv(30))


def bitmap_state(client: RawQmp, node: str = "r0") -> dict[str, Any]:
    """The node's named bitmaps (qsd also lists its block-copy's anonymous ones) and b0's
    sha256."""
    nodes = client.cmd("query-named-block-nodes", {"flat": True}).get("return", [])
    named = [
        [b for b in n.get("dirty-bitmaps", []) if "name" in b]
        for n in nodes
        if n["node-name"] == node
    ]
    sha = client.cmd("x-debug-block-dirty-bitmap-sha256", {"node": node, "name": "b0"})
    return {"bitmaps": named, "sha256": sha}


# (sync, bitmap-mode or None, outcome)
CASES = [
    ("incremental", None, "success"),
    ("bitmap", "on-success", "success"),
    ("bitmap", "never", "success"),
    ("bitmap", "always", "success"),
    ("full", "on-success", "success"),
    ("full", "always", "success"),
    ("top", "on-success", "success"),
    ("incremental", None, "fail"),
    ("bitmap", "never", "fail"),
    ("bitmap", "always", "fail"),
    ("full", "always", "fail"),
    ("incremental", None, "cancel"),
    ("bitmap", "always", "cancel"),
    ("bitmap", "never", "cancel"),
]


@pytest.mark.parametrize(("sync", "mode", "outcome"), CASES)
def test_backup_with_bitmap(compat: Compat, sync: str, mode: str | None, outcome: str) -> None:
    pair = compat.daemons(args(outcome == "fail"), SETUP)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        wd = daemon.workdir
        rec: list[Any] = [
            client.cmd("block-dirty-bitmap-add", {"node": "r0", "name": "b0", "granularity": 4096})
        ]
        for command in ("write 4096 512", "write 200k 4k", "write 1M 300k"):
            rec.append(qemu_io(wd, command))
        rec.append(bitmap_state(client))
        backup: dict[str, Any] = {
            "device": "r0",
            "target": "tgt",
            "job-id": "j",
            "sync": sync,
            "bitmap": "b0",
            "auto-finalize": outcome == "fail",
        }
        if mode is not None:
            backup["bitmap-mode"] = mode
        rec.append(client.cmd("blockdev-backup", backup))
        if outcome == "fail":
            wait_status(client, "concluded")
        else:
            wait_status(client, "pending")
            rec.append(client.cmd("query-jobs"))
            rec.append(bitmap_state(client))
            rec.append(qemu_io(wd, "write 3M 8k"))
            rec.append(bitmap_state(client))
            # A busy bitmap: qsd's texts.
            rec.append(client.cmd("block-dirty-bitmap-clear", {"node": "r0", "name": "b0"}))
            rec.append(client.cmd("block-dirty-bitmap-remove", {"node": "r0", "name": "b0"}))
            rec.append(client.cmd("blockdev-backup", {**backup, "job-id": "k"}))
            verb = "job-finalize" if outcome == "success" else "job-cancel"
            rec.append(client.cmd(verb, {"id": "j"}))
            wait_status(client, "concluded")
        rec.append(client.cmd("query-jobs"))
        rec.append(bitmap_state(client))
        rec.append(qemu_io(wd, "write 3584k 4k"))
        rec.append(bitmap_state(client))
        rec.append(client.cmd("job-dismiss", {"id": "j"}))
        rec.append(
            {"events": [{"event": e["event"], "data": e.get("data")} for e in client.events]}
        )
        out[side] = normalise_transcript(rec, wd)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))


def chain_images(d: Path) -> None:
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/src.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 7 0 4M", "-c", "write -z 1M 128k", f"{d}/src.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/full.qcow2", "4M")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2", f"{d}/inc.qcow2")


def qcow2(name: str, filename: str) -> dict[str, Any]:
    return {
        "driver": "qcow2",
        "node-name": name,
        "file": {"driver": "file", "node-name": f"{name}-file", "filename": filename},
    }


def test_incremental_backup_chain(compat: Compat) -> None:
    """Full backup with a new bitmap (one transaction), writes through NBD, an incremental
    backup into an overlay of the full backup: the overlay chain equals the source."""
    cli = [
        "--blockdev", "driver=file,filename=$D/src.qcow2,node-name=sf",
        "--blockdev", "driver=qcow2,file=sf,node-name=s",
        "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock",
        "--export", "type=nbd,id=e0,node-name=s,name=s,writable=on",
    ]  # fmt: skip
    pair = compat.daemons(cli, chain_images)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        wd = daemon.workdir
        rec: list[Any] = [client.cmd("blockdev-add", qcow2("tf", f"{wd}/full.qcow2"))]
        actions = [
            {"type": "block-dirty-bitmap-add", "data": {"node": "s", "name": "b0"}},
            {
                "type": "blockdev-backup",
                "data": {"device": "s", "target": "tf", "sync": "full", "job-id": "full"},
            },
        ]
        rec.append(client.cmd("transaction", {"actions": actions}))
        wait_status(client, "null")
        rec.append(client.cmd("blockdev-del", {"node-name": "tf"}))
        rec.append(client.cmd("blockdev-del", {"node-name": "tf-file"}))
        for command in ("write -P 1 64k 4k", "write -z 2M 192k", "write -P 2 3M 1M"):
            rec.append(qemu_io(wd, command, "s"))
        rec.append(bitmap_state(client, "s"))
        rec.append(client.cmd("blockdev-add", qcow2("ti", f"{wd}/inc.qcow2")))
        incremental = {
            "device": "s",
            "target": "ti",
            "sync": "incremental",
            "bitmap": "b0",
            "job-id": "inc",
        }
        rec.append(client.cmd("blockdev-backup", incremental))
        client.events.clear()
        wait_status(client, "null")
        done = [e["data"] for e in client.events if e["event"] == "BLOCK_JOB_COMPLETED"]
        rec.append({"completed": done})
        rec.append(bitmap_state(client, "s"))
        rec.append(client.cmd("quit"))
        assert client.at_eof(30)
        daemon.proc.wait(30)
        # The overlay holds only what changed, its backing the full copy: together, the source.
        _run("qemu-img", "compare", f"{wd}/inc.qcow2", f"{wd}/src.qcow2")
        map_out = subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "qcow2", f"{wd}/inc.qcow2"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        # What the incremental backup allocated in the overlay (host offsets follow the order
        # the copies ran in, which is not compared).
        overlay = [
            {k: v for k, v in extent.items() if k != "offset"}
            for extent in json.loads(map_out)
            if extent["depth"] == 0
        ]
        rec.append({"overlay-map": overlay})
        out[side] = normalise_transcript(rec, wd)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))


def test_copy_before_write_with_bitmap(compat: Compat) -> None:
    """A copy-before-write filter with a bitmap copies only the bitmap's clusters before a
    write: the target then holds the old data of those clusters only."""
    cli = args(False)[:10]  # the nodes, no export
    pair = compat.daemons([*cli, "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"], SETUP)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        wd = daemon.workdir
        rec: list[Any] = [
            client.cmd("block-dirty-bitmap-add", {"node": "r0", "name": "b0", "granularity": 4096})
        ]
        cbw: dict[str, Any] = {
            "driver": "copy-before-write",
            "node-name": "cbw",
            "file": "r0",
            "target": "tgt",
        }
        for bitmap in ({"node": "nosuch", "name": "b0"}, {"node": "r0", "name": "nosuch"}):
            rec.append(client.cmd("blockdev-add", {**cbw, "bitmap": bitmap}))
        # Clusters 3 (200k) and 16-20 (1M + 300k) dirty in b0, through an export of r0.
        rec.append(
            client.cmd(
                "block-export-add",
                {"type": "nbd", "id": "e1", "node-name": "r0", "name": "r0", "writable": True},
            )
        )
        rec.append(qemu_io(wd, "write -P 3 200k 4k"))
        rec.append(qemu_io(wd, "write -P 3 1M 300k"))
        rec.append(client.cmd("block-export-del", {"id": "e1"}))
        client.events.clear()
        rec.append(client.cmd("blockdev-add", {**cbw, "bitmap": {"node": "r0", "name": "b0"}}))
        rec.append(bitmap_state(client))
        rec.append(
            client.cmd(
                "block-export-add",
                {"type": "nbd", "id": "e2", "node-name": "cbw", "name": "c", "writable": True},
            )
        )
        for command in ("write -P 5 0 4M",):
            rec.append(qemu_io(wd, command, "c"))
        rec.append(bitmap_state(client))
        rec.append(client.cmd("block-export-del", {"id": "e2"}))
        rec.append(client.cmd("quit"))
        assert client.at_eof(30)
        daemon.proc.wait(30)
        target = (wd / "b.raw").read_bytes()
        # Which 64 KiB clusters of the target got old data (pattern 3 or 7), and which.
        firsts = [target[i] for i in range(0, len(target), 65536)]
        rec.append({"target": firsts})
        # Only the bitmap's clusters were copied (with the data the writes before put there).
        assert [i for i, b in enumerate(firsts) if b] == [3, 16, 17, 18, 19, 20], firsts
        out[side] = normalise_transcript(rec, wd)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))
