"""The NBD server in process: exports through the QMP handlers, raw asyncio clients.

Component ring. What needs the daemon's insides or a short clock runs here: the handshake
time limit (shortened), node I/O errors turned into NBD error replies (a failing driver method
on one node), export deletion and server stop while requests are in flight, events, and the
unix socket file's removal. Every server started here is stopped by the test.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import os
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.qapi.runtime import command_args

# The schema visitor builds its tables on first use (~0.2 s): do it at import, not inside a
# test, whose event loop would be reported as blocked.
command_args("blockdev-add", {"driver": "null-co", "node-name": "warm-up"})
command_args("blockdev-add", {"driver": "qcow2", "node-name": "warm-up", "file": "f"})
importlib.import_module("storage_daemon.blockdev.drivers.qcow2.driver")
Daemon()  # imports every command module

IHAVEOPT = 0x49484156454F5054
SIMPLE, STRUCTURED = 0x67446698, 0x668E33EF
READ, WRITE, FLUSH, TRIM, ZEROES, BLOCK_STATUS = 0, 1, 3, 4, 6, 7
MiB = 1 << 20


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> Client:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def close(self) -> None:
        self.w.close()
        try:
            await self.w.wait_closed()
        except ConnectionError:
            pass

    async def go(self, name: str, structured: bool = True, contexts: tuple[str, ...] = ()) -> None:
        assert (await self.r.readexactly(18))[:8] == b"NBDMAGIC"
        self.w.write(struct.pack(">I", 3))
        if structured:
            await self._option(8, b"")
        if contexts:
            raw = name.encode()
            body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(contexts))
            for ctx in contexts:
                body += struct.pack(">I", len(ctx)) + ctx.encode()
            await self._option(10, body)
        raw = name.encode()
        await self._option(7, struct.pack(">I", len(raw)) + raw + b"\0\0")

    async def _option(self, opt: int, payload: bytes) -> None:
        self.w.write(struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload)
        while True:
            _, _, rep, length = struct.unpack(">QIII", await self.r.readexactly(20))
            await self.r.readexactly(length)
            if rep == 1:
                return
            assert rep in (3, 4), hex(rep)

    def send(self, cmd: int, offset: int, length: int, cookie: int, payload: bytes = b"") -> None:
        self.w.write(struct.pack(">IHHQQI", 0x25609513, 0, cmd, cookie, offset, length) + payload)

    async def reply(self, read_length: int = 0) -> tuple[int, int, list[tuple[int, bytes]]]:
        """(cookie, error, [(chunk type, body)]) of one complete reply."""
        (magic,) = struct.unpack(">I", await self.r.readexactly(4))
        if magic == SIMPLE:
            error, cookie = struct.unpack(">IQ", await self.r.readexactly(12))
            data = await self.r.readexactly(read_length) if not error and read_length else b""
            return cookie, error, [(-1, data)]
        assert magic == STRUCTURED
        chunks, error = [], 0
        while True:
            flags, kind, cookie, length = struct.unpack(">HHQI", await self.r.readexactly(16))
            body = await self.r.readexactly(length)
            chunks.append((kind, body))
            if kind & 0x8000:
                error = struct.unpack(">I", body[:4])[0]
            if flags & 1:
                return cookie, error, chunks
            assert struct.unpack(">I", await self.r.readexactly(4))[0] == STRUCTURED


@pytest.fixture
async def daemon(scratch: Path) -> AsyncIterator[Daemon]:
    d = Daemon()
    events: list[tuple[str, Any]] = []
    deleted = asyncio.Event()

    def record(name: str, data: Any, ts: int) -> None:
        events.append((name, data))
        if name == "BLOCK_EXPORT_DELETED":
            deleted.set()

    d.events.subscribe(record)
    d.test_events = events  # type: ignore[attr-defined]
    d.test_deleted = deleted  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        await d.shutdown()


async def start(daemon: Daemon, scratch: Path, **extra: Any) -> Path:
    sock = scratch / "nbd.sock"
    args = {"addr": {"type": "unix", "data": {"path": str(sock)}}, **extra}
    await daemon.run_command("nbd-server-start", args)
    return sock


async def null_export(
    daemon: Daemon, name: str = "n", opts: dict[str, Any] | None = None, zeroes: bool = True
) -> None:
    await daemon.run_command(
        "blockdev-add",
        {"driver": "null-co", "node-name": name, "size": 4 * MiB, "read-zeroes": zeroes},
    )
    await daemon.run_command(
        "block-export-add", {"type": "nbd", "id": f"e-{name}", "node-name": name, **(opts or {})}
    )


async def test_handshake_time_limit_drops_silent_clients(daemon: Daemon, scratch: Path) -> None:
    sock = await start(daemon, scratch)
    await null_export(daemon)
    assert daemon.nbd_server is not None
    daemon.nbd_server.handshake_limit = 0.2
    silent = await Client.connect(sock)
    done = await Client.connect(sock)
    await done.go("n")
    assert (await silent.r.readexactly(18))[:8] == b"NBDMAGIC"
    assert await asyncio.wait_for(silent.r.read(), 5) == b""  # dropped
    done.send(READ, 0, 512, 1)  # a client past the handshake is never timed out
    await asyncio.sleep(0.3)
    done.send(READ, 0, 512, 2)
    assert [(await done.reply())[:2] for _ in range(2)] == [(1, 0), (2, 0)]
    await silent.close()
    await done.close()


@pytest.mark.parametrize("structured", [True, False])
async def test_node_errors_become_error_replies(
    daemon: Daemon, scratch: Path, structured: bool
) -> None:
    sock = await start(daemon, scratch)
    # Without read-zeroes the node reports no zeroes, so a structured read reads it too.
    await null_export(daemon, opts=dict(writable=True), zeroes=False)
    node = daemon.graph.lookup("n")

    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "full")

    async def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("driver bug")

    node.driver.preadv = fail  # type: ignore[method-assign]
    node.driver.pwritev = crash  # type: ignore[method-assign]
    c = await Client.connect(sock)
    await c.go("n", structured=structured)
    c.send(READ, 0, 4096, 1)
    c.send(WRITE, 0, 512, 2, b"x" * 512)
    c.send(FLUSH, 0, 0, 3)
    replies = {cookie: (err, chunks) for cookie, err, chunks in [await c.reply() for _ in range(3)]}
    assert replies[1][0] == 28  # ENOSPC, mapped to the NBD value
    assert replies[2][0] == 5  # an unexpected exception is EIO, never a crash
    assert replies[3][0] == 0
    if structured:
        assert b"reading from file failed" in replies[1][1][0][1]
    await c.close()


async def test_structured_reads_send_holes_for_zeroes(daemon: Daemon, scratch: Path) -> None:
    sock = await start(daemon, scratch)
    await null_export(daemon, opts={"writable": True, "allocation-depth": True})
    c = await Client.connect(sock)
    await c.go("n", contexts=("base:allocation", "qemu:allocation-depth"))
    c.send(READ, 0, 65536, 1)
    cookie, error, chunks = await c.reply()
    assert (cookie, error, [k for k, _ in chunks]) == (1, 0, [2])  # one OFFSET_HOLE chunk
    assert struct.unpack(">QI", chunks[0][1]) == (0, 65536)
    c.send(BLOCK_STATUS, 0, 4 * MiB, 2)
    cookie, error, chunks = await c.reply()
    assert (cookie, error) == (2, 0)
    by_id = {
        struct.unpack(">I", body[:4])[0]: struct.unpack(">II", body[4:12]) for _, body in chunks
    }
    assert by_id[0] == (4 * MiB, 3)  # base:allocation: hole, reads as zeroes (as qsd)
    assert by_id[1] == (4 * MiB, 1)  # qemu:allocation-depth: allocated in the top node
    await c.close()


async def test_export_deletion_waits_for_requests(daemon: Daemon, scratch: Path) -> None:
    sock = await start(daemon, scratch)
    await null_export(daemon, opts=dict(writable=True))
    node = daemon.graph.lookup("n")
    release = asyncio.Event()
    entered = asyncio.Event()
    original = node.driver.pwritev

    async def slow(offset: int, data: Any, fua: bool) -> None:
        entered.set()
        await release.wait()
        await original(offset, data, fua)

    node.driver.pwritev = slow  # type: ignore[method-assign]
    c = await Client.connect(sock)
    await c.go("n")
    c.send(WRITE, 0, 512, 1, b"y" * 512)
    await entered.wait()
    with pytest.raises(QmpError, match="export 'e-n' still in use"):
        await daemon.run_command("block-export-del", {"id": "e-n"})
    await daemon.run_command("block-export-del", {"id": "e-n", "mode": "hard"})
    exports = await daemon.run_command("query-block-exports", None)
    assert exports == [{"id": "e-n", "type": "nbd", "node-name": "n", "shutting-down": True}]
    with pytest.raises(QmpError, match="already shutting down"):
        await daemon.run_command("block-export-del", {"id": "e-n"})
    with pytest.raises(QmpError, match="Node n is in use"):
        await daemon.run_command("blockdev-del", {"node-name": "n"})
    assert ("BLOCK_EXPORT_DELETED", {"id": "e-n"}) not in daemon.test_events  # type: ignore[attr-defined]
    release.set()
    await asyncio.wait_for(daemon.test_deleted.wait(), 5)  # type: ignore[attr-defined]
    assert await daemon.run_command("query-block-exports", None) == []
    assert ("BLOCK_EXPORT_DELETED", {"id": "e-n"}) in daemon.test_events  # type: ignore[attr-defined]
    await daemon.run_command("blockdev-del", {"node-name": "n"})  # the edge is gone
    await c.close()


async def test_stop_drops_every_client_and_removes_the_socket(
    daemon: Daemon, scratch: Path
) -> None:
    sock = await start(daemon, scratch, **{"max-connections": 1})
    await null_export(daemon)
    c = await Client.connect(sock)
    await c.go("n")
    waiting = await Client.connect(sock)  # beyond max-connections: not accepted yet
    assert sock.exists()
    await daemon.run_command("nbd-server-stop", None)
    assert daemon.test_events == [("BLOCK_EXPORT_DELETED", {"id": "e-n"})]  # type: ignore[attr-defined]
    assert await asyncio.wait_for(c.r.read(), 5) == b""
    assert not sock.exists()
    assert await daemon.run_command("query-block-exports", None) == []
    await c.close()
    await waiting.close()
    await daemon.run_command(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
    )


async def test_writethrough_and_multi_conn_flags(daemon: Daemon, scratch: Path) -> None:
    sock = await start(daemon, scratch, **{"max-connections": 1})
    await null_export(daemon, opts=dict(writable=True, writethrough=True))
    assert daemon.nbd_server is not None
    info = daemon.nbd_server.infos["n"]
    assert not info.can_multi_conn and not info.read_only
    c = await Client.connect(sock)
    await c.go("n")
    c.send(WRITE, 0, 512, 1, b"z" * 512)
    assert (await c.reply())[:2] == (1, 0)
    await c.close()


def shm_image(size: int) -> Path:
    """A zero-filled file of `size` bytes on /dev/shm (tmpfs), for the caller to delete."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    img = shm / f"sd-nbd-test-{os.getpid()}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    return img


