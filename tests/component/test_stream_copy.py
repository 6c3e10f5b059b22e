"""block-stream's copy: several chunks in flight, copy-up writes that never overwrite what a
client wrote meanwhile, the on-error policies with chunks in flight, pauses with no I/O left
in flight; and the qcow2 writer's copy-up mode on its own (standard and extended L2).

Component ring. Images are made with qemu-img and checked with `qemu-img check`/`compare`
against a model of the data; interleavings are forced by holding a read on an event, never
with sleeps.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import copy_range, io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers import preload
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.monitor.dispatch import load_handlers
from storage_daemon.qapi.runtime import command_args

load_handlers()
preload()  # no driver import on the event loop
command_args("block-stream", {"job-id": "w", "device": "w"})

MIB = 1 << 20
CS = 64 * 1024
RW = Perm.CONSISTENT_READ | Perm.WRITE


class User:
    def parent_description(self, child: BdrvChild) -> str:
        return "a test user"


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def arun(*argv: str) -> str:
    return await asyncio.to_thread(run, *argv)


def random_base(path: Path, size: int, holes: list[tuple[int, int]], seed: int = 1) -> bytearray:
    """A raw file of random data with zeroed (sparse) ranges; returns its content."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for start, length in holes:
        data[start : start + length] = bytes(length)
    with path.open("wb") as f:
        pos = 0
        for start, length in [*sorted(holes), (size, 0)]:
            f.write(data[pos:start])
            f.seek(start + length)
            pos = start + length
        f.truncate(size)
    return data


async def add(daemon: Daemon, spec: dict[str, Any]) -> BlockNode:
    await daemon.run_command("blockdev-add", spec)
    return daemon.graph.lookup(spec["node-name"])


def status_of(job: Any) -> str:
    return str(job.status.value)


async def wait_done(daemon: Daemon, job_id: str) -> None:
    job = daemon.jobs.find(job_id)
    if job is not None:
        await job.wait_done()


async def check_image(path: Path, model: bytes | bytearray) -> None:
    out = await arun("qemu-img", "check", str(path))
    assert "No errors" in out, out
    raw = path.with_suffix(".model")
    await asyncio.to_thread(raw.write_bytes, bytes(model))
    await arun("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw))


class Events:
    def __init__(self, daemon: Daemon) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        daemon.events.subscribe(self)

    def __call__(self, name: str, data: dict[str, Any] | None, ts: int) -> None:
        self.seen.append((name, dict(data or {})))

    def names(self) -> list[str]:
        return [
            str(d["status"]) if n == "JOB_STATUS_CHANGE" else n
            for n, d in self.seen
            if n in ("JOB_STATUS_CHANGE", "BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED")
        ]


def make_three_layers(d: Path) -> bytearray:
    size = 12 * MIB
    model = random_base(d / "base.raw", size, [(MIB, 3 * MIB), (9 * MIB, 64 * 1024)])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
        str(d / "mid.qcow2"), str(size))  # fmt: skip
    run("qemu-io", "-c", "write -P 7 2M 3M", "-c", "write -z 6M 1M", str(d / "mid.qcow2"))
    model[2 * MIB : 5 * MIB] = b"\x07" * (3 * MIB)
    model[6 * MIB : 7 * MIB] = bytes(MIB)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
        str(d / "top.qcow2"))  # fmt: skip
    run("qemu-io", "-c", "write -P 9 4M 96k", "-c", "write -P 10 11M 1M", str(d / "top.qcow2"))
    model[4 * MIB : 4 * MIB + 96 * 1024] = b"\x09" * (96 * 1024)
    model[11 * MIB : 12 * MIB] = b"\x0a" * MIB
    return model


@pytest.fixture
def three_layers(scratch: Path) -> bytearray:
    return make_three_layers(scratch)  # outside the event loop


def make_raw_chain(d: Path, size: int) -> bytearray:
    model = random_base(d / "base.raw", size, [])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
        str(d / "top.qcow2"), str(size))  # fmt: skip
    return model


@pytest.fixture
def raw_chain(scratch: Path) -> bytearray:
    """An 8 MiB raw base of random data under an empty qcow2 top."""
    return make_raw_chain(scratch, 8 * MIB)


@pytest.fixture
def long_chain(scratch: Path) -> bytearray:
    """The same, 16 MiB: twice as many chunks as a job keeps in flight."""
    return make_raw_chain(scratch, 16 * MIB)


