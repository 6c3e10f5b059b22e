"""qcow2 under concurrent requests: in-place writes outside the metadata lock, and the rule
that keeps a cluster written in place from being freed and reused meanwhile.

Component ring. Interleavings are forced with events held inside the file write, never with
sleeps; every image must pass `qemu-img check` and `qemu-img compare` with a model of the data.
"""

from __future__ import annotations

import asyncio
import errno
import random
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.qcow2 import writer as writer_module
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

CS = 64 * 1024
SIZE = 64 * CS


class User:
    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)


async def start(path: Path) -> tuple[Daemon, BdrvChild, Any]:
    done = await asyncio.to_thread(run, "qemu-img", "create", "-f", "qcow2", str(path), str(SIZE))
    assert done.returncode == 0, done.stderr
    daemon = Daemon()
    await daemon.run_command(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "q",
            "discard": "unmap",
            "file": {"driver": "file", "filename": str(path)},
        },
    )
    node = daemon.graph.lookup("q")
    perm = Perm.CONSISTENT_READ | Perm.WRITE
    edge = daemon.graph.attach(User(), node, "root", ChildRole.PRIMARY, perm, PERM_ALL)
    return daemon, edge, node.driver


async def finish(daemon: Daemon, edge: BdrvChild, path: Path, model: bytearray) -> None:
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": "q"})
    checked = await asyncio.to_thread(run, "qemu-img", "check", str(path))
    assert checked.returncode == 0 and "No errors" in checked.stdout, checked.stdout
    raw = path.with_suffix(".model")
    raw.write_bytes(model)
    compared = await asyncio.to_thread(
        run, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw)
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr


def hold_writes(monkeypatch: pytest.MonkeyPatch, at: int) -> tuple[asyncio.Event, asyncio.Event]:
    """The writer's first file write at host offset `at` waits for the second event, once
    the first is set (the write has not reached the file yet)."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def pwrite(child: BdrvChild, offset: int, data: Any, **kw: Any) -> None:
        if offset == at and not entered.is_set():
            entered.set()
            await release.wait()
        await io.pwrite(child, offset, data, **kw)

    monkeypatch.setattr(writer_module, "io", SimpleNamespace(pwrite=pwrite))
    return entered, release


async def host_of(driver: Any, guest: int) -> int:
    ext = await driver.mapper.extent(guest, 1)
    assert ext.host, "cluster not allocated"
    return int(ext.host)


async def test_in_place_writes_do_not_wait_for_each_other(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = scratch / "a.qcow2"
    daemon, edge, driver = await start(path)
    model = bytearray(SIZE)
    await io.pwrite(edge, 0, b"a" * 2 * CS)
    model[: 2 * CS] = b"a" * 2 * CS
    entered, release = hold_writes(monkeypatch, await host_of(driver, 0) + 512)
    held = asyncio.create_task(io.pwrite(edge, 512, b"b" * 512))
    await entered.wait()
    # Under a lock held across the data write this would wait for `held` forever.
    async with asyncio.timeout(10):
        await io.pwrite(edge, CS + 4096, b"c" * 4096)
        assert await io.pread(edge, CS + 4096, 4096) == b"c" * 4096
    release.set()
    await held
    model[512:1024] = b"b" * 512
    model[CS + 4096 : CS + 8192] = b"c" * 4096
    await finish(daemon, edge, path, model)


async def test_a_cluster_written_in_place_is_not_reused_until_the_write_ends(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guest cluster 0 is discarded (and the change flushed) while a write into its host
    cluster is in flight: the cluster's refcount must not fall yet, or the next allocation
    would take it and the late write would land in another guest cluster's data."""
    path = scratch / "b.qcow2"
    daemon, edge, driver = await start(path)
    await io.pwrite(edge, 0, b"a" * CS)
    host = await host_of(driver, 0)
    entered, release = hold_writes(monkeypatch, host + 4096)
    late = asyncio.create_task(io.pwrite(edge, 4096, b"x" * 4096))
    await entered.wait()
    await io.pdiscard(edge, 0, CS)
    await io.flush(edge)
    await io.pwrite(edge, 5 * CS, b"n" * CS)  # allocates: must not get `host`
    assert await host_of(driver, 5 * CS) != host
    release.set()
    await late  # lands in the discarded cluster, which nothing else uses
    model = bytearray(SIZE)
    model[5 * CS : 6 * CS] = b"n" * CS
    assert await io.pread(edge, 5 * CS, CS) == b"n" * CS
    await io.flush(edge)  # the deferred free is applied now
    await finish(daemon, edge, path, model)


