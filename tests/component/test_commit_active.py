"""Active block-commit in an in-process daemon: the mirror job in commit mode. Client writes
through the filter in every phase (some racing the copy), the job's edges and permissions,
the pivot, a soft cancel in READY, early failures that give the base back read-only, and a
base smaller than the top; data checked with qemu-img afterwards.

Component ring. A stand-in client holds the top through an edge, as an NBD export does; the
job moves it onto the filter and, on job-complete, onto the base. A speed of 1 KiB/s parks
the job in its rate-limit sleep after its first request, so the test acts mid-job without
sleeping. Every write is replayed on a raw image with qemu-io: the expected result.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.jobs.commit_active import ActiveCommitJob
from storage_daemon.blockdev.perm import Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from tests.component.test_mirror import Client, Recorder, _run, arun, filters, wait_gone

MiB = 1 << 20
SIZE = 4 * MiB


def make_chain(d: Path, base_size: int = SIZE) -> None:
    _run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/base.qcow2", str(base_size))
    _run("qemu-io", "-c", "write -P 0x11 0 1M", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         f"{d}/mid.qcow2", str(SIZE))  # fmt: skip
    _run("qemu-io", "-c", "write -P 0x22 512k 1M", f"{d}/mid.qcow2")
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
         f"{d}/top.qcow2")  # fmt: skip
    _run("qemu-io", "-c", "write -P 0x33 3M 256k", f"{d}/top.qcow2")
    _run("qemu-img", "convert", "-O", "raw", f"{d}/top.qcow2", f"{d}/expect.raw")


def qcow2(name: str, d: Path, backing: str | None, read_only: bool) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name, "read-only": read_only, "backing": backing,
            "file": {"driver": "file", "node-name": f"{name}-file",
                     "filename": str(d / f"{name}.qcow2")}}  # fmt: skip


async def open_chain(d: Path) -> Daemon:
    daemon = Daemon()
    await daemon.run_command("blockdev-add", qcow2("base", d, None, True))
    await daemon.run_command("blockdev-add", qcow2("mid", d, "base", True))
    await daemon.run_command("blockdev-add", qcow2("top", d, "mid", False))
    return daemon


@pytest.fixture
def chain(scratch: Path) -> Path:
    make_chain(scratch)
    return scratch


@pytest.fixture
async def daemon(chain: Path) -> AsyncIterator[Daemon]:
    d = await open_chain(chain)
    try:
        yield d
    finally:
        await d.shutdown()


class Writer:
    """Writes through the client's edge, and the same into the expected raw image."""

    def __init__(self, client: Client, d: Path) -> None:
        self.client = client
        self.expect = d / "expect.raw"

    async def write(self, offset: int, length: int, pattern: int) -> None:
        await io.pwrite(self.client.edge, offset, bytes([pattern]) * length)
        await arun("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}",
                   str(self.expect))  # fmt: skip

    async def zeroes(self, offset: int, length: int) -> None:
        await io.pwrite_zeroes(self.client.edge, offset, length)
        await arun("qemu-io", "-f", "raw", "-c", f"write -z {offset} {length}", str(self.expect))


def commit_job(daemon: Daemon) -> ActiveCommitJob:
    job = daemon.jobs.find("c0")
    assert isinstance(job, ActiveCommitJob)
    return job


async def test_writes_in_every_phase_then_pivot(daemon: Daemon, scratch: Path) -> None:
    rec = Recorder(daemon)
    client = Client(daemon, "top")
    writer = Writer(client, scratch)
    base = daemon.graph.lookup("base")
    await daemon.run_command("block-commit", {"job-id": "c0", "device": "top", "speed": 1024})
    job = commit_job(daemon)
    assert job.job_type == "commit" and rec.take() == ["created", "running"]
    assert client.edge.node.driver.name == "mirror_top" and not base.read_only
    # Parked after its first request (512k-1.5M): one write into what it copied, others
    # into what it has still to copy.
    await writer.write(768 * 1024, 4096, 0x44)
    await writer.write(3 * MiB + 4096, 8192, 0x45)
    await writer.zeroes(2 * MiB, 64 * 1024)
    # Writes racing the copy, then more while READY.
    racing = [writer.write(i * 256 * 1024 + 512, 3000, 0x50 + i) for i in range(16)]
    await asyncio.gather(
        daemon.run_command("block-job-set-speed", {"device": "c0", "speed": 0}),
        *racing,
    )
    await rec.wait_for("ready")
    await writer.write(100 * 1024, 64 * 1024, 0x66)
    await writer.zeroes(3 * MiB, 4096)
    await daemon.run_command("job-complete", {"id": "c0"})
    await wait_gone(daemon, "c0")
    assert rec.take()[-5:] == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    # The client now uses the base; the filter is gone; the base stays read-write.
    assert client.edge.node is base and not filters(daemon) and not base.read_only
    await writer.write(5000, 100, 0x77)
    await io.flush(client.edge)
    await arun("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw",
               str(scratch / "base.qcow2"), str(scratch / "expect.raw"))  # fmt: skip