async def test_three_layer_chain_is_streamed_in_parallel_chunks(
    daemon: Daemon, scratch: Path, three_layers: bytearray
) -> None:
    """A 12 MiB chain (raw base with holes, a qcow2 middle and top with their own data)
    spans several big chunks; the result equals the chain's content, with no backing file."""
    size = 12 * MIB
    model = three_layers
    await add(
        daemon,
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": str(scratch / "top.qcow2")}},
    )  # fmt: skip
    events = Events(daemon)
    await daemon.run_command("block-stream", {"job-id": "s0", "device": "top"})
    await wait_done(daemon, "s0")
    assert events.names() == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"
    ]  # fmt: skip
    completed = next(d for n, d in events.seen if n == "BLOCK_JOB_COMPLETED")
    assert completed["offset"] == completed["len"] == size and "error" not in completed
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await check_image(scratch / "top.qcow2", model)
    info = await arun("qemu-img", "info", str(scratch / "top.qcow2"))
    assert "backing file" not in info


async def test_a_client_write_during_a_copy_is_kept(
    daemon: Daemon, scratch: Path, raw_chain: bytearray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client writes into a cluster whose old data the job has read but not written yet:
    the job's copy-up leaves that cluster alone (qsd serialises the two requests)."""
    model = raw_chain
    top = await add(
        daemon,
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": str(scratch / "top.qcow2")}},
    )  # fmt: skip
    client = daemon.graph.attach(User(), top, "root", ChildRole.PRIMARY, RW, PERM_ALL)
    base = top.child("backing")
    assert base is not None
    entered, release = asyncio.Event(), asyncio.Event()
    real_pread = io.pread

    async def held_pread(edge: BdrvChild, offset: int, length: int) -> Any:
        data = await real_pread(edge, offset, length)
        if edge is base and offset == 0 and not entered.is_set():
            entered.set()  # the job has the old data of the first chunk
            await release.wait()
        return data

    monkeypatch.setattr(io, "pread", held_pread)
    await daemon.run_command("block-stream", {"job-id": "s0", "device": "top"})
    await entered.wait()
    assert client.node.driver.name == "copy-on-read"  # the client is on the filter now
    guest = b"\x5a" * 4096
    await io.pwrite(client, CS + 512, guest)  # a partial write: copy-on-write of cluster 1
    await io.pwrite(client, 3 * CS, b"\xa5" * CS)  # a whole cluster
    release.set()
    await wait_done(daemon, "s0")
    model[CS + 512 : CS + 512 + 4096] = guest
    model[3 * CS : 4 * CS] = b"\xa5" * CS
    daemon.graph.detach(client)
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await check_image(scratch / "top.qcow2", model)


async def test_on_error_stop_pauses_and_resume_copies_the_chunk_again(
    daemon: Daemon, scratch: Path, raw_chain: bytearray
) -> None:
    model = raw_chain
    await add(
        daemon,
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": str(scratch / "top.qcow2")},
         "backing": {"driver": "raw", "node-name": "base",
                     "file": {"driver": "blkdebug", "node-name": "dbg",
                              "inject-error": [{"event": "read_aio", "sector": 5 * MIB // 512,
                                                "once": True, "iotype": "read"}],
                              "image": {"driver": "file",
                                        "filename": str(scratch / "base.raw")}}}},
    )  # fmt: skip
    events = Events(daemon)
    await daemon.run_command("block-stream", {"job-id": "s0", "device": "top", "on-error": "stop"})
    job = daemon.jobs.find("s0")
    assert job is not None
    while job.status.value != "paused":
        await job._first_yield.wait()
        job._first_yield.clear()
    errors = [d for n, d in events.seen if n == "BLOCK_JOB_ERROR"]
    assert errors == [{"device": "s0", "operation": "read", "action": "stop"}]
    copier = job.copier  # type: ignore[attr-defined]
    assert copier is not None and not copier.busy  # paused: nothing in flight
    info = (await daemon.run_command("query-block-jobs", None))[0]
    assert info["io-status"] == "failed" and info["paused"]
    await daemon.run_command("block-job-resume", {"device": "s0"})
    await wait_done(daemon, "s0")
    assert events.names()[-5:] == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await check_image(scratch / "top.qcow2", model)