async def test_pipelined_requests_on_a_tmpfs_image(daemon: Daemon, scratch: Path) -> None:
    """Requests that complete at once (tmpfs I/O runs on the loop) and ones that wait (the
    pool, a fast zero write holding a context variable across its wait) mixed in one burst,
    beyond MAX_RUNNING and the eager budget: each answered once, with the right data."""
    img = shm_image(4 * MiB)
    try:
        sock = await start(daemon, scratch)
        await daemon.run_command(
            "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)}
        )
        await daemon.run_command(
            "block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "writable": True}
        )
        c = await Client.connect(sock)
        await c.go("f")
        blocks = {i: bytes([i + 1]) * 4096 for i in range(48)}
        for i, data in blocks.items():
            c.send(WRITE, i * 4096, 4096, i, data)
        big = bytes(range(256)) * 1024  # 256 KiB: past the eager budget with the rest
        c.send(WRITE, MiB, len(big), 100, big)
        c.send(WRITE, 2 * MiB, len(big) * 2, 101, big + big)  # beyond INLINE_MAX: the pool
        c.send(ZEROES, 3 * MiB, 65536, 102)
        c.w.write(struct.pack(">IHHQQI", 0x25609513, 1 << 4, ZEROES, 103, 0, 4096))  # FAST_ZERO
        await c.w.drain()
        writes = {(await c.reply())[:2] for _ in range(len(blocks) + 4)}
        assert writes == {(cookie, 0) for cookie in [*blocks, 100, 101, 102, 103]}
        for i in range(48):
            c.send(READ, i * 4096, 4096, 1000 + i)
        c.send(READ, MiB, len(big), 2000)
        c.send(READ, 2 * MiB, 2 * len(big), 2001)
        got: dict[int, bytes] = {}
        for _ in range(50):
            cookie, error, chunks = await c.reply()
            assert error == 0 and cookie not in got
            got[cookie] = b"".join(body[8:] for kind, body in chunks if kind == 1)
            if not got[cookie]:  # a hole chunk: zeroes
                assert [kind for kind, _ in chunks] == [2]
                length = struct.unpack(">QI", chunks[0][1])[1]
                got[cookie] = bytes(length)
        assert got[1000] == bytes(4096)  # zeroed by the fast zero write
        assert all(got[1000 + i] == blocks[i] for i in range(1, 48))
        assert got[2000] == big and got[2001] == big + big
        fd = os.open(img, os.O_RDONLY)
        try:
            assert os.pread(fd, 65536, 3 * MiB) == bytes(65536)  # zeroed in the file
        finally:
            os.close(fd)
        await c.close()
    finally:
        img.unlink(missing_ok=True)


