"""qcow2 driver against images made by qemu-img/qemu-io: reads match `qemu-img convert -O raw`,
writes leave images that `qemu-img check` finds clean and `qemu-img compare` finds equal."""

from __future__ import annotations

import asyncio
import errno
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20


class FakeExport:
    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _create(path: Path, size: str, *opts: str, backing: Path | None = None) -> Path:
    cmd = ["qemu-img", "create", "-f", "qcow2"]
    if opts:
        cmd += ["-o", ",".join(opts)]
    if backing is not None:
        cmd += ["-b", str(backing), "-F", "qcow2"]
    cmd += [str(path), size]
    out = sh(*cmd)
    assert out.returncode == 0, out.stderr
    return path


def _qemu_io(path: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for cmd in cmds:
        args += ["-c", cmd]
    out = sh(*args, str(path))
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout + out.stderr


def _to_raw(path: Path) -> bytes:
    raw = path.with_suffix(".raw")
    out = sh("qemu-img", "convert", "-U", "-O", "raw", str(path), str(raw))
    assert out.returncode == 0, out.stderr
    return raw.read_bytes()


async def open_node(daemon: Daemon, path: Path, write: bool = False, **extra: Any) -> BdrvChild:
    opts: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": "q",
        "file": {"driver": "file", "filename": str(path)},
    }
    opts.update(extra)
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


async def read_all(edge: BdrvChild) -> bytes:
    size = io.length(edge)
    out = bytearray()
    for pos in range(0, size, MiB):
        out += await io.pread(edge, pos, min(MiB, size - pos))
    return bytes(out)


