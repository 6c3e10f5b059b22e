"""The reopens around block jobs (a read-only commit base made read-write for the job and
read-only again after, the old active layer of blockdev-snapshot made read-only) as another
job sees them, on the reference qsd and on ours: qsd 7.2 drains the reopened node's whole
subtree, so a job above the node or above any node under it pauses and resumes.

Test ring (compat). Each case starts a fresh pair of daemons on the same qemu-img-made
chain, stopped by PID at teardown; a rate-limited backup of the top is the job that watches.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import (
    Cmd,
    Compat,
    ExpectEof,
    WaitEvent,
    diff_text,
    normalise_transcript,
    send_recorded,
    start_then_settle,
)
from tests.compat.test_block_jobs_compat import add_chain_by_nodes, make_chain
from tests.integration.daemon import RawQmp

pytestmark = pytest.mark.compat

QUERIES = 2000


def watcher(device: str) -> list[Cmd]:
    """A rate-limited backup of `device`: the job the reopen's drain may pause."""
    return [
        Cmd("blockdev-add", {"driver": "null-co", "node-name": "tgt", "size": 4 << 20}),
        Cmd(
            "blockdev-backup",
            {"job-id": "b", "device": device, "target": "tgt", "sync": "full", "speed": 1024},
        ),
    ]


SNAPSHOT = {
    "driver": "qcow2",
    "node-name": "snap",
    "file": {"driver": "file", "filename": "$D/snap.qcow2"},
    "backing": None,
}
ACTIONS: dict[str, list[Cmd]] = {
    "commit": [Cmd("block-commit", {"job-id": "c", "device": "top", "top-node": "mid"})],
    "snapshot": [
        Cmd("blockdev-add", SNAPSHOT),
        Cmd("blockdev-snapshot", {"node": "top", "overlay": "snap"}),
    ],
    "reopen": [
        Cmd(
            "blockdev-reopen",
            {
                "options": [
                    {"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "mid"}
                ]
            },
        )
    ],
}


def setup(d: Path) -> None:
    make_chain(d)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", f"{d}/snap.qcow2", "4M"],
                   check=True, capture_output=True)  # fmt: skip


def run(compat: Compat, action: str, watched: str) -> dict[str, list[Any]]:
    """The action's replies, the events from its start until job `c` (if any) is gone, the
    nodes' read-only flags and the jobs left, on each side."""
    pair = compat.daemons(setup=setup)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client: RawQmp = compat.connect(daemon)
        client.negotiate()
        start_then_settle(
            client, daemon.workdir, [*add_chain_by_nodes(), *watcher(watched)], QUERIES
        )
        records = send_recorded(client, daemon.workdir, ACTIONS[action])
        for _ in range(QUERIES):  # until job c is gone
            if all(j["id"] != "c" for j in client.cmd("query-jobs")["return"]):
                break
        records.append({"events": list(client.events)})
        client.events.clear()
        nodes = client.cmd("query-named-block-nodes", {"flat": True})["return"]
        records.append({n["node-name"]: n["ro"] for n in nodes})
        records.append({"jobs": [{k: j[k] for k in ("id", "status")} for j in
                                 client.cmd("query-jobs")["return"]]})  # fmt: skip
        records.append(client.cmd("quit"))
        out[side] = normalise_transcript(records, daemon.workdir)
    return out


def statuses(events: list[Any]) -> list[tuple[str, str]]:
    return [(e["data"]["id"], e["data"]["status"]) for e in events
            if e["event"] == "JOB_STATUS_CHANGE"]  # fmt: skip


@pytest.mark.parametrize("watched", ["base", "mid", "top"])
def test_snapshot_reopens_the_old_layer_drained(compat: Compat, watched: str) -> None:
    """blockdev-snapshot: the transaction's drain, then the reopen of the old active layer
    read-only (its subtree drained: a job on a node under it pauses too)."""
    result = run(compat, "snapshot", watched)
    if result["ours"] != result["reference"]:
        raise AssertionError(diff_text(result["reference"], result["ours"]))
    events = result["reference"][2]["events"]
    assert statuses(events) == [("b", "paused"), ("b", "running")] * 2
    assert result["reference"][3]["top"] is True  # the old active layer is read-only


@pytest.mark.parametrize("watched", ["base", "top"])
def test_blockdev_reopen_drains_the_subtree(compat: Compat, watched: str) -> None:
    """blockdev-reopen of top: qsd 7.2 drains each named node's whole subtree, so a job on
    a node under it pauses and resumes too."""
    result = run(compat, "reopen", watched)
    if result["ours"] != result["reference"]:
        raise AssertionError(diff_text(result["reference"], result["ours"]))
    assert result["reference"][0]["reply"] == {"return": {}}
    assert statuses(result["reference"][1]["events"]) == [("b", "paused"), ("b", "running")]


def test_commit_reopens_its_base_drained(compat: Compat) -> None:
    """block-commit of mid into the read-only base: the base is reopened read-write, drained,
    after the job is created and before it runs (a job on mid pauses and resumes), and
    read-only again after; the graph changes at the job's end drain as often as on qsd."""
    result = run(compat, "commit", "mid")
    seen: dict[str, list[tuple[str, str]]] = {}
    for side, records in result.items():
        assert records[0]["reply"] == {"return": {}}, (side, records[0])
        seen[side] = statuses(records[1]["events"])
        assert records[2]["base"] is True, (side, records[2])  # read-only again
    assert seen["ours"] == seen["reference"]
    # The graph after it too: the backup's filter above mid now sits on the base (qsd moves
    # the commit filter's users there), no filter of the commit is left.
    if result["ours"] != result["reference"]:
        raise AssertionError(diff_text(result["reference"], result["ours"]))
    start = seen["reference"][: seen["reference"].index(("c", "running")) + 1]
    assert start == [("c", "created"), ("b", "paused"), ("b", "running"),
                     ("c", "running")]  # fmt: skip


def test_commit_base_over_a_read_only_file_node_of_its_own(compat: Compat) -> None:
    """The base's protocol node was added on its own (by reference): qsd's reopen does not
    take it along, so the base cannot become writable and block-commit fails."""
    file = {"driver": "file", "node-name": "base-file", "filename": "$D/base.qcow2",
            "read-only": True}  # fmt: skip
    base = {"driver": "qcow2", "node-name": "base", "file": "base-file", "read-only": True,
            "backing": None}  # fmt: skip
    mid = {"driver": "qcow2", "node-name": "mid", "read-only": True, "backing": "base",
           "file": {"driver": "file", "filename": "$D/mid.qcow2"}}  # fmt: skip
    top = {"driver": "qcow2", "node-name": "top", "backing": "mid",
           "file": {"driver": "file", "filename": "$D/top.qcow2"}}  # fmt: skip
    compat.check_transcript(
        [
            Cmd("blockdev-add", file),
            Cmd("blockdev-add", base),
            Cmd("blockdev-add", mid),
            Cmd("blockdev-add", top),
            Cmd("block-commit", {"job-id": "c", "device": "top", "top-node": "mid"}),
            WaitEvent("JOB_STATUS_CHANGE"),
            WaitEvent("JOB_STATUS_CHANGE"),
            Cmd("query-named-block-nodes", {"flat": True}, sort_by="node-name"),
            Cmd("quit"),
            ExpectEof(),
        ],
        setup=make_chain,
        negotiate=True,
    )