async def test_block_size_limits_come_from_the_node(daemon: Daemon, scratch: Path) -> None:
    """The advertised minimum is the exported node's request alignment; the maximum is
    capped by the smallest max-transfer among its data children (merged as QEMU does)."""
    await start(daemon, scratch)
    image = {"driver": "null-co", "size": 4 * MiB}
    blkdebug = {"driver": "blkdebug", "image": image, "align": 4096, "max-transfer": 65536}
    await daemon.run_command("blockdev-add", {"node-name": "b", **blkdebug})
    await daemon.run_command(
        "blockdev-add", {"driver": "raw", "node-name": "r", "file": {**blkdebug, "align": 512}}
    )
    await null_export(daemon, "plain")
    for node in ("b", "r"):
        await daemon.run_command(
            "block-export-add", {"type": "nbd", "id": f"e-{node}", "node-name": node}
        )
    assert daemon.nbd_server is not None
    infos = daemon.nbd_server.infos
    sizes = {
        name: (infos[name].block_size_min, infos[name].block_size_max)
        for name in ("b", "r", "plain")
    }
    assert sizes == {"b": (4096, 65536), "r": (1, 65536), "plain": (1, 32 * MiB)}


# -- sparse structured reads ------------------------------------------------------------------

DF, FUA = 1 << 2, 1 << 0
KiB = 1024