def _check_clean(path: Path) -> None:
    out = sh("qemu-img", "check", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


async def create(*args: Any, **kw: Any) -> Path:
    return await asyncio.to_thread(_create, *args, **kw)


async def qemu_io(*args: Any) -> None:
    await asyncio.to_thread(_qemu_io, *args)


async def to_raw(path: Path) -> bytes:
    return await asyncio.to_thread(_to_raw, path)


async def check_clean(path: Path) -> None:
    await asyncio.to_thread(_check_clean, path)


async def ash(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(sh, *args)


@pytest.fixture(scope="module", autouse=True)
def _warm_models(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the lazily generated schema models outside the tests' event loops."""
    img = _create(tmp_path_factory.mktemp("warm") / "w.qcow2", "1M")

    async def warm() -> None:
        daemon = Daemon()
        edge = await open_node(daemon, img, write=True)
        await daemon.run_command("query-named-block-nodes", {})
        await io.pwrite(edge, 0, b"x")
        await close_node(daemon, edge)

    asyncio.run(warm())


WRITES = [
    "write -P 0x11 0 64k",
    "write -P 0x22 100k 7k",
    "write -P 0x33 1020k 8k",
    "write -z 300k 200k",
    "write -P 0x44 2M 1M",
    "write -P 0x55 3583k 512",
]


@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("cluster_size=512",),
        ("cluster_size=4096", "refcount_bits=1"),
        ("cluster_size=2M", "refcount_bits=64"),
        ("compat=0.10",),
        ("extended_l2=on",),
        ("extended_l2=on", "cluster_size=2M"),
        ("lazy_refcounts=on", "refcount_bits=8"),
        ("cluster_size=16k", "refcount_bits=2"),
        ("refcount_bits=32", "cluster_size=1k"),
        ("refcount_bits=4",),
    ],
)
async def test_reads_match_qemu(tmp_path: Path, opts: tuple[str, ...]) -> None:
    img = await create(tmp_path / "a.qcow2", "4M", *opts)
    await qemu_io(img, *WRITES)
    daemon = Daemon()
    edge = await open_node(daemon, img)
    assert await read_all(edge) == await to_raw(img)
    await close_node(daemon, edge)


async def test_compressed_zlib_and_zstd(tmp_path: Path) -> None:
    src = await create(tmp_path / "s.qcow2", "4M")
    await qemu_io(src, "write -P 0x61 0 1M", "write -P 0x62 1500k 300k")
    for extra in ([], ["-o", "compression_type=zstd"]):
        dst = tmp_path / "c.qcow2"
        out = await ash("qemu-img", "convert", "-c", "-O", "qcow2", *extra, str(src), str(dst))
        assert out.returncode == 0, out.stderr
        daemon = Daemon()
        edge = await open_node(daemon, dst)
        assert await read_all(edge) == await to_raw(src)
        await close_node(daemon, edge)


async def test_backing_chain_depth_3(tmp_path: Path) -> None:
    base = await create(tmp_path / "base.qcow2", "4M")
    await qemu_io(base, "write -P 0x01 0 4M")
    mid = await create(tmp_path / "mid.qcow2", "4M", backing=base)
    await qemu_io(mid, "write -P 0x02 1M 1M", "write -z 200k 100k")
    top = await create(tmp_path / "top.qcow2", "4M", backing=mid)
    await qemu_io(top, "write -P 0x03 1536k 64k", "discard 3M 64k")
    daemon = Daemon()
    edge = await open_node(daemon, top)
    assert await read_all(edge) == await to_raw(top)
    infos = await daemon.run_command("query-named-block-nodes", {})
    q = next(i for i in infos if i["node-name"] == "q")
    assert q["image"]["backing-filename"] == str(mid)
    assert q["image"]["backing-filename-format"] == "qcow2"
    await close_node(daemon, edge)


async def test_shorter_backing_reads_zeroes(tmp_path: Path) -> None:
    base = await create(tmp_path / "base.qcow2", "1M")
    await qemu_io(base, "write -P 0x07 0 1M")
    top = await create(tmp_path / "top.qcow2", "3M", backing=base)
    daemon = Daemon()
    edge = await open_node(daemon, top)
    data = await read_all(edge)
    assert data == b"\x07" * MiB + bytes(2 * MiB)
    await close_node(daemon, edge)


async def test_backing_null_and_explicit(tmp_path: Path) -> None:
    base = await create(tmp_path / "base.qcow2", "1M")
    await qemu_io(base, "write -P 0x07 0 1M")
    top = await create(tmp_path / "top.qcow2", "1M", backing=base)
    daemon = Daemon()
    edge = await open_node(daemon, top, backing=None)
    assert await read_all(edge) == bytes(MiB)
    await close_node(daemon, edge)


async def test_snapshots_listed_and_read_active(tmp_path: Path) -> None:
    img = await create(tmp_path / "s.qcow2", "2M")
    await qemu_io(img, "write -P 0x0a 0 1M")
    assert (await ash("qemu-img", "snapshot", "-c", "snap1", str(img))).returncode == 0
    await qemu_io(img, "write -P 0x0b 512k 1M")
    daemon = Daemon()
    edge = await open_node(daemon, img, write=True)
    infos = await daemon.run_command("query-named-block-nodes", {})
    q = next(i for i in infos if i["node-name"] == "q")
    assert [s["name"] for s in q["image"]["snapshots"]] == ["snap1"]
    assert await read_all(edge) == await to_raw(img)
    # Writing over snapshot-shared clusters copies them first.
    await io.pwrite(edge, 4096, b"\x0c" * 8192)
    await io.pwrite(edge, 1536 * 1024, b"\x0d" * 4096)
    await close_node(daemon, edge)
    await check_clean(img)
    raw = await to_raw(img)
    assert raw[4096 : 4096 + 8192] == b"\x0c" * 8192
    assert raw[:4096] == b"\x0a" * 4096
    out = await ash("qemu-img", "snapshot", "-a", "snap1", str(img))
    assert out.returncode == 0, out.stderr
    assert (await to_raw(img))[:MiB] == b"\x0a" * MiB
    await check_clean(img)


OPS: list[tuple[str, int, int, int]] = [
    ("w", 0, 4096, 0x21),
    ("w", 65536 - 100, 300, 0x22),
    ("w", 123456, 200000, 0x23),
    ("z", 500000, 70000, 0),
    ("w", 1 * MiB, 1 * MiB, 0x24),
    ("z", 1 * MiB + 65536, 3 * 65536, 0),
    ("d", 1 * MiB + 4 * 65536, 2 * 65536, 0),
    ("w", 1 * MiB + 5 * 65536 + 10, 33, 0x25),
    ("w", 3 * MiB + 511, 1, 0x26),
    ("z", 3 * MiB, 1 * MiB, 0),
    ("w", 4 * MiB - 4096, 4096, 0x27),
    ("w", 2 * MiB + 16384, 16384 * 3, 0x28),
    ("z", 2 * MiB + 16384 + 512, 16384, 0),
]


async def apply_ops(edge: BdrvChild, raw: bytearray) -> None:
    for op, offset, length, pattern in OPS:
        if op == "w":
            payload = bytes([pattern]) * length
            await io.pwrite(edge, offset, payload)
            raw[offset : offset + length] = payload
        elif op == "z":
            await io.pwrite_zeroes(edge, offset, length, may_unmap=True)
            raw[offset : offset + length] = bytes(length)
        else:
            # Discard is advisory: whole clusters read zeroes afterwards, others may not.
            await io.pdiscard(edge, offset, length)
            after = bytes(await io.pread(edge, offset, length))
            old = bytes(raw[offset : offset + length])
            for pos in range(0, length, 512):
                assert after[pos : pos + 512] in (old[pos : pos + 512], bytes(512))
            raw[offset : offset + length] = after


@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("cluster_size=512",),
        ("cluster_size=4096", "refcount_bits=1"),
        ("compat=0.10",),
        ("extended_l2=on",),
        ("lazy_refcounts=on",),
        ("cluster_size=2M", "refcount_bits=64"),
    ],
)
@pytest.mark.parametrize("with_backing", [False, True])
async def test_writes_check_clean_and_compare(
    tmp_path: Path, opts: tuple[str, ...], with_backing: bool
) -> None:
    backing = None
    raw = bytearray(4 * MiB)
    if with_backing:
        backing = await create(tmp_path / "b.qcow2", "4M")
        await qemu_io(backing, "write -P 0x99 0 4M")
        raw[:] = b"\x99" * (4 * MiB)
    img = await create(tmp_path / "a.qcow2", "4M", *opts, backing=backing)
    await qemu_io(img, "write -P 0x41 64k 64k", "write -P 0x42 1M 128k")
    raw[65536 : 2 * 65536] = b"\x41" * 65536
    raw[MiB : MiB + 131072] = b"\x42" * 131072
    daemon = Daemon()
    edge = await open_node(daemon, img, write=True, discard="unmap")
    await apply_ops(edge, raw)
    assert await read_all(edge) == bytes(raw)
    await io.flush(edge)
    await close_node(daemon, edge)
    await check_clean(img)
    assert await to_raw(img) == bytes(raw)


