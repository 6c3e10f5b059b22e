"""qcow2 compressed writes and the compress filter, in process, checked by qemu-img/qemu-io.

Component ring. Every image written here must pass `qemu-img check` and `qemu-img compare`
with the data written; single-cluster writes must produce the very bytes qemu-io's own
compressed writes (`write -c`) produce. Hostile cases: streams spanning two host clusters,
overwrites of compressed clusters that share their host cluster, a freed and reused packing
cluster; and the write order that keeps a crash harmless (refcount and data before L2).
"""

from __future__ import annotations

import asyncio
import errno
import random
import shutil
import struct
import subprocess
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.compress import pwrite_compressed
from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.compressed import (
    compress_cluster,
    compressed_descriptor,
)
from storage_daemon.blockdev.drivers.qcow2.mapping import decompress
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="needs qemu-img and qemu-io",
)

KiB = 1024


class FakeUser:
    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)


async def ash(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(sh, *args)


async def create(path: Path, size: int, *opts: str) -> Path:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        cmd += ["-o", ",".join(opts)]
    out = await ash(*cmd, str(path), str(size))
    assert out.returncode == 0, out.stderr
    return path


async def check(path: Path) -> str:
    out = await ash("qemu-img", "check", "-U", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


async def compare(path: Path, expected: bytes | bytearray) -> None:
    raw = path.with_suffix(".expected")
    raw.write_bytes(expected)
    out = await ash("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(path), str(raw))
    assert out.returncode == 0, out.stdout + out.stderr


async def open_node(
    daemon: Daemon, path: Path, extra: dict[str, Any] | None = None, node: str = "q"
) -> tuple[BdrvChild, Any]:
    opts: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": node,
        "file": {"driver": "file", "filename": str(path)},
        **(extra or {}),
    }
    await daemon.run_command("blockdev-add", opts)
    found = daemon.graph.lookup(node)
    edge = daemon.graph.attach(FakeUser(), found, "root", ChildRole.PRIMARY)
    daemon.graph.set_edge_perm(edge, Perm.CONSISTENT_READ | Perm.WRITE, PERM_ALL)
    return edge, found.driver


async def close_node(daemon: Daemon, edge: BdrvChild, node: str = "q") -> None:
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": node})


def cluster_data(rng: random.Random, cs: int, noise: int) -> bytes:
    """A cluster whose first `noise` bytes are random (incompressible) and the rest a
    pattern: the compressed size grows with `noise`."""
    noise = min(noise, cs)
    return rng.randbytes(noise) + bytes([noise % 251 + 1]) * (cs - noise)


def l2_entries(path: Path, count: int) -> list[int]:
    """The first `count` L2 entries of the first L2 table (standard entries)."""
    data = path.read_bytes()
    cs = 1 << int.from_bytes(data[20:24], "big")
    l1 = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1 : l1 + 8], "big") & fmt.L1E_OFFSET_MASK
    ext = bool(int.from_bytes(data[72:80], "big") & fmt.INCOMPAT_EXTL2)
    step = 16 if ext else 8
    assert l2 and count * step <= cs
    return [int.from_bytes(data[l2 + i * step : l2 + i * step + 8], "big") for i in range(count)]


# --- pure helpers -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    cluster_bits=st.integers(9, 21),
    host=st.integers(1 << 9, 1 << 40),
    size_frac=st.floats(0.0, 1.0),
)
def test_descriptor_round_trips_through_the_reader(
    cluster_bits: int, host: int, size_frac: float
) -> None:
    cs = 1 << cluster_bits
    size = max(1, min(cs - 1, int(size_frac * cs)))
    raw = compressed_descriptor(host, size, cluster_bits)
    assert raw & fmt.OFLAG_COMPRESSED and not raw & fmt.OFLAG_COPIED
    start, span = fmt.compressed_span(raw, cluster_bits)
    assert start == host
    assert size <= span < size + 512  # the reader reads the whole stream, at most a sector more


