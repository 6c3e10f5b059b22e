"""qcow2 metadata cache options through the daemon: option errors as the reference qsd words
them, reads through small L2 slices matching qemu-img, and cache-clean-interval on a fake
clock."""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.qcow2 import driver as qcow2_driver
from storage_daemon.blockdev.drivers.qcow2.driver import Qcow2Driver
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.clock import FakeClock, SystemClock
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError

QSD = "/usr/bin/qemu-storage-daemon"
pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or not os.path.exists(QSD), reason="needs qemu-img and qsd"
)

KiB = 1 << 10
MiB = 1 << 20
SEC = 1_000_000_000


class FakeExport:
    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)


def make_image(path: Path, size: str, *opts: str, io_cmds: tuple[str, ...] = ()) -> Path:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        cmd += ["-o", ",".join(opts)]
    out = sh(*cmd, str(path), size)
    assert out.returncode == 0, out.stderr
    if io_cmds:
        args = ["qemu-io", "-f", "qcow2"]
        for c in io_cmds:
            args += ["-c", c]
        out = sh(*args, str(path))
        assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout
    return path


async def amake(path: Path, size: str, *opts: str, io_cmds: tuple[str, ...] = ()) -> Path:
    return await asyncio.to_thread(make_image, path, size, *opts, io_cmds=io_cmds)


async def open_node(daemon: Daemon, path: Path, write: bool, **extra: Any) -> BdrvChild:
    opts: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": "q",
        "file": {"driver": "file", "filename": str(path)},
        **extra,
    }
    if not write:
        opts["read-only"] = True
    await daemon.run_command("blockdev-add", opts)
    node = daemon.graph.lookup("q")
    edge = daemon.graph.attach(FakeExport(), node, "root", ChildRole.PRIMARY)
    perm = Perm.CONSISTENT_READ | (Perm.WRITE if write else Perm(0))
    daemon.graph.set_edge_perm(edge, perm, PERM_ALL)
    return edge


async def close_node(daemon: Daemon, edge: BdrvChild) -> None:
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": "q"})


def qcow2_of(edge: BdrvChild) -> Qcow2Driver:
    drv = edge.node.driver
    assert isinstance(drv, Qcow2Driver)
    return drv