@pytest.mark.parametrize("defer_min", [writer_module.DEFER_MIN_BYTES, 0])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_many_concurrent_writers_sharing_clusters(
    scratch: Path, monkeypatch: pytest.MonkeyPatch, seed: int, defer_min: int
) -> None:
    """Rounds of concurrent requests; within a round no two touch the same byte, but many
    share clusters (fresh allocations, in-place writes, copies of zero clusters), and whole
    clusters are discarded or zeroed beside them. `defer_min` 0: every allocation's data is
    written outside the metadata lock (by default only the large ones)."""
    monkeypatch.setattr(writer_module, "DEFER_MIN_BYTES", defer_min)
    rng = random.Random(seed)
    path = scratch / f"c{seed}.qcow2"
    daemon, edge, _ = await start(path)
    model = bytearray(SIZE)
    for round_number in range(12):
        taken = bytearray(SIZE // 512)  # sectors used by a request of this round
        requests = []
        for number in range(24):
            if number % 8 == 7:
                await asyncio.sleep(0)  # building the round must not hold the loop
            kind = rng.choice(["w", "w", "w", "big", "discard", "zero"])
            if kind in ("discard", "zero"):
                start_at = rng.randrange(SIZE // CS) * CS
                length = CS
            else:
                length = rng.choice([512, 4096, 3 * 512, 64 * 1024, 100 * 512])
                if kind == "big":
                    length = rng.choice([CS + 4096, 3 * CS])
                start_at = rng.randrange((SIZE - length) // 512) * 512
            first, last = start_at // 512, (start_at + length) // 512
            if any(taken[first:last]):
                continue
            taken[first:last] = b"\1" * (last - first)
            if kind == "discard":
                requests.append(io.pdiscard(edge, start_at, length))
                model[start_at : start_at + length] = bytes(length)
            elif kind == "zero":
                unmap = rng.random() < 0.5
                requests.append(io.pwrite_zeroes(edge, start_at, length, may_unmap=unmap))
                model[start_at : start_at + length] = bytes(length)
            else:
                # A pattern per request, with its offset: cheap to make (the loop must not
                # stall) yet unique to the request.
                data = (start_at.to_bytes(8, "big") + bytes([rng.randrange(1, 256)]) * 504) * (
                    length // 512
                )
                requests.append(io.pwrite(edge, start_at, data))
                model[start_at : start_at + length] = data
        await asyncio.gather(*requests)
        if round_number % 4 == 3:
            await io.flush(edge)
    assert await io.pread(edge, 0, SIZE) == model
    await finish(daemon, edge, path, model)


def hold_data(
    monkeypatch: pytest.MonkeyPatch, marker: bytes, fail: bool = False
) -> tuple[asyncio.Event, asyncio.Event]:
    """The first file write whose data starts with `marker` waits for the second event once
    the first is set (nothing reached the file yet); `fail`: it then fails with EIO."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def pwrite(child: BdrvChild, offset: int, data: Any, **kw: Any) -> None:
        if bytes(data[: len(marker)]) == marker and not entered.is_set():
            entered.set()
            await release.wait()
            if fail:
                raise OSError(errno.EIO, "injected")
        await io.pwrite(child, offset, data, **kw)

    namespace = SimpleNamespace(pwrite=pwrite, pwrite_zeroes=io.pwrite_zeroes)
    monkeypatch.setattr(writer_module, "io", namespace)
    return entered, release


async def test_allocating_writes_overlap_and_a_write_into_the_same_new_cluster_waits(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data of a first allocation is written outside the metadata lock: allocations
    elsewhere go on meanwhile, and a second write into the same new cluster waits for the
    first's L2 entry instead of allocating the cluster a second time (that would leak one
    host cluster and lose one of the two writes)."""
    monkeypatch.setattr(writer_module, "DEFER_MIN_BYTES", 0)  # small writes too
    path = scratch / "d.qcow2"
    daemon, edge, driver = await start(path)
    # The allocator's hint reaches the end of the file: later partial first allocations
    # take the fast path (guest data only, in fresh space).
    await io.pwrite(edge, 20 * CS, b"W" * 512)
    entered, release = hold_data(monkeypatch, b"A")
    first = asyncio.create_task(io.pwrite(edge, 0, b"A" * 4096))
    await entered.wait()
    tracker = driver.writer.tracker
    assert tracker.blocker(8192, 4096) is not None  # guest cluster 0 is being allocated
    second = asyncio.create_task(io.pwrite(edge, 8192, b"B" * 4096))
    async with asyncio.timeout(10):  # under a lock held across the data write: forever
        await io.pwrite(edge, 5 * CS, b"C" * (3 * CS))  # a whole run
        await io.pwrite(edge, 9 * CS + 512, b"D" * 512)  # a partial first allocation
        assert await io.pread(edge, 5 * CS, 3 * CS) == b"C" * (3 * CS)
    assert not second.done()
    assert await io.pread(edge, 0, 4096) == bytes(4096)  # not linked yet: still a hole
    release.set()
    await first
    await second
    assert not tracker.pending
    model = bytearray(SIZE)
    model[0:4096] = b"A" * 4096
    model[8192 : 8192 + 4096] = b"B" * 4096
    model[5 * CS : 8 * CS] = b"C" * (3 * CS)
    model[9 * CS + 512 : 9 * CS + 1024] = b"D" * 512
    model[20 * CS : 20 * CS + 512] = b"W" * 512
    assert await io.pread(edge, 0, SIZE) == model
    await finish(daemon, edge, path, model)  # qemu-img check: no leak, no double reference


async def test_a_failed_allocating_write_gives_its_clusters_back(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data write of new clusters fails (outside the lock): the request fails, nothing
    points at the clusters, their refcounts fall back (no leak), and the write that waited
    for the same cluster allocates it afresh."""
    path = scratch / "e.qcow2"
    daemon, edge, driver = await start(path)
    entered, release = hold_data(monkeypatch, b"A", fail=True)
    failing = asyncio.create_task(io.pwrite(edge, 0, b"A" * (2 * CS)))
    await entered.wait()
    waiting = asyncio.create_task(io.pwrite(edge, CS + 4096, b"B" * 4096))
    release.set()
    with pytest.raises(OSError) as caught:
        await failing
    assert caught.value.errno == errno.EIO
    await waiting
    await io.flush(edge)  # applies the queued refcount drops
    model = bytearray(SIZE)
    model[CS + 4096 : CS + 8192] = b"B" * 4096
    assert await io.pread(edge, 0, 2 * CS) == model[: 2 * CS]
    assert not driver.writer.tracker.pending
    await finish(daemon, edge, path, model)


async def test_a_cancelled_allocating_write_leaves_no_reference(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client gone while the data of new clusters is written (its request cancelled):
    the clusters are given back and later writes of the same area work."""
    path = scratch / "f.qcow2"
    daemon, edge, driver = await start(path)
    entered, _ = hold_data(monkeypatch, b"A")
    cancelled = asyncio.create_task(io.pwrite(edge, 0, b"A" * CS))
    await entered.wait()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not driver.writer.tracker.pending
    await io.pwrite(edge, 0, b"E" * 4096)
    await io.flush(edge)
    model = bytearray(SIZE)
    model[:4096] = b"E" * 4096
    await finish(daemon, edge, path, model)
