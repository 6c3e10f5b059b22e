"""block-stream with auto-dismiss=false on the reference qsd and on ours: between `concluded`
and job-dismiss the job still holds its nodes (the copy-on-read filter, childless now, as its
main node; the top; the old chain's layers), which keeps them in the graph and busy; dismiss
lets them all go. Replies, events and graphs compared live.

Test ring (compat). Each test starts a fresh pair of daemons on the same qemu-img-made chain,
stopped by PID at teardown. query-named-block-nodes is left out: qsd 7.2 crashes on it while
the childless filter exists.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, ExpectEof, WaitEvent

pytestmark = pytest.mark.compat

STATUS = "JOB_STATUS_CHANGE"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def make_chain(d: Path) -> None:
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 1 0 1M", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/mid.qcow2")
    _run("qemu-io", "-c", "write -P 2 512k 1M", f"{d}/mid.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    _run("qemu-io", "-c", "write -P 3 1M 256k", f"{d}/top.qcow2")


def chain_by_nodes() -> list[Cmd]:
    def node(name: str, backing: str | None) -> dict[str, Any]:
        return {"driver": "qcow2", "node-name": name, "read-only": name != "top",
                "file": {"driver": "file", "node-name": f"{name}-file",
                         "filename": f"$D/{name}.qcow2"}, "backing": backing}  # fmt: skip

    return [
        Cmd("blockdev-add", node("base", None)),
        Cmd("blockdev-add", node("mid", "base")),
        Cmd("blockdev-add", node("top", "mid")),
    ]


def statuses(n: int) -> list[WaitEvent]:
    return [WaitEvent(STATUS) for _ in range(n)]


def held_then_dismissed(busy: list[str]) -> list[Any]:
    """The concluded job's hold (graph, queries, blockdev-del refused), then dismiss."""
    return [
        Cmd("x-debug-query-block-graph"),
        Cmd("query-block-jobs"),
        Cmd("query-jobs"),
        *[Cmd("blockdev-del", {"node-name": name}) for name in busy],
        Cmd("job-dismiss", {"id": "s0"}),
        *statuses(1),  # null
        Cmd("x-debug-query-block-graph"),
        *[Cmd("blockdev-del", {"node-name": name}) for name in busy],
        Cmd("query-jobs"),
        Cmd("quit"),
        ExpectEof(),
    ]


def without_old_chain_perms(steps: list[Any]) -> list[Any]:
    """qsd's relink leaves the layers it cut off with the permissions they had while the
    job ran (it does not refresh nodes that lost their parent); ours recomputes them. The
    `perm` of an edge between two nodes no longer below the top is left out."""
    out = []
    for rec in steps:
        reply = rec.get("reply") if isinstance(rec, dict) else None
        if not isinstance(reply, dict):
            out.append(rec)
            continue
        graph = reply.get("return")
        if not (isinstance(graph, dict) and "edges" in graph):
            out.append(rec)
            continue
        names = {n["id"]: n["name"] for n in graph["nodes"]}
        old = {"mid", "base"}
        edges = [
            {**e, "perm": "<old chain>"}
            if names.get(e["parent"]) in old and names.get(e["child"]) in old
            else e
            for e in graph["edges"]
        ]
        out.append({**rec, "reply": {**reply, "return": {**graph, "edges": edges}}})
    return out


@pytest.mark.parametrize("filter_name", [None, "cor"])
def test_concluded_stream_holds_its_nodes_until_dismissed(
    compat: Compat, filter_name: str | None
) -> None:
    extra = {} if filter_name is None else {"filter-node-name": filter_name}
    result = compat.run_transcript(
        [
            *chain_by_nodes(),
            Cmd(
                "block-stream",
                {
                    "job-id": "s0",
                    "device": "top",
                    "base-node": "base",
                    "auto-dismiss": False,
                    **extra,
                },
            ),
            *statuses(4),  # created, running, waiting, pending
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(1),  # concluded
            *held_then_dismissed(["mid", *([filter_name] if filter_name else [])]),
        ],
        setup=make_chain,
    )
    result.norm = {side: without_old_chain_perms(recs) for side, recs in result.norm.items()}
    result.assert_same()