@pytest.fixture(scope="module", autouse=True)
def _warm_models(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the lazily generated schema models outside the tests' event loops."""
    img = make_image(tmp_path_factory.mktemp("warm") / "w.qcow2", "1M")

    async def warm() -> None:
        daemon = Daemon()
        edge = await open_node(daemon, img, True)
        await io.pwrite(edge, 0, b"x")
        await close_node(daemon, edge)

    asyncio.run(warm())


@pytest.fixture
def fake_clock() -> Iterator[FakeClock]:
    clock = FakeClock()
    qcow2_driver.use_clock(clock)
    try:
        yield clock
    finally:
        qcow2_driver.use_clock(SystemClock())


# --- option errors, compared with the reference ------------------------------------------

BAD_OPTIONS = [
    "l2-cache-entry-size=256",
    "l2-cache-entry-size=3000",
    "l2-cache-entry-size=131072",
    "cache-clean-interval=-1",
    "cache-clean-interval=4294967296",
    "cache-size=100,l2-cache-size=200",
    "cache-size=100,refcount-cache-size=200",
    "cache-size=100,l2-cache-size=20,refcount-cache-size=10",
    "l2-cache-entry-size=3,cache-size=1,l2-cache-size=2",
    "cache-clean-interval=-1,l2-cache-entry-size=3",
    "cache-clean-interval=-1,lazy-refcounts=on",
    f"refcount-cache-size={4 * (os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE'))}",
]


def qsd_error(image: Path, opts: str) -> str:
    out = sh(
        QSD,
        "--blockdev",
        f"driver=file,node-name=f,filename={image}",
        "--blockdev",
        f"driver=qcow2,node-name=q,file=f,{opts}",
        "--chardev",
        "null,id=bad,nonexistent-option=1",  # qsd exits here when the node opened fine
    )
    assert out.returncode == 1, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    prefix = f"qemu-storage-daemon: --blockdev driver=qcow2,node-name=q,file=f,{opts}: "
    assert line.startswith(prefix), line
    return line[len(prefix) :]


def to_spec(opts: str) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for item in opts.split(","):
        key, value = item.split("=")
        spec[key] = value == "on" if value in ("on", "off") else int(value)
    return spec


@pytest.mark.parametrize("opts", BAD_OPTIONS)
async def test_bad_cache_options_fail_as_qsd(tmp_path: Path, opts: str) -> None:
    img = await amake(tmp_path / "c.qcow2", "1G", "compat=0.10")
    expected = await asyncio.to_thread(qsd_error, img, opts)
    daemon = Daemon()
    with pytest.raises(QmpError) as info:
        await open_node(daemon, img, True, **to_spec(opts))
    assert info.value.desc == expected


# --- slices -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "per_table", "slice_span"),
    [
        (("cluster_size=4096",), 8, 256 * KiB),
        (("cluster_size=16k", "extended_l2=on"), 32, 512 * KiB),
    ],
)
async def test_reads_through_small_slices_match_qemu_and_writes_stay_clean(
    tmp_path: Path, opts: tuple[str, ...], per_table: int, slice_span: int
) -> None:
    # 4 KiB clusters: one L2 table maps 2 MiB, a 512-byte slice 256 KiB; 16 MiB of image
    # spread over 8 tables, read through a cache of 4 slices and written beside it. With
    # extended L2 entries (16 bytes) and 16 KiB clusters a slice maps 32 clusters.
    writes = (
        *(f"write -P {i + 1} {i * 700}k 5k" for i in range(23)),
        "write -z 9M 64k",
        "write -P 0x77 15M 1M",
    )
    img = await amake(tmp_path / "s.qcow2", "16M", *opts, io_cmds=writes)
    # The 16 MiB copy off the loop too: a callback that allocates it can pass 50 ms.
    expected = await asyncio.to_thread(lambda: bytearray(read_raw(img)))
    daemon = Daemon()
    await asyncio.sleep(0)  # the setup above and the open below: two callbacks
    edge = await open_node(daemon, img, True, **{"l2-cache-entry-size": 512, "l2-cache-size": 2048})
    drv = qcow2_of(edge)
    assert drv.cache_config is not None and drv.cache_config.l2_slice_size == 512
    cache = drv.meta.l2_cache if drv.meta is not None else None
    assert cache is not None and cache.per_table == per_table
    got = bytearray()
    for pos in range(0, 16 * MiB, 96 * KiB):  # not aligned with slices or tables
        got += await io.pread(edge, pos, min(96 * KiB, 16 * MiB - pos))
        await asyncio.sleep(0)  # cached reads complete inline: this loop is one callback
    assert got == expected
    assert cache._slices > 0  # the reads went through slices
    # Writes (whole tables) beside slice reads: every read still sees the latest data.
    for i in range(40):
        pos = (i * 397 * KiB) % (16 * MiB - 8 * KiB)
        payload = bytes([200 + i % 50]) * 6000
        await io.pwrite(edge, pos, payload)
        expected[pos : pos + 6000] = payload
        check = (pos + 300 * KiB) % (16 * MiB - 64 * KiB)
        assert await io.pread(edge, check, 64 * KiB) == expected[check : check + 64 * KiB]
        assert await io.pread(edge, pos, 6000) == payload
        await asyncio.sleep(0)
    status = await io.block_status(edge, 15 * MiB, MiB)
    assert status.data and status.length <= slice_span  # one slice's worth at most
    await close_node(daemon, edge)
    out = await asyncio.to_thread(sh, "qemu-img", "check", str(img))
    assert out.returncode == 0, out.stdout + out.stderr
    assert await asyncio.to_thread(read_raw, img) == expected


def read_raw(path: Path) -> bytes:
    raw = path.with_suffix(".raw")
    out = sh("qemu-img", "convert", "-U", "-O", "raw", str(path), str(raw))
    assert out.returncode == 0, out.stderr
    return raw.read_bytes()


async def test_default_cache_uses_whole_tables(tmp_path: Path) -> None:
    img = await amake(tmp_path / "d.qcow2", "1G")
    daemon = Daemon()
    await asyncio.sleep(0)  # the setup above and the open below: two callbacks
    edge = await open_node(daemon, img, False)
    drv = qcow2_of(edge)
    assert drv.cache_config is not None
    assert (drv.cache_config.l2_slice_size, drv.cache_config.l2_entries) == (64 * KiB, 2)
    await close_node(daemon, edge)


# --- cache-clean-interval -----------------------------------------------------------------