async def test_many_allocations_grow_refcount_structures(tmp_path: Path) -> None:
    # 512-byte clusters with 64-bit refcounts: one refblock covers 32 KiB of the file and the
    # one-cluster refcount table 2 MiB, so filling 8 MiB forces new refblocks and a move of
    # the refcount table to a larger one.
    img = await create(tmp_path / "g.qcow2", "8M", "cluster_size=512", "refcount_bits=64")
    before = img.read_bytes()[48:60]
    daemon = Daemon()
    edge = await open_node(daemon, img, write=True)
    raw = bytearray(8 * MiB)
    for i in range(0, 8 * MiB, 12 * 1024):
        payload = bytes([i // 4096 % 251 + 1]) * 4096
        await io.pwrite(edge, i, payload)
        raw[i : i + 4096] = payload
    await close_node(daemon, edge)
    assert img.read_bytes()[48:60] != before
    await check_clean(img)
    assert await to_raw(img) == raw


async def test_not_qcow2_and_loops(tmp_path: Path) -> None:
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(1 << 20))
    daemon = Daemon()
    with pytest.raises(QmpError) as info:
        await open_node(daemon, raw)
    assert info.value.desc == "Image is not in qcow2 format"
    a = tmp_path / "a.qcow2"
    b = tmp_path / "b.qcow2"
    await create(a, "1M")
    await create(b, "1M", backing=a)
    out = await ash("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", str(b), str(a))
    assert out.returncode == 0, out.stderr
    with pytest.raises(QmpError) as info:
        await open_node(daemon, b)
    assert "creates an infinite loop" in info.value.desc
    assert await daemon.run_command("query-named-block-nodes", {}) == []


async def _first_write_is_fatal(img: Path, offset: int, data: bytes) -> dict[str, Any]:
    """Open `img` read-write, write `data` at `offset`: EIO and a fatal corruption event,
    whose payload is returned."""
    from storage_daemon.blockdev.drivers.qcow2 import driver as qdrv

    events: list[tuple[str, dict[str, Any]]] = []
    qdrv.set_event_sink(lambda name, payload: events.append((name, payload)))
    try:
        daemon = Daemon()
        edge = await open_node(daemon, img, write=True)
        with pytest.raises(OSError) as err:
            await io.pwrite(edge, offset, data)
        assert err.value.errno == 5
        assert events[0][0] == "BLOCK_IMAGE_CORRUPTED"
        assert events[0][1]["fatal"] is True
        with pytest.raises(OSError):
            await io.pread(edge, 0, 512)
        await close_node(daemon, edge)
    finally:
        qdrv.set_event_sink(None)
    return events[0][1]


async def test_write_over_metadata_marks_corrupt_and_fences(tmp_path: Path) -> None:
    import struct

    img = await create(tmp_path / "c.qcow2", "1M")
    await qemu_io(img, "write -P 0x01 0 64k")
    data = bytearray(img.read_bytes())
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    # Point guest cluster 0 at the L1 table (COPIED, so the write goes in place).
    struct.pack_into(">Q", data, l2_offset, l1_offset | (1 << 63))
    img.write_bytes(bytes(data))
    event = await _first_write_is_fatal(img, 0, b"\xff" * 512)
    assert event["msg"] == "Preventing invalid write on metadata (overlaps with active L1 table)"
    assert struct.unpack_from(">Q", img.read_bytes(), 72)[0] & 2  # corrupt bit persisted
    with pytest.raises(QmpError) as info:
        await open_node(Daemon(), img, write=True)
    assert info.value.desc == "qcow2: Image is corrupt; cannot be opened read/write"


@pytest.mark.parametrize(
    ("victim", "message"),
    [
        ("header", "Preventing invalid allocation of L2 table at offset 0"),
        ("refcount-table", "Preventing invalid write on metadata (overlaps with refcount table)"),
    ],
)
async def test_metadata_counted_free_is_never_allocated_over(
    tmp_path: Path, victim: str, message: str
) -> None:
    """A refblock that calls the header's (or the refcount table's) cluster free: the next
    allocation picks it; a new L2 table must not be written there (qsd's messages, fatal)."""
    import struct

    img = await create(tmp_path / "c.qcow2", "1G")  # 64 KiB clusters: one L2 per 512 MiB
    data = bytearray(img.read_bytes())
    reftable = struct.unpack_from(">Q", data, 48)[0]
    refblock = struct.unpack_from(">Q", data, reftable)[0]
    cluster = 0 if victim == "header" else reftable >> 16
    struct.pack_into(">H", data, refblock + 2 * cluster, 0)
    img.write_bytes(bytes(data))
    before = img.read_bytes()[: 2 << 16]  # the header and refcount table clusters
    event = await _first_write_is_fatal(img, 600 << 20, b"\x5a" * 65536)  # a second L2
    assert event["msg"] == message
    after = img.read_bytes()
    assert after[:72] == before[:72]  # the header is intact (only the corrupt bit may change)
    assert after[reftable : reftable + 16] == before[reftable : reftable + 16]


async def test_fast_zero_of_part_of_a_data_cluster_is_enotsup(tmp_path: Path) -> None:
    """NBD's FAST_ZERO (BDRV_REQ_NO_FALLBACK): qcow2 zeroes part of a cluster only by
    flagging a whole cluster that reads as zeroes anyway; over data qsd answers ENOTSUP
    rather than writing zeroes. Without the flag both fall back to writing them."""
    img = await create(tmp_path / "z.qcow2", "1M")
    await qemu_io(img, "write -P 0xee 0 4k")
    daemon = Daemon()
    edge = await open_node(daemon, img, write=True)
    try:
        with pytest.raises(OSError) as err:
            await io.pwrite_zeroes(edge, 0, 1, fast_only=True)
        assert err.value.errno == errno.ENOTSUP
        assert await io.pread(edge, 0, 2) == b"\xee\xee"  # nothing written
        await io.pwrite_zeroes(edge, 65536, 1, fast_only=True)  # an empty cluster: flagged
        await io.pwrite_zeroes(edge, 0, 1)
        assert await io.pread(edge, 0, 2) == b"\x00\xee"
    finally:
        await close_node(daemon, edge)
    await check_clean(img)