def test_cancelled_stream_holds_the_implicit_chain_until_dismissed(compat: Compat) -> None:
    """A top opened with its backing chain from the header (implicit nodes), the job
    cancelled mid-way: the chain is unchanged, and the implicit layers stay held."""
    top = {
        "driver": "qcow2",
        "node-name": "top",
        "file": {"driver": "file", "node-name": "top-file", "filename": "$D/top.qcow2"},
    }
    compat.check_transcript(
        [
            Cmd("blockdev-add", top),
            Cmd(
                "block-stream",
                {"job-id": "s0", "device": "top", "speed": 1024, "auto-dismiss": False},
            ),
            *statuses(2),  # created, running
            Cmd("job-cancel", {"id": "s0"}),
            *statuses(1),  # aborting
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(1),  # concluded
            *held_then_dismissed([]),
        ],
        setup=make_chain,
    )


def test_stream_of_a_held_filter_is_busy(compat: Compat) -> None:
    """A pending job's filter, then the same filter once the job is cancelled (childless,
    still held until dismissed): another block-stream on it is refused as busy, before
    its backing-file check; after dismiss the filter is gone."""
    stream_flt = {"job-id": "s1", "device": "flt"}
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "nn", "size": 1 << 20}),
            Cmd("block-stream", {"job-id": "s0", "device": "nn", "auto-finalize": False,
                                 "auto-dismiss": False, "filter-node-name": "flt"}),
            *statuses(4),  # created, running, waiting, pending
            Cmd("block-stream", stream_flt),
            Cmd("block-stream", {**stream_flt, "backing-file": "x"}),
            Cmd("block-stream", {"job-id": "s1", "device": "nn"}),
            Cmd("job-cancel", {"id": "s0"}),
            *statuses(1),  # aborting
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(1),  # concluded
            Cmd("block-stream", stream_flt),
            Cmd("block-stream", {**stream_flt, "backing-file": "x"}),
            Cmd("block-stream", {**stream_flt, "bottom": "nn"}),
            Cmd("block-stream", {**stream_flt, "base-node": "nn"}),
            Cmd("blockdev-backup", {"job-id": "b1", "device": "flt", "target": "nn",
                                    "sync": "full"}),
            Cmd("query-jobs"),
            Cmd("job-dismiss", {"id": "s0"}),
            *statuses(1),  # null
            Cmd("block-stream", stream_flt),
            Cmd("x-debug-query-block-graph"),
            Cmd("quit"),
            ExpectEof(),
        ]
    )  # fmt: skip


def test_a_read_only_device_is_reopened_not_the_node_below(compat: Compat) -> None:
    """qsd reopens the device read-write when it is read-only, not the node below its
    filters: a filter made read-only by a snapshot streams; a filter over a node that is
    read-only cannot take the copy-on-read filter's writes."""

    def add(driver: str, name: str, **opts: Any) -> Cmd:
        return Cmd("blockdev-add", {"driver": driver, "node-name": name, **opts})

    compat.check_transcript(
        [
            add("file", "f0", filename="$D/base.qcow2"),
            add("qcow2", "d0", file="f0"),
            add("blkdebug", "x2", image="d0"),
            Cmd(
                "blockdev-snapshot-sync",
                {"node-name": "x2", "snapshot-file": "$D/s3.qcow2",
                 "snapshot-node-name": "sn4", "format": "qcow2"},
            ),
            Cmd("block-stream", {"job-id": "j6", "device": "x2"}),
            WaitEvent("JOB_STATUS_CHANGE"),
            add("null-co", "n0", size=1 << 20, **{"read-only": True}),
            Cmd("object-add", {"qom-type": "throttle-group", "id": "tg", "limits": {}}),
            add("throttle", "x4", file="n0", **{"throttle-group": "tg"}),
            Cmd("block-stream", {"job-id": "j11", "device": "x4"}),
            Cmd("query-named-block-nodes", {"flat": True}),
        ],
        setup=make_chain,
    )  # fmt: skip
