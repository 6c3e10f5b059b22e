"""What a running job sees when a user adds or removes a parent edge of a node it holds, on
the reference qsd and on ours: block-export-del of an export of that node, and blockdev-add
of a node naming it as a child (even one that fails to attach), drain the node twice, so the
job pauses and resumes twice (a rate-limited mirror woken by it goes ready in between). The
same on a node no job holds changes nothing.

Test ring (compat). Each case starts a fresh pair of daemons on the same qemu-img-made
chain, stopped by PID at teardown; the job's first request is waited for with queries.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.compat.harness import (
    Cmd,
    Compat,
    diff_text,
    normalise_transcript,
    send_recorded,
    start_then_settle,
)
from tests.compat.test_block_jobs_compat import add_chain_by_nodes, make_chain
from tests.integration.daemon import RawQmp

pytestmark = pytest.mark.compat

QUERIES = 2000
SLOW = {"speed": 1024}
NULL_TARGET = Cmd("blockdev-add", {"driver": "null-co", "node-name": "tgt", "size": 4 << 20})
JOBS: dict[str, list[Cmd]] = {
    "stream": [Cmd("block-stream", {"job-id": "j", "device": "top", **SLOW})],
    "commit": [Cmd("block-commit", {"job-id": "j", "device": "top", "top-node": "mid", **SLOW})],
    "active-commit": [Cmd("block-commit", {"job-id": "j", "device": "top", **SLOW})],
    "mirror": [
        NULL_TARGET,
        Cmd(
            "blockdev-mirror",
            {"job-id": "j", "device": "top", "target": "tgt", "sync": "full", **SLOW},
        ),
    ],
    "backup": [
        NULL_TARGET,
        Cmd(
            "blockdev-backup",
            {"job-id": "j", "device": "top", "target": "tgt", "sync": "full", **SLOW},
        ),
    ],
}
OTHER = Cmd("blockdev-add", {"driver": "null-co", "node-name": "oth"})
ACTIONS: dict[str, list[Cmd]] = {
    "export-del": [Cmd("block-export-del", {"id": "e"})],
    "filter-over-top": [
        Cmd(
            "blockdev-add",
            {"driver": "throttle", "node-name": "f", "throttle-group": "tg", "file": "top"},
        ),
    ],
    # Refused (mid is read-only), drained all the same.
    "filter-over-mid": [
        Cmd(
            "blockdev-add",
            {"driver": "copy-on-read", "node-name": "f", "file": "mid", "read-only": False},
        ),
    ],
    "raw-over-top-file": [
        Cmd(
            "blockdev-add",
            {"driver": "raw", "node-name": "f", "file": "top-file", "read-only": True},
        ),
    ],
    "unrelated": [
        OTHER,
        Cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "f", "file": "oth"}),
        Cmd("block-export-add", {"type": "nbd", "id": "e2", "node-name": "oth"}),
        Cmd("block-export-del", {"id": "e2"}),
    ],
    "export-add": [
        Cmd("block-export-add", {"type": "nbd", "id": "e2", "node-name": "top", "name": "again"})
    ],
}
SETUP = [
    *add_chain_by_nodes(),
    Cmd("object-add", {"qom-type": "throttle-group", "id": "tg"}),
    Cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "$D/nbd.sock"}}}),
    Cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "top"}),
]


def run(compat: Compat, job: str, action: str) -> dict[str, list[Any]]:
    pair = compat.daemons(setup=make_chain)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client: RawQmp = compat.connect(daemon)
        client.negotiate()
        start_then_settle(client, daemon.workdir, [*SETUP, *JOBS[job]], QUERIES)
        records = send_recorded(client, daemon.workdir, ACTIONS[action])
        records.append({"events": list(client.events)})
        client.events.clear()
        records.append({"jobs": [{k: j[k] for k in ("id", "status")} for j in
                                 client.cmd("query-jobs")["return"]]})  # fmt: skip
        records.append(client.cmd("quit"))
        out[side] = normalise_transcript(records, daemon.workdir)
    return out


CASES = [(job, "export-del") for job in JOBS] + [(job, "filter-over-top") for job in JOBS]
CASES += [("stream", a) for a in ("filter-over-mid", "raw-over-top-file", "unrelated")]
CASES += [("mirror", "filter-over-mid"), ("backup", "export-add")]


@pytest.mark.parametrize(("job", "action"), CASES)
def test_a_job_sees_the_drains_of_its_node(compat: Compat, job: str, action: str) -> None:
    result = run(compat, job, action)
    if result["ours"] != result["reference"]:
        raise AssertionError(diff_text(result["reference"], result["ours"]))
    events = result["reference"][-3]["events"]
    statuses = [e["data"]["status"] for e in events if e["event"] == "JOB_STATUS_CHANGE"]
    if action in ("unrelated", "export-add"):
        assert statuses == []
    elif job == "mirror":
        assert statuses == ["paused", "running", "ready", "standby", "ready"]
    else:
        assert statuses == ["paused", "running"] * 2
