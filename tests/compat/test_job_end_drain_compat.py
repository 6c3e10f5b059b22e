"""The drains qsd 7.2 does while a block job ends and changes the graph (commit dropping
its intermediate nodes and filter, stream changing the backing and dropping its filter, an
active commit or mirror pivoting), as a rate-limited backup elsewhere on the chain sees them.

Test ring (compat). Each case starts a fresh pair of daemons on the same qemu-img-made
chain, stopped by PID at teardown; only the watcher's JOB_STATUS_CHANGE events are compared.
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
from tests.compat.test_block_jobs_compat import add_chain_by_nodes
from tests.compat.test_grant_drain_compat import QUERIES, setup, watcher
from tests.integration.daemon import RawQmp

pytestmark = pytest.mark.compat

TGT2 = {"driver": "null-co", "node-name": "tgt2", "size": 4 << 20}
ACTIONS: dict[str, list[Cmd]] = {
    "commit": [Cmd("block-commit", {"job-id": "c", "device": "top", "top-node": "mid"})],
    "stream": [Cmd("block-stream", {"job-id": "c", "device": "top"})],
    "stream-mid": [Cmd("block-stream", {"job-id": "c", "device": "top", "base-node": "base"})],
    "active-commit": [Cmd("block-commit", {"job-id": "c", "device": "top"})],
    "mirror": [
        Cmd("blockdev-add", TGT2),
        Cmd("blockdev-mirror", {"job-id": "c", "device": "top", "target": "tgt2", "sync": "full"}),
    ],
}


def run(compat: Compat, action: str, watched: str) -> dict[str, list[Any]]:
    """The action's replies and the events from its start until job `c` is gone (an active
    job completed once ready), on each side."""
    pair = compat.daemons(setup=setup)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client: RawQmp = compat.connect(daemon)
        client.negotiate()
        start_then_settle(
            client, daemon.workdir, [*add_chain_by_nodes(), *watcher(watched)], QUERIES
        )
        records = send_recorded(client, daemon.workdir, ACTIONS[action])
        completed = False
        for _ in range(QUERIES):  # until job c is gone
            jobs = {j["id"]: j["status"] for j in client.cmd("query-jobs")["return"]}
            if "c" not in jobs:
                break
            if jobs["c"] == "ready" and not completed:
                records.append({"complete": client.cmd("job-complete", {"id": "c"})})
                completed = True
        records.append({"events": list(client.events)})
        records.append(client.cmd("quit"))
        out[side] = normalise_transcript(records, daemon.workdir)
    return out


def statuses(events: list[Any]) -> list[tuple[str, str]]:
    return [(e["data"]["id"], e["data"]["status"]) for e in events
            if e["event"] == "JOB_STATUS_CHANGE"]  # fmt: skip


def watched_events(records: list[Any]) -> list[Any]:
    """The replies, then the job statuses seen from the action on."""
    out: list[Any] = []
    for rec in records:
        if "events" in rec:
            out.append(statuses(rec["events"]))
        elif "send" in rec or "complete" in rec:
            out.append(rec)
    return out


CASES = [(a, w) for a in ACTIONS for w in ("base", "mid", "top")]


@pytest.mark.parametrize(("action", "watched"), CASES)
def test_job_end_drains(compat: Compat, action: str, watched: str) -> None:
    """Where qsd accepts the job with the watcher there (a backup of the top under a commit
    of mid, or under either stream), the watcher pauses and resumes four times between
    the job's `pending` and `concluded` (and once before a stream's `created`)."""
    result = run(compat, action, watched)
    ref = watched_events(result["reference"])
    ours = watched_events(result["ours"])
    if ours != ref:
        raise AssertionError(diff_text(ref, ours))
