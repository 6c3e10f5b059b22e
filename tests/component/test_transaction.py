"""Transactions in an in-process daemon, where the reference cannot be compared: qsd 7.2 crashes
on the stacked rollbacks below and hangs on an aborted grouped pair of backups. Ours must undo
everything (same graph, same export, same node state) and end every job.

Component ring. Images are made by qemu-img outside the event loop; the daemon is driven
through its command path (the same handlers QMP calls).
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import transaction as txn
from storage_daemon.blockdev.drivers import preload
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import load_handlers
from storage_daemon.qapi.runtime import command_args, visit_input

# Imports and model building happen here, not on the event loop of the first test.
load_handlers()
preload()
txn._load_actions()
importlib.import_module("storage_daemon.blockdev.jobs.create")
for _args in (
    {
        "actions": [
            {
                "type": "blockdev-snapshot-sync",
                "data": {"node-name": "n", "snapshot-file": "f", "mode": "existing"},
            },
            {"type": "blockdev-snapshot", "data": {"node": "n", "overlay": "o"}},
            {"type": "abort", "data": {}},
            {
                "type": "blockdev-backup",
                "data": {"job-id": "j", "device": "n", "target": "t", "sync": "full", "speed": 1},
            },
        ],
        "properties": {"completion-mode": "grouped"},
    },
):
    command_args("transaction", _args)
visit_input(
    "BlockdevOptions",
    {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "f"},
        "backing": None,
        "read-only": False,
        "cache": {"direct": False, "no-flush": False},
    },
)
visit_input(
    "BlockdevCreateOptions",
    {
        "driver": "qcow2",
        "size": 0,
        "backing-file": "b",
        "backing-fmt": "qcow2",
        "file": {"driver": "file", "filename": "f"},
    },
)
visit_input("BlockdevCreateOptions", {"driver": "file", "filename": "f", "size": 0})
for _name, _value in (
    (
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "n",
            "read-only": True,
            "discard": "unmap",
            "cache": {"no-flush": True},
            "file": {"driver": "file", "node-name": "f", "filename": "f", "read-only": True},
        },
    ),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "p"}}}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "writable": True}),
    ("nbd-server-add", {"device": "n", "name": "n", "writable": True}),
    ("blockdev-snapshot-sync", {"node-name": "n", "snapshot-file": "f", "snapshot-node-name": "s"}),
    ("job-cancel", {"id": "j"}),
):
    command_args(_name, _value)

IMAGES = ("base", "snap", "t1", "t2", "b2")


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def images(scratch: Path) -> Path:
    for name in (*IMAGES, "ro"):
        _run("qemu-img", "create", "-f", "qcow2", f"{scratch}/{name}.qcow2", "1M")
    _run("qemu-io", "-c", "write -P 1 0 64k", f"{scratch}/base.qcow2")
    # Data after a hole: a rate-limited backup of b2 copies the hole in one request, then
    # sleeps before this extent (an empty image would be done at once, as on qsd).
    _run("qemu-io", "-c", "write -P 2 512k 64k", f"{scratch}/b2.qcow2")
    return scratch


class Events:
    def __init__(self, daemon: Daemon) -> None:
        self.seen: list[tuple[str, Any]] = []
        daemon.events.subscribe(self)

    def __call__(self, name: str, data: dict[str, Any] | None, ts: int) -> None:
        if name == "JOB_STATUS_CHANGE" and data:
            self.seen.append((str(data["id"]), data["status"]))


@pytest.fixture
async def daemon(images: Path) -> AsyncIterator[Daemon]:
    d = Daemon()
    for name in IMAGES:
        await d.run_command(
            "blockdev-add",
            {"driver": "qcow2", "node-name": name,
             "file": {"driver": "file", "node-name": f"{name}-file",
                      "filename": str(images / f"{name}.qcow2")}},
        )  # fmt: skip
    await d.run_command(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(images / "nbd.sock")}}}
    )
    await d.run_command(
        "block-export-add", {"type": "nbd", "id": "e0", "node-name": "base", "writable": True}
    )
    try:
        yield d
    finally:
        await d.shutdown()


def sync(node: str, path: Path, snap: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "blockdev-snapshot-sync",
        "data": {
            "node-name": node,
            "snapshot-file": str(path),
            "snapshot-node-name": snap,
            **extra,
        },
    }


async def state(d: Daemon) -> Any:
    """Everything a rollback must restore: graph, exports, node options and permissions."""
    nodes = {
        n.name: (n.read_only, n.monitor_owned, n.perm, n.shared, [e.name for e in n.children])
        for n in d.graph
    }
    return (
        await d.run_command("x-debug-query-block-graph", None),
        await d.run_command("query-block-exports", None),
        nodes,
    )


STACKED_FAILURES = {
    # The second action finds the first one's overlay, then fails.
    "same-overlay-name": lambda p: [sync("base", p / "s1.qcow2", "s1"),
                                    sync("s1", p / "s2.qcow2", "s1")],
    "stacked-then-busy": lambda p: [sync("base", p / "s1.qcow2", "s1"),
                                    sync("s1", p / "s2.qcow2", "s2"),
                                    {"type": "blockdev-snapshot",
                                     "data": {"node": "base", "overlay": "snap"}}],
    "stacked-then-abort": lambda p: [sync("base", p / "s1.qcow2", "s1"),
                                     {"type": "blockdev-snapshot",
                                      "data": {"node": "s1", "overlay": "snap"}},
                                     {"type": "abort", "data": {}}],
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(STACKED_FAILURES))
async def test_stacked_snapshots_roll_back(daemon: Daemon, images: Path, case: str) -> None:
    before = await state(daemon)
    with pytest.raises(QmpError):
        await daemon.run_command("transaction", {"actions": STACKED_FAILURES[case](images)})
    assert await state(daemon) == before
    export = daemon.exports.find("e0")
    assert export is not None and export.node.name == "base"
    assert not daemon.graph.lookup("base").read_only
    # The images created before the failure stay, as on qsd; nothing else changed.
    assert (images / "s1.qcow2").exists()


async def test_stacked_snapshots_commit(daemon: Daemon, images: Path) -> None:
    await daemon.run_command(
        "transaction",
        {"actions": [sync("base", images / "s1.qcow2", "s1"),
                     sync("s1", images / "s2.qcow2", "s2")]},
    )  # fmt: skip
    exports = await daemon.run_command("query-block-exports", None)
    assert [e["node-name"] for e in exports] == ["s2"]
    graph = daemon.graph
    assert graph.lookup("base").read_only and graph.lookup("s1").read_only
    assert not graph.lookup("s2").read_only
    s2_backing = graph.lookup("s2").child("backing")
    s1_backing = graph.lookup("s1").child("backing")
    assert s2_backing is not None and s2_backing.node.name == "s1"
    assert s1_backing is not None and s1_backing.node.name == "base"


async def test_snapshot_of_a_read_only_node_is_read_only(daemon: Daemon, images: Path) -> None:
    await daemon.run_command(
        "blockdev-add",
        {"driver": "qcow2", "node-name": "ro", "read-only": True,
         "file": {"driver": "file", "filename": str(images / "ro.qcow2"), "read-only": True}},
    )  # fmt: skip
    await daemon.run_command("nbd-server-add", {"device": "ro", "name": "ro"})
    await daemon.run_command(
        "blockdev-snapshot-sync", sync("ro", images / "r1.qcow2", "r1")["data"]
    )
    assert daemon.graph.lookup("r1").read_only
    info = await asyncio.to_thread(_run, "qemu-img", "info", "-U", str(images / "r1.qcow2"))
    assert f"backing file: {images / 'ro.qcow2'}" in info


async def test_overlay_inherits_the_open_flags(daemon: Daemon, images: Path) -> None:
    """As qsd (checked live): caching and discard come from the snapshotted node."""
    await daemon.run_command(
        "blockdev-add",
        {"driver": "qcow2", "node-name": "nf", "discard": "unmap", "cache": {"no-flush": True},
         "file": {"driver": "file", "filename": str(images / "ro.qcow2")}},
    )  # fmt: skip
    await daemon.run_command("nbd-server-add", {"device": "nf", "name": "nf", "writable": True})
    await daemon.run_command(
        "blockdev-snapshot-sync", sync("nf", images / "n1.qcow2", "n1")["data"]
    )
    overlay = daemon.graph.lookup("n1").options
    assert overlay.cache_no_flush and not overlay.cache_direct
    assert overlay.discard == "unmap" and not overlay.read_only
    assert daemon.graph.lookup("nf").read_only


async def test_the_phases_of_real_actions(daemon: Daemon, images: Path) -> None:
    ctx = txn.TransactionContext(daemon)
    with pytest.raises(QmpError, match="Cannot find device='' nor node-name='nosuch'"):
        await txn.run_transaction(
            daemon,
            [("blockdev-snapshot-sync", _model("BlockdevSnapshotSync", sync("base", images / "s1.qcow2", "s1")["data"])),
             ("blockdev-snapshot-sync", _model("BlockdevSnapshotSync", sync("nosuch", images / "s2.qcow2", "s2")["data"]))],
            ctx=ctx,
        )  # fmt: skip
    kinds = ["blockdev-snapshot-sync"] * 2
    assert ctx.trace == [
        ("prepare", kinds[0]), ("prepare", kinds[1]),
        ("abort", kinds[1]), ("abort", kinds[0]),
        ("clean", kinds[0]), ("clean", kinds[1]),
    ]  # fmt: skip
    assert daemon.graph.find("s1") is None


def _model(type_name: str, value: dict[str, Any]) -> Any:
    from storage_daemon.qapi.runtime import visit_input

    return visit_input(type_name, value)


# --- backup actions -------------------------------------------------------------------------

backup_module = pytest.importorskip("storage_daemon.blockdev.jobs.backup")


def backup(job_id: str, device: str, target: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "blockdev-backup",
        "data": {"job-id": job_id, "device": device, "target": target, "sync": "full", **extra},
    }


GROUPED = {"completion-mode": "grouped"}


async def test_grouped_backups_aborted_before_they_ran(daemon: Daemon) -> None:
    """qsd 7.2 hangs here (its grouped JobTxn waits for jobs that never started)."""
    events = Events(daemon)
    with pytest.raises(QmpError, match="Transaction aborted using Abort action"):
        await daemon.run_command(
            "transaction",
            {"actions": [backup("j1", "snap", "t1"), backup("j2", "b2", "t2"),
                         {"type": "abort", "data": {}}], "properties": GROUPED},
        )  # fmt: skip
    assert events.seen == [
        ("j1", "created"), ("j2", "created"),
        ("j2", "aborting"), ("j2", "concluded"), ("j2", "null"),
        ("j1", "aborting"), ("j1", "concluded"), ("j1", "null"),
    ]  # fmt: skip
    assert len(daemon.jobs) == 0
    named = {n.name for n in daemon.graph if not n.implicit}
    assert named == set(IMAGES) | {f"{name}-file" for name in IMAGES}


async def test_grouped_backups_share_one_job_txn(daemon: Daemon) -> None:
    """Cancelling one job of a grouped transaction cancels the other."""
    await daemon.run_command(
        "transaction",
        {"actions": [backup("j1", "snap", "t1", speed=1), backup("j2", "b2", "t2", speed=1)],
         "properties": GROUPED},
    )  # fmt: skip
    j1, j2 = daemon.jobs.find("j1"), daemon.jobs.find("j2")
    assert j1 is not None and j2 is not None
    assert j1.txn is j2.txn and len(j1.txn.jobs) == 2
    events = Events(daemon)
    await daemon.run_command("job-cancel", {"id": "j1"})
    await j1.wait_done()
    await j2.wait_done()
    assert ("j2", "aborting") in events.seen and ("j2", "null") in events.seen
    assert len(daemon.jobs) == 0


async def test_individual_backups_have_their_own_job_txn(daemon: Daemon) -> None:
    await daemon.run_command(
        "transaction",
        {"actions": [backup("j1", "snap", "t1", speed=1), backup("j2", "b2", "t2", speed=1)]},
    )
    j1, j2 = daemon.jobs.find("j1"), daemon.jobs.find("j2")
    assert j1 is not None and j2 is not None
    assert j1.txn is not j2.txn
    await daemon.run_command("job-cancel", {"id": "j1"})
    await j1.wait_done()
    assert daemon.jobs.find("j2") is j2 and not j2.is_completed
    await daemon.run_command("job-cancel", {"id": "j2"})
    await j2.wait_done()


async def test_drained_sections_pause_and_resume_jobs(daemon: Daemon) -> None:
    """A transaction first drains every job (paused, then running again); a backup's source
    stays drained until its job has started, so the new job pauses once it runs and resumes
    at the end. A job the user paused sees nothing of it."""
    events = Events(daemon)
    await daemon.run_command("blockdev-backup", backup("j1", "base", "t1", speed=1)["data"])
    assert events.seen == [("j1", "created"), ("j1", "running"), ("j1", "paused"),
                           ("j1", "running")]  # fmt: skip
    events.seen.clear()
    await daemon.run_command("blockdev-backup", backup("j2", "b2", "t2", speed=1)["data"])
    assert events.seen == [("j1", "paused"), ("j1", "running"), ("j2", "created"),
                           ("j2", "running"), ("j2", "paused"), ("j2", "running")]  # fmt: skip
    events.seen.clear()
    await daemon.run_command("job-pause", {"id": "j1"})
    await daemon.run_command("transaction", {"actions": []})
    assert events.seen == [("j1", "paused"), ("j2", "paused"), ("j2", "running")]
    events.seen.clear()
    await daemon.run_command("job-resume", {"id": "j1"})
    assert events.seen == [("j1", "running")]
    infos = await daemon.run_command("query-block-jobs", None)
    assert [(i["device"], i["paused"], i["status"]) for i in infos] == [
        ("j2", False, "running"), ("j1", False, "running")]  # fmt: skip
    for job_id in ("j1", "j2"):
        job = daemon.jobs.find(job_id)
        assert job is not None
        await daemon.run_command("job-cancel", {"id": job_id})
        await job.wait_done()
    assert len(daemon.jobs) == 0
