"""How far a rate-limited backup gets with its first request, on the reference qsd and on
ours: qsd's block-copy makes each request one block-status extent of the source (one layer's
data, or zeroes) of at most a chunk, and accounts it to the rate limit before the next one;
a job with nothing left to copy ends without a last rate-limit sleep.

Test ring (compat). Each case starts a fresh pair of daemons on the same qemu-img-made
images, stopped by PID at teardown.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Compat, diff_text, normalise_transcript, substitute
from tests.integration.daemon import RawQmp

pytestmark = pytest.mark.compat

QUERIES = 2000


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def make_images(d: Path) -> None:
    """A chain whose first extent is 512 KiB of base data, and a raw file with holes."""
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 4 3M 64k", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/mid.qcow2")
    _run("qemu-io", "-c", "write -P 2 512k 1M", "-c", "write -z 3M 32k", f"{d}/mid.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    _run("qemu-io", "-c", "write -P 3 1M 256k", f"{d}/top.qcow2")
    _run("qemu-img", "create", "-f", "raw", f"{d}/holes.raw", "4M")
    _run("qemu-io", "-f", "raw", "-c", "write -P 5 192k 64k", "-c", "write -P 6 2M 2M",
         f"{d}/holes.raw")  # fmt: skip


def qcow2(name: str, backing: str | None) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name, "read-only": name != "top",
            "file": {"driver": "file", "filename": f"$D/{name}.qcow2"},
            "backing": backing}  # fmt: skip


SOURCES: dict[str, list[dict[str, Any]]] = {
    "chain": [qcow2("base", None), qcow2("mid", "base"), qcow2("top", "mid")],
    "holes": [
        {
            "driver": "raw",
            "node-name": "top",
            "file": {"driver": "file", "filename": "$D/holes.raw"},
        },
    ],
}
TARGET = {"driver": "null-co", "node-name": "tgt", "size": 4 << 20}


def first_request(compat: Compat, source: str, sync: str) -> dict[str, list[Any]]:
    """Start the backup at 1 KiB/s, wait (by queries) until its first request is done, then
    cancel it; the job's progress and events on each side."""
    pair = compat.daemons(setup=make_images)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client: RawQmp = compat.connect(daemon)
        client.negotiate()
        for node in [*SOURCES[source], TARGET]:
            assert "return" in client.cmd("blockdev-add", substitute(node, daemon.workdir))
        args = {"job-id": "j", "device": "top", "target": "tgt", "sync": sync, "speed": 1024}
        records: list[Any] = [client.cmd("blockdev-backup", args)]
        for _ in range(QUERIES):
            jobs = client.cmd("query-jobs")["return"]
            if not jobs or jobs[0]["current-progress"] > 0:
                break
        job = jobs[0] if jobs else None
        if job is not None and job["current-progress"] < job["total-progress"]:
            # Asleep in the rate limit after its first request.
            progress = {k: job[k] for k in ("id", "status", "current-progress", "total-progress")}
            records.append({"first-request": progress})
            records.append(client.cmd("job-cancel", {"id": "j"}))
        else:
            records.append({"first-request": "all copied"})  # ends without a last sleep
        for _ in range(QUERIES):
            if any(e["event"].startswith("BLOCK_JOB_") for e in client.events):
                break
            client.cmd("query-jobs")
        records.append(client.cmd("quit"))
        records.append({"eof": client.at_eof(15), "exit": daemon.wait_exit(15)})
        records.append({"events": [e for e in client.events if e["event"].startswith("BLOCK_")]})
        out[side] = normalise_transcript(records, daemon.workdir)
    return out


@pytest.mark.parametrize(("source", "sync"), [("chain", "full"), ("chain", "top"),
                                              ("holes", "full"), ("holes", "top")])  # fmt: skip
def test_rate_limited_backup_first_request(compat: Compat, source: str, sync: str) -> None:
    result = first_request(compat, source, sync)
    if result["ours"] != result["reference"]:
        raise AssertionError(diff_text(result["reference"], result["ours"]))
