"""blockdev-mirror in an in-process daemon: client writes through the mirror_top filter during
each phase, pause/resume/set-speed mid-job, completion with the pivot, soft and forced
cancels, sync modes, size and error-policy failures; data checked with qemu-img afterwards.

Component ring. A stand-in client holds the source through an edge, as an NBD export does;
the job moves it onto the filter and, on job-complete, onto the target. A speed of 1 KiB/s
with 64 KiB copy requests parks the job in its rate-limit sleep after the first request, so
the test acts mid-job without sleeping.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers import preload
from storage_daemon.blockdev.jobs.mirror import MirrorJob
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.monitor.dispatch import load_handlers

load_handlers()
preload()  # drivers are imported before the loop runs, as the daemon does before it is ready

MiB = 1 << 20
SIZE = 4 * MiB
SLOW = {"speed": 1024, "granularity": 65536, "buf-size": 65536}


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


async def arun(*argv: str) -> str:
    return await asyncio.to_thread(_run, *argv)


class Client:
    """Holds a node as an export does (its edge moves with the pivot)."""

    def __init__(self, daemon: Daemon, node_name: str) -> None:
        self.node: BlockNode = daemon.graph.lookup(node_name)
        shared = PERM_ALL & ~Perm.RESIZE
        self.edge: BdrvChild = daemon.graph.attach(
            self, self.node, "root", ChildRole(0), Perm.CONSISTENT_READ | Perm.WRITE, shared
        )

    def parent_description(self, child: BdrvChild) -> str:
        return f"test client (uses node '{child.node.name}')"


class Recorder:
    def __init__(self, daemon: Daemon) -> None:
        self.events: list[str] = []
        self.data: list[tuple[str, dict[str, Any] | None]] = []
        self._changed = asyncio.Event()
        daemon.events.subscribe(self)

    def __call__(self, name: str, data: dict[str, Any] | None, ts: int) -> None:
        self.data.append((name, data))
        if name == "JOB_STATUS_CHANGE" and data:
            self.events.append(str(data["status"]))
        else:
            self.events.append(name)
        self._changed.set()

    async def wait_for(self, name: str) -> None:
        while name not in self.events:
            self._changed.clear()
            await self._changed.wait()

    def take(self) -> list[str]:
        out, self.events = self.events, []
        return out


def make_images(d: Path, fmt_target_size: int = SIZE) -> None:
    _run("qemu-img", "create", "-q", "-f", "raw", f"{d}/src.raw", str(SIZE))
    _run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1536k", "-c", "write -P 0x6b 3M 512k",
         f"{d}/src.raw")  # fmt: skip
    _run("qemu-img", "create", "-q", "-f", "raw", f"{d}/tgt.raw", str(fmt_target_size))


def raw_node(name: str, path: Path) -> dict[str, Any]:
    return {"driver": "raw", "node-name": name,
            "file": {"driver": "file", "node-name": f"{name}-file", "filename": str(path)}}  # fmt: skip


@pytest.fixture
def images(scratch: Path) -> Path:
    make_images(scratch)
    return scratch


@pytest.fixture
async def daemon(images: Path) -> AsyncIterator[Daemon]:
    d = Daemon()
    await d.run_command("blockdev-add", raw_node("src", images / "src.raw"))
    await d.run_command("blockdev-add", raw_node("tgt", images / "tgt.raw"))
    try:
        yield d
    finally:
        await d.shutdown()


def mirror_job(daemon: Daemon, job_id: str = "m0") -> MirrorJob:
    job = daemon.jobs.find(job_id)
    assert isinstance(job, MirrorJob)
    return job


async def wait_gone(daemon: Daemon, job_id: str) -> None:
    job = daemon.jobs.find(job_id)
    if job is not None:
        await job.wait_done()


def filters(daemon: Daemon) -> list[str]:
    return [n.name for n in daemon.graph if n.driver.name == "mirror_top"]


async def compare(images: Path, a: str = "src.raw", b: str = "tgt.raw") -> None:
    await arun("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw",
               str(images / a), str(images / b))  # fmt: skip


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
async def test_writes_in_every_phase_then_pivot(daemon: Daemon, images: Path, mode: str) -> None:
    rec = Recorder(daemon)
    client = Client(daemon, "src")
    await daemon.run_command(
        "blockdev-mirror",
        {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full", "copy-mode": mode,
         "filter-node-name": "mt", **SLOW},
    )  # fmt: skip
    assert rec.take() == ["created", "running"]
    job = mirror_job(daemon)
    assert client.edge.node.name == "mt" and client.node.name == "mt"
    info = (await daemon.run_command("query-block-jobs", None))[0]
    assert info["type"] == "mirror" and info["len"] == SIZE and info["offset"] < SIZE
    # Copy phase: a write the job has not reached yet.
    payload = b"\xab" * 65536
    await io.pwrite(client.edge, 2 * MiB, payload)
    await io.pwrite_zeroes(client.edge, 3 * MiB + 4096, 8192)
    assert job.target_edge is not None
    on_target = bytes(await io.pread(job.target_edge, 2 * MiB, 65536))
    if mode == "write-blocking":
        assert on_target == payload  # written through at once
    else:
        assert on_target != payload and job.bitmap.is_dirty(2 * MiB // 65536)
    await daemon.run_command("block-job-pause", {"device": "m0"})
    await rec.wait_for("paused")  # at the job's next pause point
    assert rec.take() == ["paused"]
    info = (await daemon.run_command("query-block-jobs", None))[0]
    assert info["paused"] is True and info["status"] == "paused"
    await daemon.run_command("block-job-resume", {"device": "m0"})
    assert rec.take() == ["running"]
    await daemon.run_command("block-job-set-speed", {"device": "m0", "speed": 0})
    await rec.wait_for("BLOCK_JOB_READY")
    assert rec.take() == ["ready", "BLOCK_JOB_READY"]
    # Ready phase: writes keep being mirrored.
    await io.pwrite(client.edge, 100, b"\xcd" * 5000)
    await io.pdiscard(client.edge, 0, 65536)
    await daemon.run_command("job-complete", {"id": "m0"})
    await wait_gone(daemon, "m0")
    assert rec.take() == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    # The pivot: the client now uses the target, the filter is gone.
    assert client.edge.node.name == "tgt" and client.node.name == "tgt"
    assert filters(daemon) == []
    assert daemon.graph.lookup("src").parents == []
    await compare(images)
    await io.pwrite(client.edge, 0, b"\x77" * 512)
    assert bytes(await io.pread(client.edge, 0, 512)) == b"\x77" * 512


async def test_soft_cancel_in_ready_completes_without_pivot(daemon: Daemon, images: Path) -> None:
    rec = Recorder(daemon)
    client = Client(daemon, "src")
    await daemon.run_command(
        "blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"}
    )
    await rec.wait_for("BLOCK_JOB_READY")
    await io.pwrite(client.edge, 1000, b"\x42" * 3000)
    await daemon.run_command("block-job-cancel", {"device": "m0"})
    await wait_gone(daemon, "m0")
    assert rec.take() == [
        "created", "running", "ready", "BLOCK_JOB_READY",
        "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip
    assert client.edge.node.name == "src"
    assert filters(daemon) == []
    await compare(images)  # converged before leaving READY


async def test_force_cancel_in_ready_and_before(daemon: Daemon, images: Path) -> None:
    rec = Recorder(daemon)
    client = Client(daemon, "src")
    await daemon.run_command(
        "blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"}
    )
    await rec.wait_for("BLOCK_JOB_READY")
    await daemon.run_command("block-job-cancel", {"device": "m0", "force": True})
    await wait_gone(daemon, "m0")
    assert rec.take()[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    # Before READY a soft cancel is a real one too.
    await daemon.run_command(
        "blockdev-mirror",
        {"job-id": "m1", "device": "src", "target": "tgt", "sync": "full", **SLOW},
    )
    await daemon.run_command("block-job-cancel", {"device": "m1"})
    await wait_gone(daemon, "m1")
    assert rec.take() == [
        "created", "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null",
    ]  # fmt: skip
    assert client.edge.node.name == "src" and filters(daemon) == []
    assert daemon.graph.lookup("tgt").parents == []


async def test_sync_none_copies_only_new_writes(daemon: Daemon, images: Path) -> None:
    rec = Recorder(daemon)
    client = Client(daemon, "src")
    await daemon.run_command(
        "blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "none"}
    )
    await rec.wait_for("BLOCK_JOB_READY")
    ready = next(d for n, d in rec.data if n == "BLOCK_JOB_READY")
    assert ready is not None and ready["len"] == 0 and ready["offset"] == 0
    await io.pwrite(client.edge, MiB, b"\x99" * 4096)
    await daemon.run_command("job-complete", {"id": "m0"})
    await wait_gone(daemon, "m0")
    out = await arun("qemu-io", "-f", "raw", "-r", "-U", "-c", "read -P 0x99 1M 4k",
                     "-c", "read -P 0 0 1M", str(images / "tgt.raw"))  # fmt: skip
    assert "Pattern verification failed" not in out


@pytest.fixture
def small_target(scratch: Path) -> Path:
    make_images(scratch, fmt_target_size=SIZE // 2)
    return scratch


async def test_different_sizes_fail(small_target: Path) -> None:
    scratch = small_target
    d = Daemon()
    try:
        await d.run_command("blockdev-add", raw_node("src", scratch / "src.raw"))
        await d.run_command("blockdev-add", raw_node("tgt", scratch / "tgt.raw"))
        rec = Recorder(d)
        await d.run_command(
            "blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"}
        )
        await wait_gone(d, "m0")
        completed = [data for name, data in rec.data if name == "BLOCK_JOB_COMPLETED"]
        assert completed and completed[0] is not None
        assert completed[0]["error"] == "Source and target image have different sizes"
        assert rec.take() == [
            "created", "running", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null",
        ]  # fmt: skip
        assert filters(d) == [] and d.graph.lookup("src").parents == []
    finally:
        await d.shutdown()


@pytest.fixture
def chain(scratch: Path) -> Path:
    _run("qemu-img", "create", "-q", "-f", "qcow2", f"{scratch}/base.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 1 0 2M", f"{scratch}/base.qcow2")
    for name in ("top", "tgt"):
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             f"{scratch}/{name}.qcow2")  # fmt: skip
    _run("qemu-io", "-c", "write -P 3 1M 128k", f"{scratch}/top.qcow2")
    return scratch


async def test_sync_top_copies_the_top_layer(chain: Path) -> None:
    scratch = chain
    d = Daemon()
    try:
        await d.run_command("blockdev-add", {"driver": "qcow2", "node-name": "base",
            "read-only": True, "file": {"driver": "file", "filename": f"{scratch}/base.qcow2"}})  # fmt: skip
        for name in ("top", "tgt"):
            await d.run_command("blockdev-add", {"driver": "qcow2", "node-name": name,
                "backing": "base",
                "file": {"driver": "file", "filename": f"{scratch}/{name}.qcow2"}})  # fmt: skip
        rec = Recorder(d)
        await d.run_command(
            "blockdev-mirror", {"job-id": "m0", "device": "top", "target": "tgt", "sync": "top"}
        )
        await rec.wait_for("BLOCK_JOB_READY")
        ready = next(data for name, data in rec.data if name == "BLOCK_JOB_READY")
        assert ready is not None and ready["len"] == 128 * 1024  # only what top holds
        await d.run_command("job-complete", {"id": "m0"})
        await wait_gone(d, "m0")
    finally:
        await d.shutdown()
    await arun("qemu-img", "check", f"{scratch}/tgt.qcow2")
    await arun("qemu-img", "compare", f"{scratch}/top.qcow2", f"{scratch}/tgt.qcow2")
    # Only the top's data was copied: the target still reads the rest from the backing file.
    out = await arun("qemu-img", "map", "--output=json", f"{scratch}/tgt.qcow2")
    assert '"depth": 0' in out and '"depth": 1' in out


async def test_target_error_stops_then_resume(images: Path) -> None:
    scratch = images
    d = Daemon()
    try:
        await d.run_command("blockdev-add", raw_node("src", scratch / "src.raw"))
        await d.run_command("blockdev-add", {
            "driver": "blkdebug", "node-name": "tgt",
            "inject-error": [{"event": "pwritev", "iotype": "write", "errno": 28, "once": True}],
            "image": raw_node("tgt-raw", scratch / "tgt.raw")})  # fmt: skip
        rec = Recorder(d)
        await d.run_command(
            "blockdev-mirror",
            {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
             "on-target-error": "enospc"},
        )  # fmt: skip
        await rec.wait_for("BLOCK_JOB_ERROR")
        error = next(data for name, data in rec.data if name == "BLOCK_JOB_ERROR")
        assert error == {"device": "m0", "operation": "write", "action": "stop"}
        await rec.wait_for("paused")
        info = (await d.run_command("query-block-jobs", None))[0]
        assert info["io-status"] == "nospace" and info["paused"] is True
        await d.run_command("block-job-resume", {"device": "m0"})
        await rec.wait_for("BLOCK_JOB_READY")
        await d.run_command("job-cancel", {"id": "m0"})
        await wait_gone(d, "m0")
    finally:
        await d.shutdown()
    await compare(scratch)
