"""Real libnbd clients (nbdinfo, python3-nbd) against the NBD core behind a throwaway adapter.

The adapter below is test-only: an `asyncio.BufferedProtocol` feeding `get_buffer`/
`buffer_updated` (the zero-copy path) and serving in-memory bytearrays. The compat test runs
the same nbdinfo queries against qemu-storage-daemon 7.2 and compares the answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage_daemon.export.nbd.constants import Cmd
from storage_daemon.export.nbd.protocol import (
    Close,
    Event,
    ExportInfo,
    Request,
    ServerConnection,
)

SYSTEM_PYTHON = "/usr/bin/python3"
MiB = 1 << 20
pytestmark = pytest.mark.skipif(
    shutil.which("nbdinfo") is None or not os.path.exists(SYSTEM_PYTHON),
    reason="libnbd tools not installed",
)


class _Adapter(asyncio.BufferedProtocol):
    def __init__(self, exports: dict[str, ExportInfo], disks: dict[str, bytearray]) -> None:
        self.conn = ServerConnection(exports)
        self.disks = disks
        self.disk = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.conn.start())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._handle(self.conn.buffer_updated(nbytes))

    def eof_received(self) -> bool:
        self._handle(self.conn.receive_eof())
        return False

    def _handle(self, events: list[Event]) -> None:
        t = self.transport
        assert t is not None
        out = self.conn.data_to_send()
        if out:
            t.write(out)
        for e in events:
            if isinstance(e, Request):
                self._answer(t, e)
            elif isinstance(e, Close):
                t.close()
            else:
                self.disk = self.disks[e.export.name]

    def _answer(self, t: asyncio.Transport, r: Request) -> None:
        c, disk = self.conn, self.disk
        end = r.offset + r.length
        if r.command is Cmd.READ:
            data = memoryview(disk)[r.offset : end]
            if c.structured_replies and r.length and not any(data):
                t.write(c.read_chunk_hole(r, r.offset, r.length, done=True))
            else:
                t.writelines([c.reply_read(r), data])
        elif r.command is Cmd.WRITE:
            assert r.payload is not None
            disk[r.offset : end] = r.payload
            t.write(c.reply_ok(r))
        elif r.command in (Cmd.WRITE_ZEROES, Cmd.TRIM):
            disk[r.offset : end] = bytes(r.length)
            t.write(c.reply_ok(r))
        elif r.command is Cmd.BLOCK_STATUS:
            extents = {}
            for m in c.meta_contexts:
                flags = 1 if m.name == "qemu:allocation-depth" else 0
                extents[m.id] = [(r.length, flags)]
            t.write(c.reply_block_status(r, extents))
        else:
            t.write(c.reply_ok(r))


EXPORTS = {
    "disk": ExportInfo("disk", 4 * MiB, description="test disk"),
    "ro": ExportInfo("ro", MiB, read_only=True, allocation_depth=True),
}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[str]:
    disks = {"disk": bytearray(4 * MiB), "ro": bytearray(b"\x5a" * MiB)}
    path = str(tmp_path / "nbd.sock")
    loop = asyncio.get_running_loop()
    srv = await loop.create_unix_server(lambda: _Adapter(EXPORTS, disks), path)
    try:
        yield path
    finally:
        srv.close()
        await srv.wait_closed()


async def _run(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _uri(path: str, name: str = "disk") -> str:
    return f"nbd+unix:///{name}?socket={path}"


def _strip(doc: dict[str, object]) -> dict[str, object]:
    exports = doc["exports"]
    assert isinstance(exports, list)
    for e in exports:
        e.pop("uri", None)
        e.pop("content", None)
    return doc


async def test_nbdinfo_json_list_and_map(server: str) -> None:
    rc, out, err = await _run("nbdinfo", "--json", _uri(server))
    assert rc == 0, err
    (e,) = json.loads(out)["exports"]
    assert e["export-size"] == 4 * MiB and e["description"] == "test disk"
    assert e["contexts"] == ["base:allocation"]
    for key in ("can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua"):
        assert e[key] is True, key
    assert e["can_multi_conn"] and e["can_trim"] and e["can_zero"]
    assert not e["is_read_only"] and not e["is_rotational"]
    assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == (
        1,
        4096,
        32 * MiB,
    )
    rc, out, err = await _run("nbdinfo", "--list", "--json", _uri(server, ""))
    assert rc == 0, err
    doc = json.loads(out)
    assert [x["export-name"] for x in doc["exports"]] == ["disk", "ro"]
    ro = doc["exports"][1]
    assert ro["is_read_only"] and not ro["can_trim"] and not ro["can_zero"]
    assert ro["contexts"] == ["base:allocation", "qemu:allocation-depth"]
    rc, out, err = await _run("nbdinfo", "--map", _uri(server))
    assert rc == 0, err
    assert out.split() == ["0", str(4 * MiB), "0", "data"]
    rc, out, err = await _run("nbdinfo", "--map=qemu:allocation-depth", _uri(server, "ro"))
    assert rc == 0, err
    assert out.split()[:3] == ["0", str(MiB), "1"]


NBDSH_SCRIPT = r"""
import errno, json, sys, nbd
out = {}
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\xab" * 65536, 8192, nbd.CMD_FLAG_FUA)
out["read"] = h.pread(65536 + 16, 8192 - 8).hex()[:40]
out["read_all"] = h.pread(65536, 8192) == b"\xab" * 65536
h.zero(4096, 8192)
out["after_zero"] = h.pread(8, 8192 + 4096 - 4).hex()
h.trim(4096, 0)
h.cache(4096, 0)
h.flush()
big = bytes(range(256)) * 8192  # 2 MiB: exercises the dedicated payload buffer
h.pwrite(big, MiB := 1 << 20)
out["big"] = h.pread(len(big), MiB) == big
h.set_strict_mode(0)
for name, call in [
    ("past_end", lambda: h.pread(1, 4 << 20)),
    ("bad_flag", lambda: h.pread(1, 0, nbd.CMD_FLAG_REQ_ONE)),
]:
    try:
        call()
        out[name] = "ok"
    except nbd.Error as e:
        out[name] = e.errno