@pytest.mark.parametrize("zstd", [False, True])
def test_compress_cluster_round_trips_and_refuses_growth(zstd: bool) -> None:
    rng = random.Random(7)
    cs = 64 * KiB
    for noise in (0, 1000, 30000, 60000):
        data = cluster_data(rng, cs, noise)
        out = compress_cluster(data, cs - 1, zstd)
        assert out is not None and len(out) < cs
        assert decompress(out, cs, zstd) == data
    assert compress_cluster(rng.randbytes(cs), cs - 1, zstd) is None


@pytest.mark.parametrize("zstd", [False, True])
def test_a_stream_longer_than_a_cluster_is_never_inflated_whole(zstd: bool) -> None:
    """A hostile image's compressed cluster may expand to far more than a cluster (a few KiB
    to gigabytes): no more memory than a cluster's worth is used. As qsd: zstd's longer
    frame is EIO; deflate fills the cluster and ignores the rest (qcow2 only knows the
    stream's length to a sector, so qsd takes the cluster once it is full)."""
    import tracemalloc

    import zstandard

    cs = 64 * KiB
    if zstd:
        bomb = zstandard.ZstdCompressor().compress(bytes(256 * 1024 * KiB))
    else:
        packer = zlib.compressobj(9, zlib.DEFLATED, -12)
        bomb = packer.compress(bytes(256 * 1024 * KiB)) + packer.flush()
    assert len(bomb) < 512 * KiB
    tracemalloc.start()
    try:
        if zstd:
            with pytest.raises(OSError) as err:
                decompress(bomb, cs, zstd)
            assert err.value.errno == errno.EIO
        else:
            assert decompress(bomb, cs, zstd) == bytes(cs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * KiB


def test_zlib_stream_is_raw_deflate_with_a_4k_window() -> None:
    data = b"abc" * 20000
    out = compress_cluster(data, len(data), False)
    assert out is not None
    assert zlib.decompressobj(-12).decompress(out) == data  # no zlib header, wbits 12


# --- the driver's compressed writes -------------------------------------------------------

OPTS = [
    (),
    ("cluster_size=512",),
    ("cluster_size=4096", "refcount_bits=1"),
    ("compression_type=zstd",),
    ("extended_l2=on",),
    ("compat=0.10",),
    ("cluster_size=16k", "refcount_bits=64", "compression_type=zstd"),
]


@pytest.mark.parametrize("opts", OPTS, ids=lambda o: ",".join(o) or "default")
async def test_single_cluster_writes_equal_qemu_io_bytes(
    tmp_path: Path, opts: tuple[str, ...]
) -> None:
    """Cluster by cluster, our image and qemu-io's are byte-identical (same packing, same
    streams, same fallback to normal clusters), and both are clean."""
    cs = 64 * KiB
    for opt in opts:
        if opt.startswith("cluster_size="):
            cs = int(opt.split("=")[1].replace("k", "")) * (KiB if "k" in opt else 1)
    size = 24 * cs
    ours = await create(tmp_path / "ours.qcow2", size, *opts)
    theirs = await create(tmp_path / "theirs.qcow2", size, *opts)
    rng = random.Random(len(opts) * 31 + cs)
    noises = [0, cs // 2, cs - cs // 64, cs, cs * 9 // 10, cs // 3, 1, cs * 9 // 10, cs * 9 // 10]
    order = [3, 0, 7, 1, 2, 5, 11, 9, 23]
    writes = [(idx * cs, cluster_data(rng, cs, n)) for idx, n in zip(order, noises, strict=True)]
    expected = bytearray(size)
    cmds: list[str] = []
    for number, (offset, data) in enumerate(writes):
        chunk = tmp_path / f"chunk{number}"
        chunk.write_bytes(data)
        cmds += ["-c", f"write -c -s {chunk} {offset} {cs}"]
        expected[offset : offset + cs] = data
    out = await ash("qemu-io", "-f", "qcow2", *cmds, str(theirs))
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout + out.stderr

    daemon = Daemon()
    edge, _drv = await open_node(daemon, ours)
    for offset, data in writes:
        await pwrite_compressed(edge, offset, data)
    assert bytes(await io.pread(edge, 0, size)) == expected
    await close_node(daemon, edge)
    report = await check(ours)
    assert "compressed clusters" in report and "0.00% compressed" not in report
    await compare(ours, expected)
    assert ours.read_bytes() == theirs.read_bytes()


async def test_refusals_and_the_partial_last_cluster(tmp_path: Path) -> None:
    cs = 64 * KiB
    size = 3 * cs + 36 * KiB  # the last cluster is partial
    img = await create(tmp_path / "a.qcow2", size)
    rng = random.Random(3)
    daemon = Daemon()
    edge, _drv = await open_node(daemon, img)
    expected = bytearray(size)
    for offset, length, code in (
        (512, cs, errno.EINVAL),  # unaligned start
        (0, cs + 512, errno.EINVAL),  # unaligned end before EOF
        (0, 100, errno.EINVAL),
    ):
        with pytest.raises(OSError) as info:
            await pwrite_compressed(edge, offset, bytes(length))
        assert info.value.errno == code
    with pytest.raises(OSError) as info:
        await pwrite_compressed(edge, 2 * cs, bytes(2 * cs))  # past EOF
    assert info.value.errno == errno.EIO
    # A shorter last cluster at the image's end is allowed (padded with zeroes).
    tail = cluster_data(rng, size - 3 * cs, 1000)
    await pwrite_compressed(edge, 3 * cs, tail)
    expected[3 * cs :] = tail
    # Never over a cluster with a host offset: normal, compressed (EIO); over zeroes: fine.
    await io.pwrite(edge, 0, b"n" * 4096)
    expected[:4096] = b"n" * 4096
    for offset in (0, 3 * cs):
        with pytest.raises(OSError) as info:
            await pwrite_compressed(edge, offset, bytes(cs if offset == 0 else size - offset))
        assert info.value.errno == errno.EIO
    await io.pwrite_zeroes(edge, cs, cs)
    data = cluster_data(rng, cs, 5000)
    await pwrite_compressed(edge, cs, data)
    expected[cs : 2 * cs] = data
    # Incompressible data is an ordinary write, which may go in place.
    noise = rng.randbytes(cs)
    await pwrite_compressed(edge, 2 * cs, noise)
    await pwrite_compressed(edge, 2 * cs, noise[::-1])
    expected[2 * cs : 3 * cs] = noise[::-1]
    # Several clusters at once.
    assert bytes(await io.pread(edge, 0, size)) == expected
    await close_node(daemon, edge)
    await check(img)
    await compare(img, expected)
    entries = l2_entries(img, 4)
    assert [bool(e & fmt.OFLAG_COMPRESSED) for e in entries] == [False, True, False, True]


async def test_data_file_images_refuse_compression(tmp_path: Path) -> None:
    img = await create(tmp_path / "a.qcow2", 1 << 20, f"data_file={tmp_path / 'a.df'}")
    daemon = Daemon()
    edge, _ = await open_node(
        daemon, img, {"data-file": {"driver": "file", "filename": str(tmp_path / "a.df")}}
    )
    with pytest.raises(OSError) as info:
        await pwrite_compressed(edge, 0, bytes(64 * KiB))
    assert info.value.errno == errno.ENOTSUP
    await close_node(daemon, edge)


async def test_streams_spanning_host_clusters_and_overwrites_of_shared_ones(
    tmp_path: Path,
) -> None:
    cs = 64 * KiB
    count = 12
    size = count * cs
    img = await create(tmp_path / "a.qcow2", size)
    rng = random.Random(11)
    daemon = Daemon()
    edge, _drv = await open_node(daemon, img)
    expected = bytearray(size)
    for index in range(count):
        data = cluster_data(rng, cs, cs * 6 // 10 if index % 2 else cs // 5)
        await pwrite_compressed(edge, index * cs, data)
        expected[index * cs : (index + 1) * cs] = data
    await io.flush(edge)
    entries = l2_entries(img, count)
    spans = [fmt.compressed_span(e, 16) for e in entries]
    crossing = [i for i, (host, span) in enumerate(spans) if host // cs != (host + span - 1) // cs]
    assert crossing, "no stream crossed a host cluster boundary"
    sharing = {
        i for i, (host, _) in enumerate(spans) for j, (h2, _) in enumerate(spans)
        if i != j and host // cs == h2 // cs
    }  # fmt: skip
    assert sharing
    # Partly overwrite a spanning cluster and a sharing one: they become normal clusters, the
    # neighbours that share their host clusters keep reading correctly.
    for index in (crossing[0], min(sharing - {crossing[0]})):
        pos = index * cs + 4096
        await io.pwrite(edge, pos, b"w" * 8192)
        expected[pos : pos + 8192] = b"w" * 8192
    assert bytes(await io.pread(edge, 0, size)) == expected
    await io.flush(edge)
    await check(img)
    await compare(img, expected)
    # Overwrite every remaining compressed cluster: all their host clusters are freed.
    for index in range(count):
        await io.pwrite(edge, index * cs, expected[index * cs : (index + 1) * cs])
    await close_node(daemon, edge)
    report = await check(img)
    assert "0.00% compressed" in report
    await compare(img, expected)
    out = await ash("qemu-img", "check", "--output=json", str(img))
    assert '"leaks"' not in out.stdout  # nothing leaked


async def test_a_freed_packing_cluster_is_not_appended_to(tmp_path: Path) -> None:
    """The partly used host cluster compressed writes pack into is freed (its only stream
    overwritten) and reused for a normal cluster; the next compressed stream must go to a
    fresh host cluster, not into the normal cluster's data."""
    cs = 64 * KiB
    size = 8 * cs
    img = await create(tmp_path / "a.qcow2", size)
    rng = random.Random(5)
    daemon = Daemon()
    edge, drv = await open_node(daemon, img)
    expected = bytearray(size)
    first = cluster_data(rng, cs, 2000)
    await pwrite_compressed(edge, 0, first)
    packing = drv.meta.free_byte_offset >> 16
    assert packing
    normal = bytes([7]) * cs
    await io.pwrite(edge, 0, normal)  # the stream's cluster is freed at the flush
    await io.flush(edge)
    assert drv.meta.free_byte_offset == 0
    other = rng.randbytes(cs)
    await io.pwrite(edge, 3 * cs, other)  # reuses the freed host cluster
    await io.flush(edge)
    assert l2_entries(img, 4)[3] & fmt.L2E_OFFSET_MASK == packing << 16
    second = cluster_data(rng, cs, 2000)
    await pwrite_compressed(edge, 5 * cs, second)
    expected[:cs] = normal
    expected[3 * cs : 4 * cs] = other
    expected[5 * cs : 6 * cs] = second
    assert bytes(await io.pread(edge, 0, size)) == expected
    await close_node(daemon, edge)
    await check(img)
    await compare(img, expected)


async def test_refcount_and_data_are_stable_before_the_l2_entry(tmp_path: Path) -> None:
    """Record the file node's writes and flushes: the L2 table naming a new compressed
    stream is written only after a flush that follows both the stream and its refblock."""
    cs = 64 * KiB
    img = await create(tmp_path / "a.qcow2", 16 * cs)
    daemon = Daemon()
    edge, drv = await open_node(daemon, img)
    await io.pwrite(edge, 0, b"x")  # the L2 table exists: only entries change below
    await io.flush(edge)
    file_drv = daemon.graph.lookup("q").children[0].node.driver
    log: list[tuple[str, int, int]] = []
    real_write: Callable[..., Awaitable[None]] = file_drv.pwritev
    real_flush: Callable[[], Awaitable[None]] = file_drv.flush

    async def pwritev(offset: int, data: Any, fua: bool) -> None:
        log.append(("write", offset, len(data)))
        await real_write(offset, data, fua)

    async def flush() -> None:
        log.append(("flush", 0, 0))
        await real_flush()

    file_drv.pwritev = pwritev  # type: ignore[method-assign]
    file_drv.flush = flush  # type: ignore[method-assign]
    try:
        await pwrite_compressed(edge, 5 * cs, cluster_data(random.Random(1), cs, 3000))
        await io.flush(edge)
    finally:
        del file_drv.pwritev
        del file_drv.flush
    meta = drv.meta
    l2_offset = meta.l1[0] & fmt.L1E_OFFSET_MASK
    refblock = meta.reftable[0] & fmt.REFT_OFFSET_MASK
    raw = l2_entries(img, 6)[5]
    host, _ = fmt.compressed_span(raw, 16)

    def first(kind_offset: Callable[[tuple[str, int, int]], bool]) -> int:
        return next(i for i, item in enumerate(log) if kind_offset(item))

    data_at = first(lambda e: e[0] == "write" and e[1] <= host < e[1] + e[2])
    refblock_at = first(lambda e: e[0] == "write" and e[1] == refblock)
    l2_at = first(lambda e: e[0] == "write" and e[1] == l2_offset)
    flush_between = [
        i for i, e in enumerate(log) if e[0] == "flush" and max(data_at, refblock_at) < i < l2_at
    ]
    assert flush_between, log
    await close_node(daemon, edge)
    await check(img)


# --- the compress filter ------------------------------------------------------------------


async def test_filter_turns_writes_into_compressed_clusters(tmp_path: Path) -> None:
    cs = 64 * KiB
    size = 8 * cs
    img = await create(tmp_path / "a.qcow2", size)
    daemon = Daemon()
    await daemon.run_command(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "q",
            "file": {"driver": "file", "filename": str(img)},
        },
    )
    await daemon.run_command("blockdev-add", {"driver": "compress", "node-name": "c", "file": "q"})
    node = daemon.graph.lookup("c")
    assert node.driver.request_alignment == cs
    edge = daemon.graph.attach(FakeUser(), node, "root", ChildRole.PRIMARY)
    daemon.graph.set_edge_perm(edge, Perm.CONSISTENT_READ | Perm.WRITE, PERM_ALL)
    expected = bytearray(size)
    # Unaligned writes are padded to whole clusters by the generic path (read-modify-write).
    await io.pwrite(edge, cs + 4096, b"a" * 4096)
    expected[cs + 4096 : cs + 8192] = b"a" * 4096
    await io.pwrite(edge, 3 * cs, b"b" * (2 * cs))
    expected[3 * cs : 5 * cs] = b"b" * (2 * cs)
    await io.pwrite(edge, 6 * cs + 100, b"c" * 100)
    expected[6 * cs + 100 : 6 * cs + 200] = b"c" * 100
    with pytest.raises(OSError) as info:  # a second write to a compressed cluster: qsd's EIO
        await io.pwrite(edge, cs, b"d" * 512)
    assert info.value.errno == errno.EIO
    await io.pwrite_zeroes(edge, 7 * cs, cs)  # zero writes pass through
    assert bytes(await io.pread(edge, 0, size)) == expected
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": "c"})
    await daemon.run_command("blockdev-del", {"node-name": "q"})
    report = await check(img)
    assert "4/8 = 50.00% allocated" in report and "100.00% compressed" in report
    await compare(img, expected)


async def test_filter_writers_need_whole_clusters(tmp_path: Path) -> None:
    img = await create(tmp_path / "a.qcow2", 100 * KiB)
    daemon = Daemon()
    await daemon.run_command(
        "blockdev-add",
        {
            "driver": "compress",
            "node-name": "c",
            "file": {"driver": "qcow2", "file": {"driver": "file", "filename": str(img)}},
        },
    )
    node = daemon.graph.lookup("c")
    edge = daemon.graph.attach(FakeUser(), node, "root", ChildRole.PRIMARY)
    with pytest.raises(QmpError) as info:
        daemon.graph.set_edge_perm(edge, Perm.CONSISTENT_READ | Perm.WRITE, PERM_ALL)
    assert info.value.desc == (
        "Cannot get 'write' permission without 'resize': "
        "Image size is not a multiple of request alignment"
    )
    daemon.graph.set_edge_perm(edge, Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, PERM_ALL)
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": "c"})


async def test_a_read_in_flight_never_caches_a_stream_freed_and_reallocated_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of a compressed cluster is held after fetching its stream; meanwhile the cluster
    is overwritten (its stream freed) and a new stream of the same length lands at the same
    host offset, so its L2 entry repeats the old one. The held read must not leave the old
    data in the reader's cache, where a read of the new cluster would find it."""
    from types import SimpleNamespace

    from storage_daemon.blockdev.drivers.qcow2 import mapping

    cs = 64 * KiB
    path = await create(tmp_path / "race.qcow2", 4 * cs)
    daemon = Daemon()
    edge, drv = await open_node(daemon, path)
    await pwrite_compressed(edge, 0, b"A" * cs)
    old_raw = (await drv.mapper.extent(0, cs)).raw
    host, _ = fmt.compressed_span(old_raw, drv.hdr.cluster_bits)

    fetched = asyncio.Event()
    release = asyncio.Event()
    held = False

    async def pread(child: BdrvChild, offset: int, length: int) -> Any:
        nonlocal held
        data = await io.pread(child, offset, length)
        if offset == host and not held:
            held = True
            fetched.set()
            await release.wait()
        return data

    monkeypatch.setattr(mapping, "io", SimpleNamespace(pread=pread))
    reader = asyncio.create_task(io.pread(edge, 0, 512))
    await fetched.wait()
    await io.pwrite(edge, 0, b"C" * cs)  # a new cluster; the compressed one is queued free
    await io.flush(edge)  # ... and freed
    await pwrite_compressed(edge, cs, b"B" * cs)
    assert (await drv.mapper.extent(cs, cs)).raw == old_raw  # the very same entry
    release.set()
    assert await reader == b"A" * 512  # it started before: the old data is its answer
    assert await io.pread(edge, cs, 512) == b"B" * 512
    assert await io.pread(edge, 0, 512) == b"C" * 512
    await close_node(daemon, edge)
    assert "No errors" in await check(path)


async def test_extended_l2_compressed_entry_with_a_bitmap_still_reads(tmp_path: Path) -> None:
    """The spec wants a compressed entry's subcluster bitmap 0; qsd ignores it when reading
    (only `qemu-img check` complains), so a stray bit is no reason for EIO or a corrupt mark."""
    raw = tmp_path / "t.raw"
    raw.write_bytes(b"\x11" * 65536)
    img = tmp_path / "el2c.qcow2"
    out = await ash(
        "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "extended_l2=on",
        str(raw), str(img),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = bytearray(img.read_bytes())
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00
    assert struct.unpack_from(">Q", data, l2)[0] & (1 << 62)  # compressed
    struct.pack_into(">Q", data, l2 + 8, 1)  # "subcluster 0 allocated"
    img.write_bytes(bytes(data))
    daemon = Daemon()
    edge, _ = await open_node(daemon, img)
    try:
        assert bytes(await io.pread(edge, 0, 65536)) == b"\x11" * 65536
    finally:
        await close_node(daemon, edge)
