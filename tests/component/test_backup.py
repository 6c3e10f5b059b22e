"""blockdev-backup in an in-process daemon: the copy-before-write filter keeps the target equal
to the source as it was when the job started, whatever is written meanwhile.

Component ring. Images come from qemu-img/qemu-io; a client is simulated by an edge attached to
the source before the backup starts (the backup moves it onto its filter, as it moves exports).
A 1 B/s speed parks the job in its rate-limit sleep after its first 1 MiB chunk, so the tests
act mid-job without sleeping; the results are checked with qemu-img compare/check.
"""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers import preload
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import load_handlers
from storage_daemon.qapi.runtime import command_args

load_handlers()
preload()  # driver imports outside the event loop
command_args("blockdev-backup", {"job-id": "w", "device": "w", "target": "t", "sync": "full"})

MiB = 1 << 20


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


async def arun(*argv: str) -> str:
    return await asyncio.to_thread(_run, *argv)


def make_images(d: Path) -> None:
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 7 0 4M", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/src.qcow2")
    _run("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 2M 512k", f"{d}/src.qcow2")
    _run("qemu-io", "-c", "write -z 3M 64k", f"{d}/src.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/tgt.qcow2", "4M")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    _run("qemu-img", "convert", "-O", "raw", f"{d}/src.qcow2", f"{d}/expect.raw")


class Recorder:
    def __init__(self, daemon: Daemon) -> None:
        self.events: list[str] = []
        self.data: list[tuple[str, Any]] = []
        self._waiters: list[asyncio.Future[None]] = []
        daemon.events.subscribe(self)

    def __call__(self, name: str, data: dict[str, Any] | None, ts: int) -> None:
        self.data.append((name, data))
        if name == "JOB_STATUS_CHANGE" and data:
            self.events.append(str(data["status"]))
        else:
            self.events.append(name)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for(self, status: str) -> None:
        """Until a JOB_STATUS_CHANGE to `status` (or an event of that name) arrives."""
        async with asyncio.timeout(30):  # a bound, not a synchronisation
            while status not in self.events:
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter

    def take(self) -> list[str]:
        out, self.events = self.events, []
        return out


class Client:
    """A stand-in for an export: a writer holding a node through an edge."""

    def parent_description(self, child: BdrvChild) -> str:
        return f"test client (uses node '{child.node.name}' as 'root' child)"


@pytest.fixture
def images(scratch: Path) -> Path:
    make_images(scratch)  # subprocesses: outside the event loop
    return scratch


