"""The NBD server in process: exports through the QMP handlers, raw asyncio clients.

Component ring. What needs the daemon's insides or a short clock runs here: the handshake
time limit (shortened), node I/O errors turned into NBD error replies (a failing driver method
on one node), export deletion and server stop while requests are in flight, events, and the
unix socket file's removal. Every server started here is stopped by the test.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
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


async def null_export(daemon: Daemon, name: str = "n", opts: dict[str, Any] | None = None) -> None:
    await daemon.run_command(
        "blockdev-add",
        {"driver": "null-co", "node-name": name, "size": 4 * MiB, "read-zeroes": True},
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
    await null_export(daemon, opts=dict(writable=True))
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
