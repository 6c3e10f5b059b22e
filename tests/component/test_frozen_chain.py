"""Frozen backing links in an in-process daemon: which links each job freezes, until when
(pending, completion, cancel), and what a frozen link refuses, with qsd's texts.

Component ring. The chain base <- mid <- top is made with qemu-img (test_commit_active's
make_chain). Rate-limited jobs park in their sleep after their first request, so the tests act
mid-job without sleeping; a wait is always for an event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import chain
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from tests.component.test_commit_active import make_chain, open_chain, qcow2
from tests.component.test_mirror import Recorder, arun, wait_gone

Link = tuple[str, str, str]


@pytest.fixture
def images(scratch: Path) -> Path:
    make_chain(scratch)
    return scratch


@pytest.fixture
async def daemon(images: Path) -> AsyncIterator[Daemon]:
    d = await open_chain(images)
    try:
        yield d
    finally:
        await d.shutdown()


def frozen(daemon: Daemon) -> set[Link]:
    """Every frozen link as (parent, child name, child node)."""
    return {
        (edge.parent_node.name, edge.name, node.name)
        for node in daemon.graph
        for edge in node.parents
        if edge.parent_node is not None and daemon.graph.is_frozen(edge)
    }


def backing_chain(daemon: Daemon, top: str = "top") -> list[str]:
    return [node.name for node in chain.walk(daemon.graph.lookup(top))]


async def refused(daemon: Daemon, name: str, args: dict[str, Any]) -> str:
    with pytest.raises(QmpError) as info:
        await daemon.run_command(name, args)
    return info.value.desc


COMMIT_MID = {
    "job-id": "c0",
    "device": "top",
    "top-node": "mid",
    "base-node": "base",
    "filter-node-name": "ct",
}
ACTIVE = {"job-id": "c0", "device": "top", "filter-node-name": "mt"}


async def test_intermediate_commit_freezes_its_filter_down_to_the_base(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    await daemon.run_command("block-commit", {**COMMIT_MID, "speed": 1024, "auto-finalize": False})
    # The overlay's link onto the filter is not part of it (qsd: commit_top down to base).
    assert frozen(daemon) == {("ct", "backing", "mid"), ("mid", "backing", "base")}
    await daemon.run_command("block-job-set-speed", {"device": "c0", "speed": 0})
    await rec.wait_for("BLOCK_JOB_PENDING")
    assert frozen(daemon) == {("ct", "backing", "mid"), ("mid", "backing", "base")}
    await daemon.run_command("job-finalize", {"id": "c0"})
    await wait_gone(daemon, "c0")
    assert frozen(daemon) == set()
    assert backing_chain(daemon) == ["top", "base"]


async def test_intermediate_commit_cancelled_unfreezes(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    await daemon.run_command("block-commit", {**COMMIT_MID, "speed": 1024})
    assert frozen(daemon)
    await daemon.run_command("job-cancel", {"id": "c0"})
    await rec.wait_for("null")
    assert frozen(daemon) == set()
    assert backing_chain(daemon) == ["top", "mid", "base"]


async def test_active_commit_freezes_until_its_exit(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    await daemon.run_command("block-commit", {**ACTIVE, "auto-finalize": False})
    await rec.wait_for("ready")
    links = {("mt", "backing", "top"), ("top", "backing", "mid"), ("mid", "backing", "base")}
    assert frozen(daemon) == links
    await daemon.run_command("job-complete", {"id": "c0"})
    await rec.wait_for("BLOCK_JOB_PENDING")
    assert frozen(daemon) == links  # the pivot waits for job-finalize, the freeze too
    await daemon.run_command("job-finalize", {"id": "c0"})
    await wait_gone(daemon, "c0")
    assert frozen(daemon) == set()


@pytest.mark.parametrize("force", [False, True])
async def test_active_commit_cancelled_in_ready_unfreezes(daemon: Daemon, force: bool) -> None:
    rec = Recorder(daemon)
    await daemon.run_command("block-commit", ACTIVE)
    await rec.wait_for("ready")
    await daemon.run_command("block-job-cancel", {"device": "c0", "force": force})
    await rec.wait_for("null")
    assert frozen(daemon) == set()
    assert backing_chain(daemon) == ["top", "mid", "base"]


async def test_mirror_freezes_nothing(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    await daemon.run_command(
        "blockdev-add", {"driver": "null-co", "node-name": "t", "size": 4 << 20}
    )
    await daemon.run_command(
        "blockdev-mirror",
        {"job-id": "m0", "device": "top", "target": "t", "sync": "full", "filter-node-name": "mf"},
    )
    await rec.wait_for("ready")
    assert frozen(daemon) == set()
    # A link to a mirror's filter can never be frozen (qsd's never_freeze).
    await daemon.run_command(
        "blockdev-add", {"driver": "copy-on-read", "node-name": "C", "file": "mf"}
    )
    cor = daemon.graph.lookup("C")
    with pytest.raises(QmpError, match=r"^Cannot freeze 'file' link to 'mf'$"):
        daemon.graph.freeze_chain(cor, None)
    assert frozen(daemon) == set()  # all or nothing
    await daemon.run_command("blockdev-del", {"node-name": "C"})


async def test_a_frozen_backing_link_cannot_change(daemon: Daemon) -> None:
    graph = daemon.graph
    top, mid, base = (graph.lookup(name) for name in ("top", "mid", "base"))
    links = graph.freeze_chain(top, base)
    assert frozen(daemon) == {("top", "backing", "mid"), ("mid", "backing", "base")}
    with pytest.raises(
        QmpError, match=r"^Cannot change frozen 'backing' link from 'top' to 'mid'$"
    ):
        await chain.set_backing(graph, top, base)
    with pytest.raises(QmpError, match=r"^Cannot change 'backing' link from 'mid' to 'base'$"):
        graph.freeze_chain(mid, None)  # overlaps: nothing more is frozen
    assert frozen(daemon) == {("top", "backing", "mid"), ("mid", "backing", "base")}
    graph.unfreeze(links)
    graph.unfreeze(links)  # harmless
    assert frozen(daemon) == set()
    await chain.set_backing(graph, top, base)
    assert backing_chain(daemon) == ["top", "base"]


@pytest.mark.parametrize("command", ["blockdev-snapshot", "blockdev-snapshot-sync"])
async def test_a_snapshot_cannot_move_a_frozen_link(
    daemon: Daemon, scratch: Path, command: str
) -> None:
    """qsd's text when an external snapshot would point a frozen parent link at the overlay
    (a copy-on-read filter with `bottom` freezes its own `file` link, for one)."""
    await daemon.run_command(
        "blockdev-add", {"driver": "copy-on-read", "node-name": "C", "file": "top"}
    )
    graph = daemon.graph
    links = graph.freeze_chain(graph.lookup("C"), graph.lookup("mid"))
    if command == "blockdev-snapshot":
        await arun("qemu-img", "create", "-q", "-f", "qcow2", str(scratch / "ov.qcow2"), "4M")
        await daemon.run_command("blockdev-add", qcow2("ov", scratch, None, False))
        args: dict[str, Any] = {"node": "top", "overlay": "ov"}
    else:
        args = {
            "node-name": "top",
            "snapshot-file": str(scratch / "s.qcow2"),
            "snapshot-node-name": "s",
        }
    assert await refused(daemon, command, args) == "Cannot change 'file' link to 'top'"
    assert [e.parent_node.name for e in graph.lookup("top").parents if e.parent_node] == ["C"]
    assert backing_chain(daemon, "C") == ["C", "top", "mid", "base"]
    graph.unfreeze(links)
    await daemon.run_command(command, args)
    assert backing_chain(daemon, "C")[:3] == ["C", "ov" if "overlay" in args else "s", "top"]
