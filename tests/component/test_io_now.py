"""The I/O path's answers without waiting (`io.block_status_now`, `pread_now`,
`pwrite_now`), writes started on a file's writer thread (`pwrite_start`, `settled`), qcow2
metadata preallocation (block status asks the file), and the file driver's data-extent cache.

Component ring: real images made by qemu-img/qemu-io, opened through the daemon's graph.
A `_now` answer must always be None (nothing done) or exactly what the awaited call gives,
counted alike, and must come where everything it needs is in memory or on tmpfs.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.driver import BlockStatus
from storage_daemon.blockdev.drivers.file import FileDriver, syscalls
from storage_daemon.blockdev.drivers.qcow2.driver import Qcow2Driver
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.blockdev.transaction import DrainedSection
from storage_daemon.daemon import Daemon

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="needs qemu-img and qemu-io",
)

KiB = 1 << 10
MiB = 1 << 20


class Parent:
    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


def sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout + done.stderr


def qcow2(path: Path, size: str, *opts: str, writes: tuple[str, ...] = ()) -> Path:
    sh("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), size)
    if writes:
        args = ["qemu-io", "-f", "qcow2"]
        for w in writes:
            args += ["-c", w]
        sh(*args, str(path))
    return path


# name -> (create options, qemu-io writes, size)
IMAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "plain": (
        (),
        ("write -P 0x11 0 64k", "write -z 128k 64k", "write -P 0 256k 64k", "write -P 2 1M 4k"),
        "4M",
    ),
    "ext": (
        ("-o", "extended_l2=on"),
        ("write -P 1 4k 4k", "write -z 8k 4k", "write -P 2 100k 6k", "write -z 1M 64k"),
        "2M",
    ),
    "small": (("-o", "cluster_size=512"), ("write -P 8 0 96k", "write -z 100k 10k"), "512k"),
    "comp": ((), ("write -c -P 5 0 64k", "write -c -P 6 64k 64k"), "1M"),
    "prealloc": (
        ("-o", "preallocation=metadata"),
        ("write -P 0x55 64k 64k", "write -z 1M 64k", "write -P 7 3000k 5k"),
        "4M",
    ),
    "sliced": ((), ("write -P 3 0 8k", "write -P 4 3M 12k"), "16M"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bsnow")
    out = {name: qcow2(d / f"{name}.qcow2", size, *opts, writes=w) for name, (opts, w, size) in IMAGES.items()}  # fmt: skip
    base = qcow2(d / "base.qcow2", "4M", writes=("write -P 0x55 0 1M", "write -P 0x66 2M 1M"))
    out["top"] = qcow2(
        d / "top.qcow2", "6M", "-b", base.name, "-F", "qcow2",
        writes=("write -P 0x77 64k 64k", "write -z 256k 128k", "write -P 0x99 5M 64k"),
    )  # fmt: skip
    raw = d / "raw.img"
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(os.urandom(64 * KiB))
    out["raw"] = raw
    # The fixture's subprocesses ran outside any event loop; warm the schema models too.
    asyncio.run(_warm(out["plain"]))
    return out


async def _warm(image: Path) -> None:
    daemon = Daemon()
    edge = await open_image(daemon, image, "qcow2", write=False)
    await io.block_status(edge, 0, 4096)
    await daemon.shutdown()


async def open_image(daemon: Daemon, image: Path, fmt: str, write: bool, **extra: Any) -> BdrvChild:
    opts: dict[str, Any] = {
        "driver": fmt,
        "node-name": "n",
        "file": {"driver": "file", "filename": str(image)},
        "read-only": not write,
        **extra,
    }
    await daemon.run_command("blockdev-add", opts)
    node = daemon.graph.lookup("n")
    perm = Perm.CONSISTENT_READ | (Perm.WRITE if write else Perm(0))
    return daemon.graph.attach(Parent(), node, "root", ChildRole.PRIMARY, perm, PERM_ALL)


def ranges(size: int, seed: int) -> Iterator[tuple[int, int]]:
    """Aligned and unaligned (offset, length) pairs over the image, some up to its end."""
    rng = random.Random(seed)
    for _ in range(150):
        off = rng.randrange(size)
        if rng.random() < 0.5:
            off -= off % 512
        yield off, rng.choice((1, 512, 4096, 5000, 64 * KiB, MiB, size - off))


# (image, format, options, how many of the 150 ranges must be answered from memory): holes
# of a file need a SEEK_DATA probe every time (only data extents are cached, as QEMU does),
# so the raw file and a preallocated image's clusters over holes are rarely answered.
CASES = [
    ("plain", "qcow2", {}, 100),
    ("ext", "qcow2", {}, 100),
    ("small", "qcow2", {}, 100),
    ("comp", "qcow2", {}, 100),
    ("prealloc", "qcow2", {}, 1),
    ("sliced", "qcow2", {"l2-cache-entry-size": 4096, "l2-cache-size": 8192}, 100),
    ("top", "qcow2", {}, 100),
    ("raw", "raw", {}, 1),
]


@pytest.mark.parametrize(("name", "fmt", "extra", "least"), CASES, ids=[c[0] for c in CASES])
async def test_block_status_now_is_none_or_the_awaited_answer(
    images: dict[str, Path], name: str, fmt: str, extra: dict[str, Any], least: int
) -> None:
    daemon = Daemon()
    try:
        edge = await open_image(daemon, images[name], fmt, write=False, **extra)
        size = io.length(edge)
        answered = 0
        for off, length in ranges(size, seed=len(name)):
            before = io.block_status_now(edge, off, length)  # possibly cold caches
            status = await io.block_status(edge, off, length)
            after = io.block_status_now(edge, off, length)
            for now in (before, after):
                assert now is None or now == status, (off, length, now, status)
            for want_zero in (False, True):
                now = io.block_status_now(edge, off, length, want_zero=want_zero)
                slow = await io.block_status(edge, off, length, want_zero=want_zero)
                assert now is None or now == slow
            answered += after is not None
            await asyncio.sleep(0)
        # Where the tables are cached (they are, after the awaited call), it answers.
        assert answered >= least
        assert io.block_status_now(edge, size, 1) is None  # outside: the awaited path's
        assert io.block_status_now(edge, -1, 1) is None
    finally:
        await daemon.shutdown()


async def test_read_only_qcow2_waits_for_the_first_awaited_status(
    images: dict[str, Path],
) -> None:
    """The preallocation check runs at the first awaited block status of a read-only image
    (as QEMU's); before it, nothing is answered from memory."""
    daemon = Daemon()
    edge = await open_image(daemon, images["plain"], "qcow2", write=False)
    drv = edge.node.driver
    assert isinstance(drv, Qcow2Driver)
    assert io.block_status_now(edge, 2 * MiB, 4096) is None
    await io.block_status(edge, 0, 4096)
    now = io.block_status_now(edge, 2 * MiB, 4096)
    assert now == BlockStatus(length=4096, data=False, zero=True, depth=0)
    await daemon.shutdown()


@pytest.fixture
def fresh_prealloc(scratch: Path) -> Path:
    """A metadata-preallocated image of this test's own (it gets written)."""
    return qcow2(
        scratch / "prealloc.qcow2", "4M", "-o", "preallocation=metadata",
        writes=("write -P 0x55 64k 64k", "write -P 7 3000k 5k"),
    )  # fmt: skip


async def test_metadata_preallocation_consults_the_file(fresh_prealloc: Path) -> None:
    image = fresh_prealloc
    daemon = Daemon()
    edge = await open_image(daemon, image, "qcow2", write=True)
    drv = edge.node.driver
    assert isinstance(drv, Qcow2Driver)
    assert drv._prealloc is True  # writable: checked at open
    # A referenced cluster over a hole of the file: data (allocated) that reads as zeroes.
    assert await io.block_status(edge, 0, 64 * KiB) == BlockStatus(64 * KiB, True, True)
    # Written by qemu-io: the file holds it.
    assert await io.block_status(edge, 64 * KiB, 64 * KiB) == BlockStatus(64 * KiB, True, False)
    # Written 5 KiB into a cluster: the file's data ends on its own block boundary.
    status = await io.block_status(edge, 3000 * KiB, 64 * KiB)
    assert status.data and not status.zero and 5 * KiB <= status.length < 64 * KiB
    # Our own write turns the hole into data.
    await io.pwrite(edge, 0, b"\x01" * 4096)
    status = await io.block_status(edge, 0, 64 * KiB)
    assert (status.data, status.zero) == (True, False) and status.length >= 4096
    assert bytes(await io.pread(edge, 0, 8192)) == b"\x01" * 4096 + bytes(4096)
    await daemon.shutdown()


@pytest.mark.parametrize("name", ["plain", "comp", "top"])
async def test_ordinary_images_are_not_preallocated(images: dict[str, Path], name: str) -> None:
    daemon = Daemon()
    edge = await open_image(daemon, images[name], "qcow2", write=False)
    drv = edge.node.driver
    assert isinstance(drv, Qcow2Driver)
    await io.block_status(edge, 0, 4096)
    assert drv._prealloc is False
    await daemon.shutdown()


async def test_extended_l2_runs_cross_subclusters_of_cluster_zero(
    images: dict[str, Path],
) -> None:
    """Subclusters 2 and 3 of guest cluster 0 (index 0 of its L2 table) are one extent."""
    daemon = Daemon()
    edge = await open_image(daemon, images["ext"], "qcow2", write=False)
    status = await io.block_status(edge, 4 * KiB, 16 * KiB)
    assert (status.length, status.data) == (4 * KiB, True)
    status = await io.block_status(edge, 100 * KiB, 16 * KiB)
    assert (status.length, status.data) == (6 * KiB, True)
    await daemon.shutdown()


# --- the file driver's data extent cache ----------------------------------------------------


@pytest.fixture
def data_file(scratch: Path) -> Path:
    path = scratch / "data.img"
    path.write_bytes(os.urandom(4 * MiB))
    return path


async def test_data_extent_cache_merges_probes_from_different_offsets(
    data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients probing at different offsets (nbdcopy's connections) extend one cached data
    extent instead of replacing it: each later probe inside it costs no SEEK_HOLE scan."""
    path = data_file
    probes: list[int] = []
    real = syscalls.find_allocation

    def counting(fd: int, offset: int, length: int) -> tuple[bool, int]:
        probes.append(offset)
        return real(fd, offset, length)

    monkeypatch.setattr(syscalls, "find_allocation", counting)
    daemon = Daemon()
    await daemon.run_command(
        "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(path)}
    )
    node = daemon.graph.lookup("f")
    edge = daemon.graph.attach(
        Parent(), node, "root", ChildRole.PRIMARY, Perm.CONSISTENT_READ, PERM_ALL
    )
    drv = node.driver
    assert isinstance(drv, FileDriver)
    assert io.block_status_now(edge, 0, 4096) is None  # nothing known yet
    await io.block_status(edge, 2 * MiB, 4096)
    await io.block_status(edge, MiB, 4096)  # below the cached extent: one more probe
    await io.block_status(edge, 0, 4096)
    for off in range(0, 4 * MiB, 256 * KiB):
        assert await io.block_status(edge, off, 4096) == BlockStatus(4096, True, False)
        assert io.block_status_now(edge, off, 4096) == BlockStatus(4096, True, False)
    assert probes == [2 * MiB, MiB, 0]
    await daemon.shutdown()


# --- reads and writes done at once ----------------------------------------------------------


@pytest.fixture
def shm_data(shm_dir: Path) -> Path:
    """4 MiB of random data on tmpfs (where reads and writes run inline)."""
    path = shm_dir / "io-now.img"
    path.write_bytes(os.urandom(4 * MiB))
    return path


async def open_raw(daemon: Daemon, path: Path, write: bool, **file_opts: Any) -> BdrvChild:
    await daemon.run_command(
        "blockdev-add",
        {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": str(path), **file_opts}},
    )  # fmt: skip
    node = daemon.graph.lookup("r")
    perm = Perm.CONSISTENT_READ | (Perm.WRITE if write else Perm(0))
    return daemon.graph.attach(Parent(), node, "root", ChildRole.PRIMARY, perm, PERM_ALL)


def contents(path: Path) -> bytes:
    """A small tmpfs file's bytes (no device to wait for)."""
    with open(path, "rb") as f:
        return f.read()


def stats_of(edge: BdrvChild) -> tuple[int, int, int, int, int, int]:
    s = edge.node.stats
    return (
        s.rd_operations, s.rd_bytes, s.wr_operations, s.wr_bytes, s.wr_highest_offset,
        edge.node.io_state.write_gen,
    )  # fmt: skip


async def test_reads_and_writes_at_once_on_tmpfs_match_the_awaited_ones(shm_data: Path) -> None:
    daemon = Daemon()
    try:
        edge = await open_raw(daemon, shm_data, write=True)
        image = contents(shm_data)
        for off, length in [(0, 4096), (12345, 777), (MiB, 256 * KiB), (4 * MiB - 10, 10)]:
            now = io.pread_now(edge, off, length)
            assert now is not None and bytes(now) == image[off : off + length]
            assert bytes(await io.pread(edge, off, length)) == image[off : off + length]
        # Counted as the awaited reads are, on the raw node and on its file.
        assert stats_of(edge)[:2] == (8, 2 * (4096 + 777 + 256 * KiB + 10))
        assert edge.node.child("file").node.stats.rd_operations == 8  # type: ignore[union-attr]
        # Outside the node: left to the awaited path (which fails with EIO).
        assert io.pread_now(edge, 4 * MiB - 10, 11) is None
        assert io.pread_now(edge, -1, 1) is None
        before = stats_of(edge)
        assert io.pwrite_now(edge, 8192, b"\xab" * 5000, fua=True)
        assert contents(shm_data)[8192 : 8192 + 5000] == b"\xab" * 5000
        after = stats_of(edge)
        assert after[2:4] == (before[2] + 1, before[3] + 5000)
        assert after[4] == max(before[4], 8192 + 5000) and after[5] == before[5] + 1
        assert not io.pwrite_now(edge, 4 * MiB - 10, b"x" * 11)  # growth: awaited path's
        assert stats_of(edge) == after
    finally:
        await daemon.shutdown()


async def test_at_once_paths_defer_what_would_wait(shm_data: Path, scratch: Path) -> None:
    """Nothing is done (and None/False returned) where a layer would have to wait: a node
    without the optional methods, detect-zeroes, a too large tmpfs request; a read-only
    node refuses writes with EPERM as `pwrite` does."""
    daemon = Daemon()
    try:
        edge = await open_raw(daemon, shm_data, write=True)
        assert io.pread_now(edge, 0, 4 * MiB) is None  # above the inline limit
        assert not io.pwrite_now(edge, 0, bytes(2 * MiB))
        node = daemon.graph.lookup("r")
        node.options.detect_zeroes = "on"
        assert not io.pwrite_now(edge, 0, bytes(4096))
        node.options.detect_zeroes = "off"
        await daemon.run_command(
            "blockdev-add", {"driver": "null-co", "node-name": "n", "size": MiB}
        )
        null = daemon.graph.attach(
            Parent(), daemon.graph.lookup("n"), "root", ChildRole.PRIMARY,
            Perm.CONSISTENT_READ | Perm.WRITE, PERM_ALL,
        )  # fmt: skip
        assert io.pread_now(null, 0, 4096) is None
        assert not io.pwrite_now(null, 0, b"x")
        ro = daemon.graph.attach(
            Parent(), node, "ro", ChildRole.PRIMARY, Perm.CONSISTENT_READ, PERM_ALL
        )
        with pytest.raises(OSError) as info:
            io.pwrite_now(ro, 0, b"x")
        assert info.value.errno == errno.EPERM
    finally:
        await daemon.shutdown()


async def test_qcow2_reads_at_once_follow_the_cached_mapping(images: dict[str, Path]) -> None:
    daemon = Daemon()
    try:
        edge = await open_image(daemon, images["plain"], "qcow2", write=False)
        assert io.pread_now(edge, 0, 4096) is None  # the L2 table is not cached yet
        expected = bytes(await io.pread(edge, 0, 64 * KiB))
        assert expected == b"\x11" * 64 * KiB
        now = io.pread_now(edge, 4096, 8192)
        assert now is not None and bytes(now) == b"\x11" * 8192
        assert io.pread_now(edge, 60 * KiB, 8192) is None  # two kinds: the awaited path's
        assert io.pread_now(edge, 2 * MiB, 4096) is None  # unallocated: not a host read
    finally:
        await daemon.shutdown()


# --- writes started on the file's writer thread -----------------------------------------------


async def test_large_tmpfs_writes_start_on_the_copier_and_count_as_awaited_ones(
    shm_data: Path,
) -> None:
    daemon = Daemon()
    try:
        edge = await open_raw(daemon, shm_data, write=True)
        file_node = edge.node.child("file").node  # type: ignore[union-attr]
        ended: list[BaseException | None] = []
        before, file_before = stats_of(edge), file_node.stats.wr_operations
        payload = os.urandom(256 * KiB)
        assert io.pwrite_start(edge, MiB, payload, ended.append)
        assert ended == []  # it ends through the loop, never inside the call
        assert edge.node.io_state.started == file_node.io_state.started == 1  # in flight
        # Counted once it ended, as the awaited write counts (both nodes).
        assert stats_of(edge) == before
        await io.settled(edge.node)
        assert ended == [None]
        assert edge.node.io_state.started == file_node.io_state.started == 0
        assert contents(shm_data)[MiB : MiB + 256 * KiB] == payload
        after = stats_of(edge)
        assert after[2:4] == (before[2] + 1, before[3] + 256 * KiB)
        assert after[4] == max(before[4], MiB + 256 * KiB) and after[5] == before[5] + 1
        assert file_node.stats.wr_operations == file_before + 1
        # Left to the other paths: small writes, growth, detect-zeroes, other drivers.
        assert not io.pwrite_start(edge, 0, bytes(4096), ended.append)
        assert not io.pwrite_start(edge, 4 * MiB - 4096, bytes(256 * KiB), ended.append)
        edge.node.options.detect_zeroes = "on"
        assert not io.pwrite_start(edge, 0, bytes(256 * KiB), ended.append)
        edge.node.options.detect_zeroes = "off"
        await daemon.run_command(
            "blockdev-add", {"driver": "null-co", "node-name": "n", "size": 4 * MiB}
        )
        null = daemon.graph.attach(
            Parent(), daemon.graph.lookup("n"), "root", ChildRole.PRIMARY,
            Perm.CONSISTENT_READ | Perm.WRITE, PERM_ALL,
        )  # fmt: skip
        assert not io.pwrite_start(null, 0, bytes(256 * KiB), ended.append)
        ro = daemon.graph.attach(
            Parent(), edge.node, "ro", ChildRole.PRIMARY, Perm.CONSISTENT_READ, PERM_ALL
        )
        with pytest.raises(OSError) as info:
            io.pwrite_start(ro, 0, bytes(256 * KiB), ended.append)
        assert info.value.errno == errno.EPERM
        assert ended == [None] and stats_of(edge) == after
    finally:
        await daemon.shutdown()


async def test_writes_to_a_file_on_disk_start_on_its_writer_thread(scratch: Path) -> None:
    """Off tmpfs every buffered write may wait (journal, dirty throttling): none runs inline,
    and a 4 KiB one starts on the file's writer thread too, counted as the awaited one.
    O_DIRECT writes are left to the awaited path (aligned buffers, the pool)."""
    path = scratch / "disk.img"
    # (Not on the loop: 4 MiB to ext4 took over the 50 ms callback limit on a loaded host.)
    await asyncio.to_thread(path.write_bytes, os.urandom(4 * MiB))
    daemon = Daemon()
    try:
        edge = await open_raw(daemon, path, write=True)
        assert not io.pwrite_now(edge, 0, bytes(4096))  # never inline off tmpfs
        ended: list[BaseException | None] = []
        before = stats_of(edge)
        assert io.pwrite_start(edge, 12288, b"\xc3" * 4096, ended.append)
        assert ended == [] and edge.node.io_state.started == 1
        await io.settled(edge.node)
        assert ended == [None]
        after = stats_of(edge)
        assert after[2:4] == (before[2] + 1, before[3] + 4096) and after[5] == before[5] + 1
        assert bytes(await io.pread(edge, 12288, 4096)) == b"\xc3" * 4096
    finally:
        await daemon.shutdown()
    written = await asyncio.to_thread(path.read_bytes)
    assert written[12288 : 12288 + 4096] == b"\xc3" * 4096
    daemon = Daemon()
    try:
        edge = await open_raw(daemon, path, write=True, cache={"direct": True})
        assert not io.pwrite_start(edge, 0, bytes(4096), ended.append)
    finally:
        await daemon.shutdown()


@pytest.mark.parametrize("where", ["tmpfs", "disk"])
async def test_qcow2_writes_into_allocated_clusters_go_without_a_task(
    where: str, shm_dir: Path, scratch: Path
) -> None:
    """A write into clusters that are allocated, COPIED (refcount 1) and whose L2 table is
    cached needs no metadata change: done inline on tmpfs (`pwrite_now`), started on the
    file's writer thread elsewhere (`pwrite_start`), its host cluster counted in flight
    meanwhile. Clusters shared with a snapshot, unallocated ones, or a table not cached yet
    are left to the awaited path."""
    path = (shm_dir if where == "tmpfs" else scratch) / "inplace.qcow2"
    await asyncio.to_thread(_snapshotted, path)
    daemon = Daemon()
    try:
        edge = await open_image(daemon, path, "qcow2", write=True)
        drv = edge.node.driver
        assert isinstance(drv, Qcow2Driver) and drv.meta is not None
        payload = os.urandom(4096)
        ended: list[BaseException | None] = []
        assert not io.pwrite_now(edge, 64 * KiB + 512, payload)  # its L2 table is not cached
        assert not io.pwrite_start(edge, 64 * KiB + 512, payload, ended.append)
        assert bytes(await io.pread(edge, 0, 512)) == b"\x11" * 512  # (loads the table)
        assert not io.pwrite_now(edge, 512, payload)  # shared with the snapshot
        assert not io.pwrite_start(edge, 512, payload, ended.append)
        assert not io.pwrite_start(edge, MiB, payload, ended.append)  # unallocated
        assert not io.pwrite_start(edge, 128 * KiB - 512, payload, ended.append)  # crosses
        before = stats_of(edge)
        if where == "tmpfs":
            assert io.pwrite_now(edge, 64 * KiB + 512, payload)
            assert not drv.meta.inflight
        else:
            assert not io.pwrite_now(edge, 64 * KiB + 512, payload)  # may wait: never inline
            assert io.pwrite_start(edge, 64 * KiB + 512, payload, ended.append)
            assert len(drv.meta.inflight) == 1 and ended == []  # its host cluster stays put
            await io.settled(edge.node)
            assert ended == [None] and not drv.meta.inflight
        after = stats_of(edge)
        assert after[2:4] == (before[2] + 1, before[3] + 4096) and after[5] == before[5] + 1
        assert bytes(await io.pread(edge, 64 * KiB, 1024)) == b"\x22" * 512 + payload[:512]
    finally:
        await daemon.shutdown()
    image = await asyncio.to_thread(_checked_contents, path, 128 * KiB)
    expected = b"\x11" * (64 * KiB) + b"\x22" * 512 + payload + b"\x22" * (60 * KiB - 512)
    assert image == expected


def _snapshotted(path: Path) -> None:
    """64 KiB shared with a snapshot, then 64 KiB written after it (COPIED again)."""
    qcow2(path, "4M", writes=("write -P 0x11 0 64k",))
    sh("qemu-img", "snapshot", "-c", "s1", str(path))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 64k 64k", str(path))


def _checked_contents(path: Path, length: int) -> bytes:
    """`qemu-img check` passes, and the first `length` bytes as qemu-img reads them."""
    sh("qemu-img", "check", "-q", str(path))
    raw = path.with_suffix(".raw")
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    with open(raw, "rb") as f:
        return f.read(length)


async def test_shutdown_waits_for_a_started_write(shm_data: Path) -> None:
    daemon = Daemon()
    edge = await open_raw(daemon, shm_data, write=True)
    payload = os.urandom(1 * MiB)
    ended: list[BaseException | None] = []
    assert io.pwrite_start(edge, 2 * MiB, payload, ended.append)
    await daemon.shutdown()  # closes the file: only once the write has ended
    assert ended == [None]
    assert contents(shm_data)[2 * MiB : 3 * MiB] == payload


async def test_graph_changes_wait_until_started_writes_ended(
    shm_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qsd drains a node before a graph change, a resize or an inactivation: no write that
    began before lands after. Here the copier's part is held back by hand (the file driver's
    `pwritev_start` keeps its callback), so the write stays in flight until the test ends it."""
    held: list[Any] = []

    def hold(self: FileDriver, offset: int, data: Any, fua: bool, done: Any) -> bool:
        held.append(done)
        return True

    monkeypatch.setattr(FileDriver, "pwritev_start", hold)
    daemon = Daemon()
    try:
        edge = await open_raw(daemon, shm_data, write=True)
        settled = io.settled(edge.node)
        with pytest.raises(StopIteration):
            settled.send(None)  # nothing in flight: returns without yielding
        ended: list[BaseException | None] = []
        assert io.pwrite_start(edge, 0, bytes(256 * KiB), ended.append)
        resize = asyncio.ensure_future(
            daemon.run_command("block_resize", {"node-name": "r", "size": 8 * MiB})
        )
        for _ in range(20):
            await asyncio.sleep(0)
        assert not resize.done() and len(contents(shm_data)) == 4 * MiB
        held.pop()(None)  # the copy ends
        await asyncio.wait_for(resize, 10)
        assert ended == [None] and len(contents(shm_data)) == 8 * MiB
        # A drained section (snapshots, stream, commit, reopen, export removal) too.
        assert io.pwrite_start(edge, 0, bytes(256 * KiB), ended.append)
        section = DrainedSection(edge.node)
        begin = asyncio.ensure_future(section.begin())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not begin.done()
        held.pop()(None)
        await asyncio.wait_for(begin, 10)
        await section.end()
        assert ended == [None, None]
    finally:
        for done in held:
            done(None)
        await daemon.shutdown()


async def test_a_drain_waits_for_awaited_writes_in_flight(
    shm_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for writes on the awaited path (the pool's, e.g. on ext4): a mirror started
    while one is on a pool thread must not scan the source before it has landed."""
    release = asyncio.Event()
    real = FileDriver.pwritev

    async def slow(self: FileDriver, offset: int, data: Any, fua: bool) -> None:
        await release.wait()
        await real(self, offset, data, fua)

    monkeypatch.setattr(FileDriver, "pwritev", slow)
    daemon = Daemon()
    try:
        edge = await open_raw(daemon, shm_data, write=True)
        write = asyncio.ensure_future(io.pwrite(edge, 0, b"\x5a" * 4096))
        await asyncio.sleep(0)
        assert edge.node.io_state.started == 1
        section = DrainedSection(edge.node)
        begin = asyncio.ensure_future(section.begin())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not begin.done() and not write.done()
        release.set()
        await asyncio.wait_for(begin, 10)
        assert write.done() and contents(shm_data)[:4096] == b"\x5a" * 4096
        await section.end()
        assert edge.node.io_state.started == 0
    finally:
        release.set()
        await daemon.shutdown()