h.shutdown()
r = nbd.NBD()
r.connect_uri(sys.argv[2])
out["ro_read"] = r.pread(4, 0).hex()
try:
    r.set_strict_mode(0)
    r.pwrite(b"x", 0)
    out["ro_write"] = "ok"
except nbd.Error as e:
    out["ro_write"] = e.errno
r.shutdown()
print(json.dumps(out))
"""


async def test_python_libnbd_round_trip(server: str) -> None:
    rc, out, err = await _run(SYSTEM_PYTHON, "-c", NBDSH_SCRIPT, _uri(server), _uri(server, "ro"))
    assert rc == 0, err
    res = json.loads(out)
    assert res["read"] == "0000000000000000" + "ab" * 12
    assert res["read_all"] is True and res["big"] is True
    assert res["after_zero"] == "00" * 4 + "ab" * 4  # zeroed 4096..12287, then written data
    assert res["past_end"] == "EINVAL" and res["bad_flag"] == "EINVAL"
    assert res["ro_read"] == "5a5a5a5a" and res["ro_write"] == "EINVAL"


@pytest.mark.compat
@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="qsd not installed")
async def test_nbdinfo_answers_match_qsd(server: str, tmp_path: Path) -> None:
    qsock = str(tmp_path / "qsd.sock")
    proc = await asyncio.create_subprocess_exec(
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=null-co,node-name=n,size={4 * MiB}",
        "--blockdev",
        f"driver=null-co,node-name=m,size={MiB}",
        "--nbd-server",
        f"addr.type=unix,addr.path={qsock}",
        "--export",
        "type=nbd,id=e,node-name=n,name=disk,writable=on,description=test disk",
        "--export",
        "type=nbd,id=f,node-name=m,name=ro,allocation-depth=on",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(500):  # wait for the listening socket, at most ~5 s
            if await asyncio.to_thread(os.path.exists, qsock) or proc.returncode is not None:
                break
            await asyncio.sleep(0.01)
        assert await asyncio.to_thread(os.path.exists, qsock), "qsd did not start"
        for args in (["--json"], ["--list", "--json"]):
            name = "" if "--list" in args else "disk"
            rc1, ours, _ = await _run("nbdinfo", *args, _uri(server, name))
            rc2, theirs, _ = await _run("nbdinfo", *args, _uri(qsock, name))
            assert rc1 == rc2 == 0
            assert _strip(json.loads(ours)) == _strip(json.loads(theirs))
    finally:
        proc.terminate()
        await proc.wait()