def read_request(c: Client, offset: int, length: int, cookie: int, flags: int = 0) -> None:
    c.w.write(struct.pack(">IHHQQI", 0x25609513, flags, READ, cookie, offset, length))


async def replies(c: Client, count: int) -> dict[int, tuple[int, list[tuple[int, bytes]]]]:
    """`count` structured replies by cookie: (error, chunks); chunks of different requests
    may interleave on the wire (each reply's own chunks stay in order)."""
    out: dict[int, tuple[int, list[tuple[int, bytes]]]] = {}
    done = 0
    while done < count:
        magic, flags, kind, cookie, length = struct.unpack(">IHHQI", await c.r.readexactly(20))
        assert magic == STRUCTURED
        body = await c.r.readexactly(length)
        error, chunks = out.get(cookie, (0, []))
        if kind & 0x8000:
            error = struct.unpack(">I", body[:4])[0]
        out[cookie] = (error, [*chunks, (kind, body)])
        done += flags & 1
    return out


def read_chunks(chunks: list[tuple[int, bytes]]) -> list[tuple[str, int, int, bytes]]:
    """(kind, offset, length, bytes) of OFFSET_DATA / OFFSET_HOLE chunks; errors by name."""
    out = []
    for kind, body in chunks:
        if kind == 1:
            (offset,) = struct.unpack(">Q", body[:8])
            out.append(("data", offset, len(body) - 8, bytes(body[8:])))
        elif kind == 2:
            offset, length = struct.unpack(">QI", body)
            out.append(("hole", offset, length, b""))
        else:
            err, n = struct.unpack(">IH", body[:6])
            out.append(("error", err, kind, bytes(body[6 : 6 + n])))
    return out


