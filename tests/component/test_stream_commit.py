"""block-stream and block-commit in an in-process daemon: pause, resume, speed changes and
cancel in the middle of a rate-limited job; the data checked with qemu-img afterwards.

Component ring. The chain is made by qemu-img/qemu-io; a 1 KiB/s speed keeps the job parked in
its rate-limit sleep after its first chunk, so the test acts mid-job without sleeping.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev.drivers import preload
from storage_daemon.daemon import Daemon
from storage_daemon.monitor.dispatch import load_handlers
from storage_daemon.qapi.runtime import command_args

load_handlers()
preload()  # as the daemon does before it is ready: no driver import on the event loop
command_args("block-stream", {"job-id": "w", "device": "w"})
command_args("block-commit", {"job-id": "w", "device": "w"})


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def make_chain(d: Path) -> None:
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 1 0 2M", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/mid.qcow2")
    _run("qemu-io", "-c", "write -P 2 1M 2M", f"{d}/mid.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    _run("qemu-io", "-c", "write -P 3 1536k 64k", f"{d}/top.qcow2")
    _run("qemu-img", "convert", "-O", "raw", f"{d}/top.qcow2", f"{d}/expect.raw")


class Recorder:
    def __init__(self, daemon: Daemon) -> None:
        self.events: list[str] = []
        daemon.events.subscribe(self)

    def __call__(self, name: str, data: dict[str, Any] | None, ts: int) -> None:
        if name == "JOB_STATUS_CHANGE" and data:
            self.events.append(str(data["status"]))
        else:
            self.events.append(name)

    def take(self) -> list[str]:
        out, self.events = self.events, []
        return out


@pytest.fixture
def chain_dir(scratch: Path) -> Path:
    make_chain(scratch)  # subprocesses: outside the event loop
    return scratch


@pytest.fixture
async def daemon(chain_dir: Path) -> AsyncIterator[Daemon]:
    scratch = chain_dir
    d = Daemon()
    await d.run_command(
        "blockdev-add",
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": str(scratch / "top.qcow2")}},
    )  # fmt: skip
    try:
        yield d
    finally:
        await d.shutdown()


async def arun(*argv: str) -> str:
    return await asyncio.to_thread(_run, *argv)


async def wait_gone(daemon: Daemon, job_id: str) -> None:
    job = daemon.jobs.find(job_id)
    if job is not None:
        await job.wait_done()


async def test_stream_pause_resume_speed(daemon: Daemon, scratch: Path) -> None:
    rec = Recorder(daemon)
    await daemon.run_command("block-stream", {"job-id": "s0", "device": "top", "speed": 1024})
    assert rec.take() == ["created", "running"]
    info = (await daemon.run_command("query-block-jobs", None))[0]
    assert info["speed"] == 1024 and info["offset"] < info["len"] == 4 << 20
    await daemon.run_command("block-job-pause", {"device": "s0"})
    assert rec.take() == ["paused"]
    await daemon.run_command("block-job-resume", {"device": "s0"})
    assert rec.take() == ["running"]
    await daemon.run_command("block-job-set-speed", {"device": "s0", "speed": 0})
    await wait_gone(daemon, "s0")
    assert rec.take() == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    top = daemon.graph.lookup("top")
    assert top.child("backing") is None
    assert [n.name for n in daemon.graph if not n.name.startswith("#")] == ["top"]
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await arun("qemu-img", "check", str(scratch / "top.qcow2"))
    info_out = await arun("qemu-img", "info", str(scratch / "top.qcow2"))
    assert "backing file" not in info_out
    await arun(
        "qemu-img", "compare", "-F", "raw", str(scratch / "top.qcow2"), str(scratch / "expect.raw")
    )


async def test_stream_cancel_leaves_chain(daemon: Daemon, scratch: Path) -> None:
    rec = Recorder(daemon)
    await daemon.run_command(
        "block-stream", {"job-id": "s0", "device": "top", "speed": 1024, "auto-dismiss": False}
    )
    await daemon.run_command("job-cancel", {"id": "s0"})
    await wait_gone(daemon, "s0")
    assert rec.take() == ["created", "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded"]
    await daemon.run_command("job-dismiss", {"id": "s0"})
    top = daemon.graph.lookup("top")
    backing = top.child("backing")
    assert backing is not None and backing.node.filename().endswith("mid.qcow2")
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    assert "mid.qcow2" in await arun("qemu-img", "info", str(scratch / "top.qcow2"))
    await arun(
        "qemu-img", "compare", "-F", "raw", str(scratch / "top.qcow2"), str(scratch / "expect.raw")
    )


async def test_commit_active_then_cancel_and_complete(daemon: Daemon, scratch: Path) -> None:
    rec = Recorder(daemon)
    await daemon.run_command("block-commit", {"job-id": "c0", "device": "top", "speed": 1024})
    assert rec.take() == ["created", "running"]
    await daemon.run_command("block-job-set-speed", {"device": "c0", "speed": 0})
    job = daemon.jobs.find("c0")
    assert job is not None
    while job.status.value != "ready":  # each wake-up copies one chunk; READY is an event
        await job._first_yield.wait()
        job._first_yield.clear()
        if job.status.value != "ready":
            await daemon.run_command("block-job-set-speed", {"device": "c0", "speed": 0})
    assert rec.take()[-2:] == ["ready", "BLOCK_JOB_READY"]
    await daemon.run_command("job-complete", {"id": "c0"})
    await wait_gone(daemon, "c0")
    assert rec.take() == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await arun("qemu-img", "check", str(scratch / "base.qcow2"))
    await arun(
        "qemu-img", "compare", "-F", "raw", str(scratch / "base.qcow2"), str(scratch / "expect.raw")
    )


async def test_stream_filter_holds_the_users_while_running(daemon: Daemon, scratch: Path) -> None:
    """The copy-on-read filter takes the top's users (an export) for the job's lifetime and
    gives them back, with the data streamed, when it is dropped."""
    sock = str(scratch / "nbd.sock")
    await daemon.run_command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await daemon.run_command(
        "block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "writable": True}
    )
    top = daemon.graph.lookup("top")

    def export_nodes() -> list[str]:
        return [
            e.node.name
            for n in daemon.graph
            for e in n.parents
            if e.parent_node is None
            and type(e.parent).__name__ not in ("StreamJob", "UnnamedBackend")
        ]

    assert export_nodes() == ["top"]
    await daemon.run_command(
        "block-stream",
        {"job-id": "s0", "device": "top", "speed": 1024, "filter-node-name": "cor"},
    )
    cor = daemon.graph.lookup("cor")
    assert cor.driver.name == "copy-on-read" and cor.primary is not None
    assert cor.primary.node is top
    assert export_nodes() == ["cor"]
    with pytest.raises(Exception, match="is busy: block device is in use by block job: stream"):
        await daemon.run_command("block-stream", {"job-id": "s1", "device": "top"})
    await daemon.run_command("block-job-set-speed", {"device": "s0", "speed": 0})
    await wait_gone(daemon, "s0")
    assert daemon.graph.find("cor") is None
    assert export_nodes() == ["top"]
    await daemon.run_command("block-export-del", {"id": "e0"})
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await arun(
        "qemu-img", "compare", "-F", "raw", str(scratch / "top.qcow2"), str(scratch / "expect.raw")
    )