async def test_edges_and_permissions_while_running(daemon: Daemon) -> None:
    client = Client(daemon, "top")
    await daemon.run_command("block-commit", {"job-id": "c0", "device": "top", "speed": 1024})
    job = commit_job(daemon)
    node = client.edge.node
    top_edge = node.children[0]
    # The filter passes its users' writes on, but takes no consistent read above the base.
    assert top_edge.perm & Perm.WRITE and not top_edge.perm & Perm.CONSISTENT_READ
    assert top_edge.shared & Perm.WRITE
    names = {(e.name, e.node.name) for e in job.edges}
    assert names == {("main node", node.name), ("source", "top"), ("target", "base"),
                     ("intermediate node", "mid")}  # fmt: skip
    mid_edge = next(e for e in job.edges if e.name == "intermediate node")
    assert mid_edge.perm == Perm(0) and mid_edge.shared == Perm.WRITE | Perm.WRITE_UNCHANGED
    assert job.target_edge is not None
    assert job.target_edge.shared == Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.CONSISTENT_READ
    with pytest.raises(QmpError, match="Need a root block node"):
        await daemon.run_command("block-commit", {"job-id": "c1", "device": node.name})
    await daemon.run_command("job-cancel", {"id": "c0"})
    await wait_gone(daemon, "c0")
    assert client.edge.node.name == "top" and not filters(daemon)


async def test_soft_cancel_in_ready_keeps_the_top(daemon: Daemon, scratch: Path) -> None:
    rec = Recorder(daemon)
    client = Client(daemon, "top")
    writer = Writer(client, scratch)
    await daemon.run_command("block-commit", {"job-id": "c0", "device": "top"})
    await rec.wait_for("ready")
    await writer.write(2 * MiB, 8192, 0x5C)
    await daemon.run_command("block-job-cancel", {"device": "c0"})
    await wait_gone(daemon, "c0")
    assert "BLOCK_JOB_COMPLETED" in rec.events and "BLOCK_JOB_CANCELLED" not in rec.events
    assert client.edge.node.name == "top" and not daemon.graph.lookup("base").read_only
    await io.flush(client.edge)
    for image in ("top", "base"):
        await arun("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw",
                   str(scratch / f"{image}.qcow2"), str(scratch / "expect.raw"))  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"speed": -1}, "Parameter 'speed' expects a non-negative value"),
        ({"filter-node-name": "mid"}, "Duplicate nodes with node-name='mid'"),
        ({"job-id": "9"}, "Invalid job ID '9'"),
    ],
)
async def test_early_failure_gives_the_base_back_read_only(
    daemon: Daemon, args: dict[str, Any], message: str
) -> None:
    base = daemon.graph.lookup("base")
    with pytest.raises(QmpError, match=message):
        await daemon.run_command("block-commit", {"job-id": "c0", "device": "top", **args})
    assert base.read_only and base.options.read_only
    assert not filters(daemon) and not daemon.jobs.block_jobs()
    assert [e.name for e in base.parents] == ["backing"]


async def test_small_base_grows(scratch: Path) -> None:
    await asyncio.to_thread(make_chain, scratch, MiB)
    daemon = await open_chain(scratch)
    try:
        rec = Recorder(daemon)
        await daemon.run_command("block-commit", {"job-id": "c0", "device": "top"})
        await rec.wait_for("ready")
        assert daemon.graph.lookup("base").driver.getlength() == SIZE
        await daemon.run_command("job-complete", {"id": "c0"})
        await wait_gone(daemon, "c0")
    finally:
        await daemon.shutdown()
    await arun("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
               str(scratch / "base.qcow2"), str(scratch / "expect.raw"))  # fmt: skip