def qcow2(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": str(path)}, **extra}  # fmt: skip


@pytest.fixture
async def daemon(images: Path) -> AsyncIterator[Daemon]:
    d = Daemon()
    await d.run_command("blockdev-add", qcow2("src", images / "src.qcow2"))
    await d.run_command("blockdev-add", qcow2("tgt", images / "tgt.qcow2"))
    try:
        yield d
    finally:
        await d.shutdown()


def attach_client(daemon: Daemon, node: str) -> BdrvChild:
    graph = daemon.graph
    perm = Perm.CONSISTENT_READ | Perm.WRITE
    return graph.attach(Client(), graph.lookup(node), "root", ChildRole(0), perm, PERM_ALL)


async def wait_gone(daemon: Daemon, job_id: str) -> None:
    job = daemon.jobs.find(job_id)
    if job is not None:
        await job.wait_done()


async def progress_reaches(daemon: Daemon, job_id: str, offset: int) -> None:
    """Until the job's progress is at `offset` (its rate limit then parks it)."""
    job: Any = daemon.jobs.find(job_id)
    bcs = job.bcs
    reached = asyncio.Event()
    count = bcs.on_progress

    def hook(n: int) -> None:
        count(n)
        if job.progress_current >= offset:
            reached.set()

    bcs.on_progress = hook
    if job.progress_current < offset:
        await reached.wait()
    bcs.on_progress = count


async def read_all(edge: BdrvChild, length: int) -> bytes:
    """Read through `edge` in pieces, yielding between them: reads of a tmpfs image complete
    inline, and one 4 MiB read could hold the loop past the slow-callback limit."""
    out = bytearray()
    for pos in range(0, length, 256 * 1024):
        out += await io.pread(edge, pos, min(256 * 1024, length - pos))
        await asyncio.sleep(0)  # a yield, not a synchronisation
    return bytes(out)


async def read_file(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


async def job_info(daemon: Daemon) -> dict[str, Any]:
    infos = await daemon.run_command("query-block-jobs", None)
    assert len(infos) == 1
    return dict(infos[0])


async def close_all(daemon: Daemon, *edges: BdrvChild) -> None:
    for edge in edges:
        daemon.graph.detach(edge)
    for name in ("src", "tgt"):
        if daemon.graph.find(name) is not None:
            await daemon.run_command("blockdev-del", {"node-name": name})


async def test_full_backup_keeps_point_in_time(daemon: Daemon, images: Path) -> None:
    rec = Recorder(daemon)
    client = attach_client(daemon, "src")
    await daemon.run_command(
        "blockdev-backup",
        {"job-id": "b0", "device": "src", "target": "tgt", "sync": "full", "speed": 1,
         "auto-dismiss": False, "filter-node-name": "cbw"},
    )  # fmt: skip
    assert rec.take() == ["created", "running", "paused", "running"]
    cbw = daemon.graph.lookup("cbw")
    assert cbw.driver.name == "copy-before-write" and client.node is cbw
    await progress_reaches(daemon, "b0", MiB)
    assert (await job_info(daemon))["offset"] == MiB  # the first chunk, then the rate limit
    # Overwrite data the job has not copied yet, twice, and some it has.
    await io.pwrite(client, 2 * MiB + 4096, b"\x55" * 8192)
    await io.pwrite(client, 2 * MiB, b"\x66" * 4096)
    await io.pwrite_zeroes(client, 3 * MiB - 4096, 8192)
    await io.pwrite(client, 0, b"\x77" * 512)
    # 2 MiB..+64k and 3 MiB-64k..3 MiB+64k were copied before the writes: 3 clusters.
    assert (await job_info(daemon))["offset"] == MiB + 3 * 65536
    await daemon.run_command("block-job-set-speed", {"device": "b0", "speed": 0})
    await wait_gone(daemon, "b0")
    assert rec.take() == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded"]
    completed = next(data for name, data in rec.data if name == "BLOCK_JOB_COMPLETED")
    assert completed == {"type": "backup", "device": "b0", "len": 4 * MiB,
                         "offset": 4 * MiB, "speed": 0}  # fmt: skip
    # The filter is gone and the client is back on the source.
    assert daemon.graph.find("cbw") is None and client.node is daemon.graph.lookup("src")
    assert (await daemon.run_command("query-jobs", None))[0]["status"] == "concluded"
    await daemon.run_command("job-dismiss", {"id": "b0"})
    await close_all(daemon, client)
    await arun("qemu-img", "check", str(images / "tgt.qcow2"))
    await arun("qemu-img", "compare", "-F", "raw", str(images / "tgt.qcow2"),
               str(images / "expect.raw"))  # fmt: skip
    # The source holds what the client wrote.
    expect = images / "expect.raw"
    await arun("qemu-io", "-f", "raw", "-c", f"write -P 0x55 {2 * MiB + 4096} 8k",
               "-c", f"write -P 0x66 {2 * MiB} 4k", "-c", f"write -z {3 * MiB - 4096} 8k",
               "-c", "write -P 0x77 0 512", str(expect))  # fmt: skip
    await arun("qemu-img", "compare", "-F", "raw", str(images / "src.qcow2"), str(expect))


async def test_cancel_pause_resume_restore_graph(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    client = attach_client(daemon, "src")
    await daemon.run_command(
        "blockdev-backup", {"job-id": "b0", "device": "src", "target": "tgt", "sync": "full",
                            "speed": 1}
    )  # fmt: skip
    rec.take()
    await daemon.run_command("job-pause", {"id": "b0"})
    assert rec.take() == ["paused"]
    info = await job_info(daemon)
    assert info["paused"] is True and info["status"] == "paused"
    with pytest.raises(QmpError, match="Job is already paused"):
        await daemon.run_command("job-pause", {"id": "b0"})
    with pytest.raises(QmpError, match="cannot accept command verb 'complete'"):
        await daemon.run_command("job-complete", {"id": "b0"})
    await daemon.run_command("job-resume", {"id": "b0"})
    assert rec.take() == ["running"]
    names = {n.name for n in daemon.graph}
    cbw = client.node
    assert cbw.name in names and cbw.driver.name == "copy-before-write"
    await daemon.run_command("block-job-cancel", {"device": "b0"})
    await wait_gone(daemon, "b0")
    assert rec.take() == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert {n.name for n in daemon.graph} == names - {cbw.name}
    assert client.node.name == "src"
    assert not any(n.driver.name == "copy-before-write" for n in daemon.graph)
    src = daemon.graph.lookup("src")
    assert [e.parent for e in src.parents] == [client.parent]
    await close_all(daemon, client)


async def test_sync_top_copies_only_the_top(daemon: Daemon, images: Path) -> None:
    await daemon.run_command("blockdev-add", qcow2("top", images / "top.qcow2"))
    await daemon.run_command("blockdev-del", {"node-name": "tgt"})
    # The target shares the source's backing file: what the top does not hold comes from it.
    await arun("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
               str(images / "tgt.qcow2"))  # fmt: skip
    await daemon.run_command("blockdev-add", qcow2("tgt", images / "tgt.qcow2"))
    rec = Recorder(daemon)
    await daemon.run_command(
        "blockdev-backup", {"job-id": "b0", "device": "src", "target": "tgt", "sync": "top"}
    )
    await wait_gone(daemon, "b0")
    completed = next(data for name, data in rec.data if name == "BLOCK_JOB_COMPLETED")
    # 1 MiB + 512 KiB of data and a 64 KiB zero cluster: what src.qcow2 allocates.
    assert completed["len"] == completed["offset"] == MiB + 512 * 1024 + 65536
    await close_all(daemon)
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await arun("qemu-img", "compare", str(images / "tgt.qcow2"), str(images / "src.qcow2"))
    # The target allocates exactly what the source's top image allocates.
    maps = [
        [(e["start"], e["length"], e["depth"], e["zero"]) for e in json.loads(out)]
        for out in [
            await arun("qemu-img", "map", "--output=json", str(images / name))
            for name in ("tgt.qcow2", "src.qcow2")
        ]
    ]
    assert maps[0] == maps[1]


async def test_sync_none_fleecing(daemon: Daemon, images: Path) -> None:
    """A temporary overlay of the source as target: it reads as the point-in-time view."""
    await daemon.run_command("blockdev-del", {"node-name": "tgt"})
    await arun("qemu-img", "create", "-f", "qcow2", str(images / "tmp.qcow2"), "4M")
    await daemon.run_command("blockdev-add", qcow2("tmp", images / "tmp.qcow2", backing="src"))
    client = attach_client(daemon, "src")
    rec = Recorder(daemon)
    await daemon.run_command(
        "blockdev-backup", {"job-id": "b0", "device": "src", "target": "tmp", "sync": "none"}
    )
    assert rec.take() == ["created", "running", "paused", "running"]
    tmp = daemon.graph.lookup("tmp")
    # The overlay's backing link stayed on the source (moving it would make a loop).
    assert tmp.child("backing") is not None
    assert tmp.child("backing").node is daemon.graph.lookup("src")  # type: ignore[union-attr]
    assert (await job_info(daemon))["offset"] == 0
    await io.pwrite(client, MiB - 100, b"\x99" * 200)
    assert (await job_info(daemon))["offset"] == 2 * 65536
    reader = daemon.graph.attach(Client(), tmp, "reader", ChildRole(0), Perm(0), PERM_ALL)
    view = await read_all(reader, 4 * MiB)
    assert view == await read_file(images / "expect.raw")
    await daemon.run_command("job-cancel", {"id": "b0"})
    await wait_gone(daemon, "b0")
    assert rec.take() == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    daemon.graph.detach(reader)
    daemon.graph.detach(client)
    await daemon.run_command("blockdev-del", {"node-name": "tmp"})


async def test_target_error_stop_then_resume(daemon: Daemon, images: Path) -> None:
    await arun("qemu-img", "create", "-f", "raw", str(images / "t.raw"), "4M")
    await daemon.run_command(
        "blockdev-add",
        {"driver": "raw", "node-name": "rt",
         "file": {"driver": "blkdebug", "inject-error": [
             {"event": "write_aio", "sector": 6144 + 256, "once": True}],
             "image": {"driver": "file", "filename": str(images / "t.raw")}}},
    )  # fmt: skip
    rec = Recorder(daemon)
    await daemon.run_command(
        "blockdev-backup",
        {"job-id": "b0", "device": "src", "target": "rt", "sync": "full",
         "on-target-error": "stop"},
    )  # fmt: skip
    assert rec.take() == ["created", "running", "paused", "running"]
    await rec.wait_for("paused")
    info = await job_info(daemon)
    # The zero cluster at 3 MiB was written, then the data after it failed.
    assert info["io-status"] == "failed" and info["offset"] == 3 * MiB + 65536
    assert ("BLOCK_JOB_ERROR", {"device": "b0", "operation": "write", "action": "stop"}) in (
        rec.data
    )
    await daemon.run_command("job-resume", {"id": "b0"})
    await wait_gone(daemon, "b0")
    assert rec.take()[-6:] == [
        "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"
    ]  # fmt: skip
    await daemon.run_command("blockdev-del", {"node-name": "rt"})
    await arun("qemu-img", "compare", "-f", "raw", "-F", "raw", str(images / "t.raw"),
               str(images / "expect.raw"))  # fmt: skip


async def test_source_error_report_fails_job(daemon: Daemon, images: Path) -> None:
    await daemon.run_command(
        "blockdev-add",
        {"driver": "raw", "node-name": "rs",
         "file": {"driver": "blkdebug", "inject-error": [{"event": "read_aio", "sector": 2048}],
                  "image": {"driver": "file", "filename": str(images / "expect.raw")}}},
    )  # fmt: skip
    await arun("qemu-img", "create", "-f", "raw", str(images / "t.raw"), "4M")
    await daemon.run_command(
        "blockdev-add",
        {"driver": "raw", "node-name": "rt",
         "file": {"driver": "file", "filename": str(images / "t.raw")}},
    )  # fmt: skip
    rec = Recorder(daemon)
    await daemon.run_command(
        "blockdev-backup", {"job-id": "b0", "device": "rs", "target": "rt", "sync": "full"}
    )
    await wait_gone(daemon, "b0")
    assert rec.take()[-5:] == ["BLOCK_JOB_ERROR", "aborting", "BLOCK_JOB_COMPLETED",
                               "concluded", "null"]  # fmt: skip
    completed = next(data for name, data in rec.data if name == "BLOCK_JOB_COMPLETED")
    # Chunks 0, 2 and 3 copy beside the failing chunk 1 (qsd: the same 3 MiB).
    assert completed["error"] == "Input/output error" and completed["offset"] == 3 * MiB
    assert ("BLOCK_JOB_ERROR", {"device": "b0", "operation": "read", "action": "report"}) in (
        rec.data
    )
    assert not any(n.driver.name == "copy-before-write" for n in daemon.graph)


async def test_failed_copy_breaks_the_guest_write(daemon: Daemon, images: Path) -> None:
    """on-cbw-error=break-guest-write (the default): a client write whose copy fails fails,
    and the job copies the old data later."""
    await arun("qemu-img", "create", "-f", "raw", str(images / "t.raw"), "4M")
    await daemon.run_command(
        "blockdev-add",
        {"driver": "raw", "node-name": "rt",
         "file": {"driver": "blkdebug", "inject-error": [
             {"event": "write_aio", "sector": 4096, "once": True}],
             "image": {"driver": "file", "filename": str(images / "t.raw")}}},
    )  # fmt: skip
    client = attach_client(daemon, "src")
    await daemon.run_command(
        "blockdev-backup",
        {"job-id": "b0", "device": "src", "target": "rt", "sync": "full", "speed": 1},
    )  # fmt: skip
    await progress_reaches(daemon, "b0", MiB)
    with pytest.raises(OSError) as failure:
        await io.pwrite(client, 2 * MiB, b"\xee" * 4096)
    assert failure.value.errno == errno.EIO
    await daemon.run_command("block-job-set-speed", {"device": "b0", "speed": 0})
    await wait_gone(daemon, "b0")
    daemon.graph.detach(client)
    await daemon.run_command("blockdev-del", {"node-name": "rt"})
    await arun("qemu-img", "compare", "-f", "raw", "-F", "raw", str(images / "t.raw"),
               str(images / "expect.raw"))  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"device": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
        ({"target": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
        ({"target": "src"}, "Source and target cannot be the same"),
        ({"sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
        ({"bitmap": "bm"}, "Bitmap 'bm' could not be found"),
        ({"bitmap-mode": "never"}, "Cannot specify bitmap sync mode without a bitmap"),
        ({"job-id": "0b"}, "Invalid job ID '0b'"),
        ({"filter-node-name": "src"}, "Could not create node: Duplicate nodes with node-name='src'"),
        ({"x-perf": {"max-chunk": 4096}},
         "Required max-chunk (4096) is less than backup cluster size (65536)"),
    ],
)  # fmt: skip
async def test_errors(daemon: Daemon, args: dict[str, Any], message: str) -> None:
    rec = Recorder(daemon)
    full = {"job-id": "b0", "device": "src", "target": "tgt", "sync": "full", **args}
    with pytest.raises(QmpError) as failure:
        await daemon.run_command("blockdev-backup", full)
    assert failure.value.desc == message
    assert rec.take() == []  # refused before the job existed
    assert [n.name for n in daemon.graph if not n.name.startswith("#")] == ["src", "tgt"]


@pytest.mark.parametrize("with_client", [False, True])
async def test_refused_filter_leaves_the_graph_as_it_was(
    daemon: Daemon, scratch: Path, with_client: bool
) -> None:
    """The target is the source's own file opened writable again, so the filter cannot stop
    others writing below it (qsd: a lock conflict). Whether that shows when the users move
    onto the filter or when the job takes it, the graph ends as it began."""
    image = scratch / "same.raw"
    image.write_bytes(b"\0" * 4 * MiB)
    file_ro = {"driver": "file", "node-name": "fa", "filename": str(image), "read-only": True}
    await daemon.run_command("blockdev-add", file_ro)
    await daemon.run_command("blockdev-add", {"driver": "raw", "node-name": "ra", "file": "fa"})
    file_rw = {"driver": "file", "node-name": "fb", "filename": str(image)}
    await daemon.run_command("blockdev-add", file_rw)
    graph = daemon.graph
    ra = graph.lookup("ra")
    client = None
    if with_client:
        client = graph.attach(Client(), ra, "root", ChildRole(0), Perm.CONSISTENT_READ, PERM_ALL)
    names = [n.name for n in graph]
    perms = {(e.parent_node and e.parent_node.name, e.name): (e.perm, e.shared)
             for n in graph for e in n.parents}  # fmt: skip
    with pytest.raises(QmpError) as failure:
        await daemon.run_command(
            "blockdev-backup", {"job-id": "b0", "device": "ra", "target": "fb", "sync": "full"}
        )
    prefix = "Could not replace node: " if with_client else ""
    assert failure.value.desc == prefix + 'Failed to get shared "write" lock'
    assert [n.name for n in graph] == names
    assert {(e.parent_node and e.parent_node.name, e.name): (e.perm, e.shared)
            for n in graph for e in n.parents} == perms  # fmt: skip
    assert [e.parent for e in ra.parents] == ([client.parent] if client else [])
    if client is not None:
        assert client.node is ra
        graph.detach(client)
    for name in ("ra", "fa", "fb"):
        await daemon.run_command("blockdev-del", {"node-name": name})


async def test_size_mismatch_and_duplicate_id(daemon: Daemon, images: Path) -> None:
    await arun("qemu-img", "create", "-f", "qcow2", str(images / "big.qcow2"), "8M")
    await daemon.run_command("blockdev-add", qcow2("big", images / "big.qcow2"))
    with pytest.raises(QmpError, match=r"^Source and target image have different sizes$"):
        await daemon.run_command(
            "blockdev-backup", {"job-id": "b0", "device": "src", "target": "big", "sync": "full"}
        )
    await daemon.run_command(
        "blockdev-backup",
        {"job-id": "b0", "device": "src", "target": "tgt", "sync": "full", "speed": 1},
    )  # fmt: skip
    await daemon.run_command("blockdev-add", qcow2("t2", images / "top.qcow2"))
    await arun("qemu-img", "create", "-f", "qcow2", str(images / "t3.qcow2"), "4M")
    await daemon.run_command("blockdev-add", qcow2("t3", images / "t3.qcow2"))
    with pytest.raises(QmpError, match=r"^Job ID 'b0' already in use$"):
        await daemon.run_command(
            "blockdev-backup", {"job-id": "b0", "device": "t2", "target": "t3", "sync": "none"}
        )
    with pytest.raises(QmpError, match=r"^Node 'tgt' is busy: block device is in use by block"):
        await daemon.run_command(
            "blockdev-backup", {"job-id": "b1", "device": "t2", "target": "tgt", "sync": "full"}
        )
    await daemon.run_command("job-cancel", {"id": "b0"})
    await wait_gone(daemon, "b0")


async def test_compress_needs_target_support(daemon: Daemon, images: Path) -> None:
    await daemon.run_command(
        "blockdev-add", {"driver": "null-co", "node-name": "nul", "size": 4 * MiB}
    )
    with pytest.raises(QmpError) as failure:
        await daemon.run_command(
            "blockdev-backup",
            {"job-id": "b0", "device": "src", "target": "nul", "sync": "full", "compress": True},
        )  # fmt: skip
    assert failure.value.desc == "Compression is not supported for this drive "
    tgt = daemon.graph.lookup("tgt")
    if getattr(tgt.driver, "pwritev_compressed", None) is None:
        pytest.skip("qcow2 compressed writes are not there yet")
    await daemon.run_command(
        "blockdev-backup",
        {"job-id": "b0", "device": "src", "target": "tgt", "sync": "full", "compress": True},
    )  # fmt: skip
    await wait_gone(daemon, "b0")
    await close_all(daemon)
    await daemon.run_command("blockdev-del", {"node-name": "nul"})
    await arun("qemu-img", "check", str(images / "tgt.qcow2"))
    await arun("qemu-img", "compare", "-F", "raw", str(images / "tgt.qcow2"),
               str(images / "expect.raw"))  # fmt: skip


async def test_fleecing_view_and_break_snapshot(daemon: Daemon, images: Path) -> None:
    """A hand-made copy-before-write node with snapshot-access on top: the view keeps the old
    data; with on-cbw-error=break-snapshot a failed copy lets the write through and the view
    then fails with EACCES."""
    await arun("qemu-img", "create", "-f", "raw", str(images / "t.raw"), "4M")
    await daemon.run_command(
        "blockdev-add",
        {"driver": "raw", "node-name": "rt",
         "file": {"driver": "blkdebug", "inject-error": [
             {"event": "write_aio", "sector": 4096, "once": True}],
             "image": {"driver": "file", "filename": str(images / "t.raw")}}},
    )  # fmt: skip
    await daemon.run_command(
        "blockdev-add",
        {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "rt",
         "on-cbw-error": "break-snapshot"},
    )  # fmt: skip
    await daemon.run_command(
        "blockdev-add", {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}
    )
    writer = attach_client(daemon, "cbw")
    reader = daemon.graph.attach(
        Client(), daemon.graph.lookup("acc"), "root", ChildRole(0), Perm(0), PERM_ALL
    )
    expect = await read_file(images / "expect.raw")
    await io.pwrite(writer, 100_000, b"\x42" * 5000)
    assert await read_all(reader, 4 * MiB) == expect
    # The snapshot's block status: the rewritten cluster is read from the target now.
    st = await io.block_status(reader, 65536, 65536)
    assert st.data and st.length == 65536
    # A write whose copy fails goes through; the point-in-time view is then gone.
    await io.pwrite(writer, 2 * MiB, b"\x43" * 4096)
    with pytest.raises(OSError) as failure:
        await io.pread(reader, 0, 4096)
    assert failure.value.errno == errno.EACCES
    source = daemon.graph.lookup("src").parents[0]
    assert bytes(await io.pread(source, 2 * MiB, 4096)) == b"\x43" * 4096
    daemon.graph.detach(reader)
    daemon.graph.detach(writer)
    for name in ("acc", "cbw", "rt"):
        await daemon.run_command("blockdev-del", {"node-name": name})


async def test_qcow2_on_a_snapshot_access_without_filter(daemon: Daemon) -> None:
    """Reads of a snapshot-access node with no copy-before-write below fail (ENOTSUP): qcow2
    reports qsd's header error, raw (which reads nothing to open) opens."""
    nul = {"driver": "null-co", "node-name": "nul", "size": MiB}
    await daemon.run_command("blockdev-add", nul)
    sa = {"driver": "snapshot-access", "node-name": "sa", "file": "nul"}
    await daemon.run_command("blockdev-add", sa)
    with pytest.raises(QmpError) as failure:
        await daemon.run_command(
            "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "sa"}
        )
    assert failure.value.desc == "Could not read qcow2 header: Operation not supported"
    assert daemon.graph.find("q") is None
    await daemon.run_command("blockdev-add", {"driver": "raw", "node-name": "r", "file": "sa"})
    for name in ("r", "sa", "nul"):
        await daemon.run_command("blockdev-del", {"node-name": name})


async def test_shutdown_with_a_running_backup(daemon: Daemon) -> None:
    """The daemon's shutdown cancels the job, which takes its filter out first."""
    client = attach_client(daemon, "src")
    await daemon.run_command(
        "blockdev-backup", {"job-id": "b0", "device": "src", "target": "tgt", "sync": "none"}
    )
    assert client.node.driver.name == "copy-before-write"
    await daemon.jobs.shutdown()
    assert len(daemon.jobs) == 0
    assert client.node is daemon.graph.lookup("src")
    assert not any(n.driver.name == "copy-before-write" for n in daemon.graph)
    daemon.graph.detach(client)


# --- chunks in flight and copies in the kernel ------------------------------------------


class CopySpy:
    """Wraps the real copy functions of the copy state: counts kernel copies and the most
    copies in flight at once; can hold the kernel copy of one offset until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold_at: int = -1) -> None:
        from storage_daemon.blockdev.drivers import copy_before_write as cbw

        self.kernel = 0
        self.active = 0
        self.most = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        real_range = getattr(cbw, "copy_range")  # noqa: B009 (imported there, not exported)
        real_claimed = cbw.BlockCopyState.copy_claimed

        async def copy_range(src: Any, src_off: int, dst: Any, dst_off: int, n: int) -> bool:
            if src_off == hold_at:
                self.entered.set()
                await self.release.wait()
            done: bool = await real_range(src, src_off, dst, dst_off, n)
            self.kernel += done
            return done

        async def copy_claimed(state: Any, first: int, end: int, waiter: Any) -> int:
            self.active += 1
            self.most = max(self.most, self.active)
            try:
                return await real_claimed(state, first, end, waiter)
            finally:
                self.active -= 1

        monkeypatch.setattr(cbw, "copy_range", copy_range)
        monkeypatch.setattr(cbw.BlockCopyState, "copy_claimed", copy_claimed)


async def raw_pair(daemon: Daemon, images: Path, source: str = "expect.raw") -> None:
    await arun("qemu-img", "create", "-f", "raw", str(images / "t.raw"), "4M")
    for name, path in (("rs", images / source), ("rt", images / "t.raw")):
        await daemon.run_command(
            "blockdev-add",
            {"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": str(path)}},
        )


@pytest.mark.parametrize(
    ("perf", "kernel", "parallel"),
    [({}, True, True), ({"use-copy-range": False}, False, True), ({"max-workers": 1}, True, False)],
)
async def test_raw_files_are_copied_in_the_kernel_chunks_in_flight(
    daemon: Daemon,
    images: Path,
    monkeypatch: pytest.MonkeyPatch,
    perf: dict[str, Any],
    kernel: bool,
    parallel: bool,
) -> None:
    await raw_pair(daemon, images)
    spy = CopySpy(monkeypatch)
    args: dict[str, Any] = {"job-id": "b0", "device": "rs", "target": "rt", "sync": "full"}
    if perf:
        args["x-perf"] = perf
    await daemon.run_command("blockdev-backup", args)
    await wait_gone(daemon, "b0")
    assert (spy.kernel == 4) if kernel else (spy.kernel == 0)  # four 1 MiB chunks
    assert (spy.most > 1) if parallel else (spy.most == 1)
    await arun("qemu-img", "compare", "-f", "raw", "-F", "raw", str(images / "t.raw"),
               str(images / "expect.raw"))  # fmt: skip


async def test_a_write_to_a_chunk_in_flight_waits_for_its_copy(
    daemon: Daemon, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client writes into a chunk the job is copying (held in the kernel copy) and into
    one already copied: the first write waits for the copy, so the target keeps the point
    in time; the second goes straight through."""
    await arun("cp", str(images / "expect.raw"), str(images / "s.raw"))
    await raw_pair(daemon, images, "s.raw")
    client = attach_client(daemon, "rs")
    spy = CopySpy(monkeypatch, hold_at=MiB)
    await daemon.run_command(
        "blockdev-backup", {"job-id": "b0", "device": "rs", "target": "rt", "sync": "full"}
    )
    await spy.entered.wait()
    job = daemon.jobs.find("b0")
    assert job is not None
    await progress_reaches(daemon, "b0", 3 * MiB)  # the three other chunks are copied
    write_held = asyncio.get_running_loop().create_task(
        io.pwrite(client, MiB + 4096, b"\x99" * 512)
    )
    await io.pwrite(client, 2 * MiB, b"\x98" * 512)  # copied already: not held
    for _ in range(10):
        await asyncio.sleep(0)
    assert not write_held.done()
    spy.release.set()
    await write_held
    await wait_gone(daemon, "b0")
    daemon.graph.detach(client)
    await arun("qemu-img", "compare", "-f", "raw", "-F", "raw", str(images / "t.raw"),
               str(images / "expect.raw"))  # fmt: skip
    data = (images / "s.raw").read_bytes()
    assert data[MiB + 4096 : MiB + 4608] == b"\x99" * 512
    assert data[2 * MiB : 2 * MiB + 512] == b"\x98" * 512


async def test_a_copy_failing_with_a_bug_ends_the_job(
    daemon: Daemon, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that raises something other than an I/O error (a bug) fails the job with it,
    once: it is neither swallowed nor retried forever."""
    from storage_daemon.blockdev.drivers.copy_before_write import BlockCopyState

    real = BlockCopyState._copy_run
    calls = 0

    async def broken(self: BlockCopyState, *args: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected bug")
        return await real(self, *args)

    monkeypatch.setattr(BlockCopyState, "_copy_run", broken)
    rec = Recorder(daemon)
    await daemon.run_command(
        "blockdev-backup", {"job-id": "b0", "device": "src", "target": "tgt", "sync": "full"}
    )
    async with asyncio.timeout(30):  # a bound: without the fix the job never ends
        await wait_gone(daemon, "b0")
    completed = next(data for name, data in rec.data if name == "BLOCK_JOB_COMPLETED")
    assert completed["error"] == "internal error: injected bug"
    assert not any(n.driver.name == "copy-before-write" for n in daemon.graph)