@pytest.mark.parametrize("policy", ["report", "ignore"])
async def test_on_error_report_and_ignore(
    daemon: Daemon, scratch: Path, raw_chain: bytearray, policy: str
) -> None:
    size = 8 * MIB
    model = raw_chain
    await add(
        daemon,
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": str(scratch / "top.qcow2")},
         "backing": {"driver": "raw", "node-name": "base",
                     "file": {"driver": "blkdebug", "node-name": "dbg",
                              "inject-error": [{"event": "read_aio", "sector": 3 * MIB // 512,
                                                "iotype": "read"}],
                              "image": {"driver": "file",
                                        "filename": str(scratch / "base.raw")}}}},
    )  # fmt: skip
    events = Events(daemon)
    await daemon.run_command("block-stream", {"job-id": "s0", "device": "top", "on-error": policy})
    await wait_done(daemon, "s0")
    errors = [d["action"] for n, d in events.seen if n == "BLOCK_JOB_ERROR"]
    completed = next(d for n, d in events.seen if n == "BLOCK_JOB_COMPLETED")
    top = daemon.graph.lookup("top")
    if policy == "report":
        assert errors == ["report"]
        assert completed["error"] == "Input/output error"
        assert completed["offset"] < size
        backing = top.child("backing")
        assert backing is not None and backing.node.name == "base"  # chain unchanged
    else:
        assert errors == ["ignore"]
        assert "error" not in completed and completed["offset"] == size
        assert top.child("backing") is None
        # The failed chunk (2 MiB from 2 MiB) was never copied: it reads as zeroes now.
        model[2 * MIB : 4 * MIB] = bytes(2 * MIB)
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    if policy == "ignore":
        await check_image(scratch / "top.qcow2", model)