@pytest.fixture
def sparse_raw(scratch: Path) -> Path:
    """1 MiB: data at [0, 64K) and [128K, 192K), explicit zeroes at [256K, 320K), holes else."""
    img = scratch / "sparse.raw"
    fd = os.open(img, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, MiB)
        os.pwrite(fd, b"\xaa" * (64 * KiB), 0)
        os.pwrite(fd, b"\xbb" * (64 * KiB), 128 * KiB)
        os.pwrite(fd, bytes(64 * KiB), 256 * KiB)
    finally:
        os.close(fd)
    return img


async def raw_export(daemon: Daemon, img: Path) -> Any:
    """raw over file, exported writable as "r"; returns the file node's driver."""
    await daemon.run_command(
        "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)}
    )
    await daemon.run_command("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
    await daemon.run_command(
        "block-export-add", {"type": "nbd", "id": "e-r", "node-name": "r", "writable": True}
    )
    return daemon.graph.lookup("f").driver


async def test_structured_reads_skip_holes(daemon: Daemon, scratch: Path, sparse_raw: Path) -> None:
    """One chunk per block-status extent: holes (never read) for the file's holes, data for
    its data extents, explicit zeroes included (as qsd); the last chunk alone is final."""
    sock = await start(daemon, scratch)
    await raw_export(daemon, sparse_raw)
    c = await Client.connect(sock)
    await c.go("r")
    read_request(c, 32 * KiB, 512 * KiB, 1)
    cookie, error, chunks = await c.reply()
    assert (cookie, error) == (1, 0)
    assert read_chunks(chunks) == [
        ("data", 32 * KiB, 32 * KiB, b"\xaa" * (32 * KiB)),
        ("hole", 64 * KiB, 64 * KiB, b""),
        ("data", 128 * KiB, 64 * KiB, b"\xbb" * (64 * KiB)),
        ("hole", 192 * KiB, 64 * KiB, b""),
        ("data", 256 * KiB, 64 * KiB, bytes(64 * KiB)),
        ("hole", 320 * KiB, 224 * KiB, b""),
    ]
    read_request(c, 60 * KiB, 8 * KiB, 2, flags=DF)  # DF: one data chunk, holes included
    cookie, error, chunks = await c.reply()
    assert (cookie, error) == (2, 0)
    assert read_chunks(chunks) == [("data", 60 * KiB, 8 * KiB, b"\xaa" * 4096 + bytes(4096))]
    await c.close()
    plain = await Client.connect(sock)  # simple replies: the bytes, holes as zeroes
    await plain.go("r", structured=False)
    read_request(plain, 60 * KiB, 8 * KiB, 3)
    assert await plain.reply(8 * KiB) == (3, 0, [(-1, b"\xaa" * 4096 + bytes(4096))])
    await plain.close()


async def test_read_errors_after_hole_chunks(
    daemon: Daemon, scratch: Path, sparse_raw: Path
) -> None:
    """Holes are never read, so a failing read only shows on data extents; a failure after
    some chunks ends the reply with an error chunk, and the connection keeps serving."""
    sock = await start(daemon, scratch)
    drv = await raw_export(daemon, sparse_raw)

    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "injected")

    def fail_now(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "injected")

    drv.preadv = fail
    drv.preadv_now = fail_now  # a read done at once fails alike
    c = await Client.connect(sock)
    await c.go("r")
    read_request(c, 64 * KiB, 64 * KiB, 1)  # a hole: fine
    read_request(c, 64 * KiB, 128 * KiB, 2)  # hole, then a data extent that fails
    read_request(c, 0, 4096, 3, flags=DF)  # DF reads the range in one piece
    read_request(c, 200 * KiB, 4096, 4)
    got = {cookie: (error, read_chunks(chunks)) for cookie, (error, chunks) in
           (await replies(c, 4)).items()}  # fmt: skip
    assert got[1] == (0, [("hole", 64 * KiB, 64 * KiB, b"")])
    assert got[2] == (
        28,
        [("hole", 64 * KiB, 64 * KiB, b""), ("error", 28, 0x8001, b"reading from file failed")],
    )
    assert got[3][0] == 28
    assert got[4] == (0, [("hole", 200 * KiB, 4096, b"")])

    async def no_status(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EIO, "injected")

    drv.block_status = no_status
    read_request(c, 64 * KiB, 4096, 5)
    assert read_chunks((await c.reply())[2]) == [("error", 5, 0x8001, b"unable to check for holes")]
    await c.close()