async def test_cache_clean_interval_drops_unused_tables(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    # 512-byte clusters: an L2 table maps 32 KiB, so reading 256 KiB loads 8 of them.
    img = await amake(tmp_path / "i.qcow2", "2M", "cluster_size=512", io_cmds=("write -P 5 0 1M",))
    daemon = Daemon()
    await asyncio.sleep(0)  # the setup above and the open below: two callbacks
    edge = await open_node(daemon, img, True, **{"cache-clean-interval": 5})
    drv = qcow2_of(edge)
    meta = drv.meta
    assert meta is not None
    loop = asyncio.get_running_loop()
    timer = drv._clean_timer
    assert timer is not None and 4.5 < timer.when() - loop.time() <= 5.0
    assert await io.pread(edge, 0, 256 * KiB) == b"\5" * (256 * KiB)
    loaded = len(meta.l2_cache)
    assert loaded == 8
    assert drv.clean_caches() == 0  # no interval has passed
    fake_clock.advance(5 * SEC)
    assert drv.clean_caches() == 0  # all used since the cleaner started
    await io.pread(edge, 0, 512)  # keeps the first table in use
    await io.pwrite(edge, MiB, b"\7" * 512)  # allocates: a dirty table stays whatever happens
    fake_clock.advance(4 * SEC)
    assert drv.clean_caches() == 0  # less than an interval since the last sweep
    fake_clock.advance(1 * SEC)
    dropped = drv.clean_caches()
    assert dropped >= loaded - 2  # every L2 table but the two used ones (and refblocks)
    assert 0 < len(meta.l2_cache) <= 2
    assert meta.l2_cache.has_dirty
    # Data is still there: tables come back from disk.
    assert await io.pread(edge, 128 * KiB, 512) == b"\5" * 512
    assert await io.pread(edge, MiB, 512) == b"\7" * 512
    await close_node(daemon, edge)
    assert drv._clean_timer is None
    out = await asyncio.to_thread(sh, "qemu-img", "check", str(img))
    assert out.returncode == 0, out.stdout + out.stderr


async def test_cache_clean_interval_default_and_zero(tmp_path: Path) -> None:
    img = await amake(tmp_path / "z.qcow2", "1M")
    loop = asyncio.get_running_loop()
    daemon = Daemon()
    await asyncio.sleep(0)  # the setup above and the open below: two callbacks
    edge = await open_node(daemon, img, False)
    timer = qcow2_of(edge)._clean_timer
    assert timer is not None and 599 < timer.when() - loop.time() <= 600  # qsd's default
    await close_node(daemon, edge)
    assert timer.cancelled()
    edge = await open_node(daemon, img, False, **{"cache-clean-interval": 0})
    drv = qcow2_of(edge)
    assert drv._clean_timer is None and drv.clean_caches() == 0
    await close_node(daemon, edge)


# --- first allocation ---------------------------------------------------------------------


async def test_first_allocation_writes_only_the_data(tmp_path: Path) -> None:
    # Clusters allocated past the end of the file are not padded with written zeroes: the
    # file stays sparse. A cluster freed inside the file is reused with a full write.
    img = await amake(tmp_path / "f.qcow2", "16M", io_cmds=("write -P 9 0 128k",))
    # Zero pages mapped on first touch: a bytearray's 16 MiB memset took 63-87 ms on a fresh
    # VM, over the callback limit (in a thread too: it holds the GIL meanwhile).
    expected = mmap.mmap(-1, 16 * MiB)
    expected[: 128 * KiB] = b"\x09" * (128 * KiB)
    daemon = Daemon()
    await asyncio.sleep(0)  # the setup above and the open below: two callbacks
    edge = await open_node(daemon, img, True, discard="unmap", **{"pass-discard-request": False})
    # Frees a host cluster inside the file without discarding it in the file: it still holds
    # 0x09 bytes, and the next allocation reuses it, so that one must be written whole.
    await io.pwrite_zeroes(edge, 64 * KiB, 64 * KiB, may_unmap=True)
    expected[64 * KiB : 128 * KiB] = bytes(64 * KiB)
    await io.flush(edge)
    before = img.stat().st_blocks * 512
    writes = [(c * 64 * KiB * 5 % (12 * MiB) + 8 * KiB, 4096) for c in range(1, 33)]
    writes += [(13 * MiB + 3 * KiB, MiB), (15 * MiB + 60 * KiB, 4 * KiB), (3 * MiB - 512, 1024)]
    for n, (pos, length) in enumerate(writes):
        payload = bytes([n + 1]) * length
        await io.pwrite(edge, pos, payload)
        expected[pos : pos + length] = payload
    for pos, length in writes:
        assert (
            await io.pread(edge, pos - 512, length + 1024)
            == expected[pos - 512 : pos + length + 512]
        )
    await close_node(daemon, edge)
    grown = img.stat().st_blocks * 512 - before
    # 35 clusters touched: 2.2 MiB if padded; the data, tails and metadata are far less.
    assert grown < MiB + 35 * 16 * KiB, grown
    out = await asyncio.to_thread(sh, "qemu-img", "check", str(img))
    assert out.returncode == 0, out.stdout + out.stderr
    assert await asyncio.to_thread(lambda: read_raw(img) == expected[:])