async def test_a_drain_waits_for_the_copies_in_flight(
    daemon: Daemon, scratch: Path, long_chain: bytearray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drained section begins only once no copy of the job is in flight: the job parks
    (and reports `paused`) after its held copy has ended, not while it waits."""
    top = await add(
        daemon,
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": str(scratch / "top.qcow2")}},
    )  # fmt: skip
    base = top.child("backing")
    entered, release = asyncio.Event(), asyncio.Event()
    real_pread = io.pread

    async def held_pread(edge: BdrvChild, offset: int, length: int) -> Any:
        if edge is base and offset == 2 * MIB and not entered.is_set():
            entered.set()
            await release.wait()
        return await real_pread(edge, offset, length)

    monkeypatch.setattr(io, "pread", held_pread)
    await daemon.run_command("block-stream", {"job-id": "s0", "device": "top"})
    job = daemon.jobs.find("s0")
    assert job is not None
    await entered.wait()
    copier = job.copier  # type: ignore[attr-defined]
    assert copier is not None and copier.busy
    drain = asyncio.get_running_loop().create_task(job.drain_pause())
    for _ in range(20):  # the other copies end; the held one keeps the job from parking
        await asyncio.sleep(0)
    assert not drain.done() and status_of(job) == "running"
    release.set()
    await drain
    assert not copier.busy and status_of(job) == "paused"
    await job.drain_resume()
    await wait_done(daemon, "s0")
    assert status_of(job) == "null" and not job.failed
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await check_image(scratch / "top.qcow2", long_chain)


@pytest.mark.parametrize("throttled", [False, True])
async def test_copies_in_flight_one_at_a_time_under_a_throttle_filter(
    daemon: Daemon,
    scratch: Path,
    long_chain: bytearray,
    monkeypatch: pytest.MonkeyPatch,
    throttled: bool,
) -> None:
    """With a throttle filter between the device and the top, the job copies one chunk at a
    time, as qsd's stream always does (more would only queue in the filter); without one,
    several chunks are in flight."""
    top = await add(
        daemon,
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": str(scratch / "top.qcow2")}},
    )  # fmt: skip
    device = "top"
    if throttled:
        await daemon.run_command("object-add", {"qom-type": "throttle-group", "id": "tg0"})
        await add(daemon, {"driver": "throttle", "node-name": "th", "file": "top",
                           "throttle-group": "tg0"})  # fmt: skip
        device = "th"
    base = top.child("backing")
    reading = most = 0
    real_pread = io.pread

    async def counted_pread(edge: BdrvChild, offset: int, length: int) -> Any:
        nonlocal reading, most
        if edge is not base:
            return await real_pread(edge, offset, length)
        reading += 1
        most = max(most, reading)
        try:
            for _ in range(3):  # let whatever else the job would start, start
                await asyncio.sleep(0)
            return await real_pread(edge, offset, length)
        finally:
            reading -= 1

    monkeypatch.setattr(io, "pread", counted_pread)
    await daemon.run_command("block-stream", {"job-id": "s0", "device": device})
    await wait_done(daemon, "s0")
    assert (most == 1) if throttled else (most > 1), most
    if throttled:
        await daemon.run_command("blockdev-del", {"node-name": "th"})
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await check_image(scratch / "top.qcow2", long_chain)


# --- the qcow2 writer's copy-up mode --------------------------------------------------


@pytest.mark.parametrize("extended", [False, True])
async def test_copy_up_writes_only_where_the_image_reads_from_backing(
    daemon: Daemon, scratch: Path, raw_chain: bytearray, extended: bool
) -> None:
    size = 2 * MIB
    model = raw_chain[:size]
    opts = f"extended_l2={'on' if extended else 'off'}"
    await arun("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts,
               "-b", "base.raw", "-F", "raw", str(scratch / "top.qcow2"), "2M")  # fmt: skip
    top = await add(
        daemon,
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": str(scratch / "top.qcow2")}},
    )  # fmt: skip
    edge = daemon.graph.attach(User(), top, "root", ChildRole.PRIMARY, RW, PERM_ALL)
    guest = [(CS + 4096, b"\x11" * 2048), (5 * CS, b"\x22" * CS), (9 * CS, b"\x33" * 512)]
    for offset, data in guest:
        await io.pwrite(edge, offset, data)
    await io.pwrite_zeroes(edge, 12 * CS, CS)  # a zero cluster the copy must keep too
    # Data that differs from the base everywhere, so any overwrite would show.
    stale = bytes(model[: 16 * CS]).translate(bytes(range(255, -1, -1)))
    await copy_range.copy_up_write(edge, 0, stale)
    await copy_range.copy_up_zeroes(edge, 16 * CS, 4 * CS)
    expect = bytearray(stale) + bytearray(model[16 * CS :])
    expect[16 * CS : 20 * CS] = bytes(4 * CS)
    for offset, data in guest:
        if extended:
            # Subclusters (2 KiB) the guest write allocated keep the old base data around it.
            sc = 2048
            lo, hi = offset // sc * sc, -(-(offset + len(data)) // sc) * sc
            expect[lo:hi] = model[lo:hi]
        else:
            expect[offset // CS * CS : (offset // CS + 1) * CS] = model[
                offset // CS * CS : (offset // CS + 1) * CS
            ]
        expect[offset : offset + len(data)] = data
    expect[12 * CS : 13 * CS] = bytes(CS)
    assert bytes(await io.pread(edge, 0, size)) == bytes(expect)
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await check_image(scratch / "top.qcow2", expect)


async def test_a_client_write_during_a_copy_on_read_is_kept(
    daemon: Daemon, scratch: Path, raw_chain: bytearray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy-on-read filter's own copy-up (a guest read) follows the same rule: a write
    that lands between the filter's read below the top and its copy-up write is kept."""
    model = raw_chain
    await add(
        daemon,
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": str(scratch / "top.qcow2")}},
    )  # fmt: skip
    cor = await add(daemon, {"driver": "copy-on-read", "node-name": "cor", "file": "top"})
    client = daemon.graph.attach(User(), cor, "root", ChildRole.PRIMARY, RW, PERM_ALL)
    entered, release = asyncio.Event(), asyncio.Event()
    real_pread = io.pread

    async def held_pread(edge: BdrvChild, offset: int, length: int) -> Any:
        data = await real_pread(edge, offset, length)
        if edge.parent is cor and not entered.is_set():
            entered.set()  # the filter has the old data, its copy-up is still to come
            await release.wait()
        return data

    monkeypatch.setattr(io, "pread", held_pread)
    reader = asyncio.create_task(io.pread(client, 0, 4 * CS))
    await entered.wait()
    guest = b"\x5a" * 4096
    await io.pwrite(client, CS + 512, guest)
    release.set()
    seen = bytes(await reader)
    assert seen == bytes(model[: 4 * CS])  # the read returns what it read
    model[CS + 512 : CS + 512 + 4096] = guest
    assert bytes(await real_pread(client, 0, 4 * CS)) == bytes(model[: 4 * CS])
    daemon.graph.detach(client)
    await daemon.run_command("blockdev-del", {"node-name": "cor"})
    await daemon.run_command("blockdev-del", {"node-name": "top"})
    await check_image(scratch / "top.qcow2", model)