async def test_fua_read_flushes_first(daemon: Daemon, scratch: Path, sparse_raw: Path) -> None:
    sock = await start(daemon, scratch)
    drv = await raw_export(daemon, sparse_raw)
    flushed: list[bool] = []

    async def flush() -> None:
        flushed.append(True)
        raise OSError(errno.EIO, "injected")

    drv.flush = flush
    c = await Client.connect(sock)
    await c.go("r")
    read_request(c, 0, 4096, 1, flags=FUA)  # nothing written yet: nothing to flush (qsd too)
    assert (await c.reply())[:2] == (1, 0)
    c.send(WRITE, 0, 512, 2, b"w" * 512)
    assert (await c.reply())[:2] == (2, 0)
    assert not flushed
    read_request(c, 0, 4096, 3)
    assert (await c.reply())[:2] == (3, 0)
    read_request(c, 0, 4096, 4, flags=FUA)
    assert read_chunks((await c.reply())[2]) == [("error", 5, 0x8001, b"flush failed")]
    assert flushed == [True]
    await c.close()


@pytest.fixture
def empty_qcow2(scratch: Path) -> Path:
    img = scratch / "empty.qcow2"
    done = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("qemu-img is needed to make the image")
    return img


async def test_hole_reads_of_a_qcow2_image_are_answered_at_once(
    daemon: Daemon, scratch: Path, empty_qcow2: Path
) -> None:
    """Reads that cached metadata says are all zeroes are one hole chunk each, answered in
    the read callback (no task, no coroutine): a burst of them, unaligned ones included;
    DF still gets one data chunk; written ranges become data; simple replies get zeroes."""
    sock = await start(daemon, scratch)
    await daemon.run_command(
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(empty_qcow2)}},
    )  # fmt: skip
    await daemon.run_command(
        "block-export-add", {"type": "nbd", "id": "e-q", "node-name": "q", "writable": True}
    )
    c = await Client.connect(sock)
    await c.go("q")
    assert daemon.nbd_server is not None
    (conn,) = daemon.nbd_server.connections
    started: list[Any] = []
    start_request = conn._start

    def counting_start(req: Any) -> None:
        started.append(req)
        start_request(req)

    conn._start = counting_start  # type: ignore[method-assign]
    read_request(c, 0, 4096, 999)  # the first one checks the image (awaited block status)
    assert (await c.reply())[:2] == (999, 0)
    started.clear()
    ranges = [((i * 97 * KiB) % (4 * MiB - 8 * KiB), 512 + i * 100) for i in range(40)]
    for cookie, (offset, length) in enumerate(ranges):
        read_request(c, offset, length, cookie)
    got = await replies(c, len(ranges))
    assert got == {
        cookie: (0, [(2, struct.pack(">QI", offset, length))])
        for cookie, (offset, length) in enumerate(ranges)
    }
    assert not started and conn._core.in_flight == 0  # none became a coroutine
    read_request(c, 4096, 4096, 100, flags=DF)
    read_request(c, 4096, 4096, 101, flags=FUA)
    flagged = {k: read_chunks(chunks) for k, (_, chunks) in (await replies(c, 2)).items()}
    assert flagged == {
        100: [("data", 4096, 4096, bytes(4096))],
        101: [("hole", 4096, 4096, b"")],
    }
    c.send(WRITE, 3 * MiB + 8192, 4096, 102, b"\x5a" * 4096)
    assert (await c.reply())[:2] == (102, 0)
    read_request(c, 3 * MiB - 4096, 2 * 64 * KiB, 103)  # a hole, then the written cluster
    cookie, error, chunks = await c.reply()
    assert (cookie, error) == (103, 0)
    assert read_chunks(chunks) == [
        ("hole", 3 * MiB - 4096, 4096, b""),
        ("data", 3 * MiB, 64 * KiB, bytes(8192) + b"\x5a" * 4096 + bytes(52 * KiB)),
        ("hole", 3 * MiB + 64 * KiB, 60 * KiB, b""),
    ]
    await c.close()
    plain = await Client.connect(sock)
    await plain.go("q", structured=False)
    read_request(plain, 0, 8192, 104)
    assert await plain.reply(8192) == (104, 0, [(-1, bytes(8192))])
    await plain.close()
