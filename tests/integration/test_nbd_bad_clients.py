"""Abusive NBD clients against our daemon (a subprocess): nbd.md §5.2, the items needing a server.

Integration ring. Raw sockets speak just enough NBD to misbehave at each point; after every
case the daemon must still run, a well-behaved client (qemu-io) must still read the image's
known contents, and the image must be intact. One daemon serves the whole module; it is
stopped by PID at the end, and its unix socket must be gone afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess, ours_command

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")

MiB = 1 << 20
SIZE = 16 * MiB
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EINVAL = 22
# Option and command codes.
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO, OPT_SR, OPT_SET_META = 1, 2, 3, 7, 8, 10
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BLOCK_STATUS = range(8)
REP_ACK, REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = 1, 0x80000001, 0x80000003, 0x80000006


@dataclass
class Served:
    proc: DaemonProcess
    sock: Path
    image: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    d = tmp_path_factory.mktemp("bad")
    image = d / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
        f.write(b"\xa5" * MiB)
    sock = d / "nbd.sock"
    args = [
        "--blockdev",
        f"driver=file,node-name=file0,filename={image}",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock},max-connections=8",
        "--export",
        "type=nbd,id=e0,node-name=file0,name=disk,writable=on",
        "--export",
        "type=nbd,id=e1,node-name=file0,name=ro",
    ]
    proc = DaemonProcess(ours_command(), args, d, monitor="none").start()
    try:
        assert proc.wait_ready(20), proc.stderr
        yield Served(proc, sock, image)
    finally:
        status = proc.stop()
    assert status == 0, proc.stderr
    assert not sock.exists(), "the daemon left its NBD socket behind"
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture
def healthy(served: Served) -> Iterator[Served]:
    """After the test: the daemon runs, serves a good client, and the image is intact."""
    yield served
    assert served.proc.returncode is None, served.proc.stderr
    result = subprocess.run(
        ["qemu-io", "-f", "raw", "-r", "-c", "read -P 0xa5 0 1M", "-c", "read -P 0 1M 1M",
         f"nbd+unix:///disk?socket={served.sock}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0 and "Pattern verification failed" not in result.stdout, result
    with open(served.image, "rb") as f:
        assert f.read(MiB) == b"\xa5" * MiB


class Client:
    """A blocking raw NBD client (fixed newstyle) that can be told to misbehave."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.structured = False

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"server closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def closed_by_server(self) -> bool:
        """True when the server hangs up (any unread bytes are drained first)."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def greeting(self, flags: int = 3) -> None:
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt, hflags) == (0x4E42444D41474943, IHAVEOPT, 3)
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, opt: int, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload)

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == OPT_REPLY_MAGIC
        return opt, rep, self.recv(length)

    def go(self, name: str = "disk", structured: bool = True) -> int:
        """Handshake up to transmission; returns the export size."""
        self.greeting()
        if structured:
            self.option(OPT_SR)
            assert self.reply()[1] == REP_ACK
            self.structured = True
        raw = name.encode()
        self.option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = -1
        while True:
            _, rep, data = self.reply()
            if rep == REP_ACK:
                return size
            assert rep == 3, hex(rep)
            if struct.unpack(">H", data[:2])[0] == 0:
                size = struct.unpack(">Q", data[2:10])[0]

    def request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 1,
        payload: bytes = b"", magic: int = REQUEST_MAGIC,
    ) -> None:  # fmt: skip
        head = struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)
        self.sock.sendall(head + payload)

    def answer(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data) of one whole reply (all chunks of a structured one)."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv(12))
            return cookie, error, self.recv(read_length) if error == 0 and read_length else b""
        assert magic == STRUCTURED_MAGIC, hex(magic)
        data, error = bytearray(), 0
        while True:
            flags, kind, cookie, length = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(length)
            if kind == 1:
                data += body[8:]
            elif kind == 2:
                data += bytes(struct.unpack(">I", body[8:12])[0])
            elif kind & 0x8000:
                error = struct.unpack(">I", body[:4])[0]
            if flags & 1:
                return cookie, error, bytes(data)
            assert struct.unpack(">I", self.recv(4))[0] == STRUCTURED_MAGIC


@pytest.fixture
def client(healthy: Served) -> Iterator[Client]:
    c = Client(healthy.sock)
    try:
        yield c
    finally:
        c.close()


# -- handshake ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\0\0", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\0\0\0\x03" + b"IHAVE"],
    ids=["nothing", "partial-flags", "http", "partial-option"],
)
def test_clients_that_give_up_early(healthy: Served, data: bytes) -> None:
    for _ in range(3):
        c = Client(healthy.sock)
        c.recv(18 if data else 1)
        c.sock.sendall(data)
        c.close()


@pytest.mark.parametrize("flags", [4, 0x80000000])
def test_unknown_client_flags_disconnect(client: Client, flags: int) -> None:
    client.greeting(flags)
    assert client.closed_by_server()


def test_bad_option_magic_and_huge_length_disconnect(healthy: Served) -> None:
    c = Client(healthy.sock)
    c.greeting()
    c.sock.sendall(struct.pack(">QII", 0x1234, OPT_LIST, 0))
    assert c.closed_by_server()
    c.close()
    c = Client(healthy.sock)
    c.greeting()
    started = time.monotonic()
    c.sock.sendall(struct.pack(">QII", IHAVEOPT, 99, 0xFFFFFFF0))
    assert c.closed_by_server()
    assert time.monotonic() - started < 5  # not drained for gigabytes
    c.close()


def test_options_recoverable_errors(client: Client) -> None:
    client.greeting()
    client.option(99, os.urandom(MiB))  # unknown, large: drained, refused, still in sync
    assert client.reply()[1] == REP_ERR_UNSUP
    client.option(OPT_LIST, b"junk")
    assert client.reply()[1] == REP_ERR_INVALID
    client.option(OPT_SET_META, struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0))
    assert client.reply()[1] == REP_ERR_INVALID  # before structured replies
    client.option(OPT_GO, struct.pack(">I", 0xFFFFFFFF) + b"disk\0\0")
    assert client.reply()[1] == REP_ERR_INVALID
    client.option(OPT_GO, struct.pack(">I", 4) + b"nope" + b"\0\0")
    assert client.reply()[1] == REP_ERR_UNKNOWN
    for _ in range(500):  # an option loop is answered, not punished
        client.option(OPT_LIST)
        while client.reply()[1] != REP_ACK:
            pass
    client.option(OPT_ABORT, b"ignored payload")
    assert client.reply()[1] == REP_ACK
    assert client.closed_by_server()


def test_export_name_of_missing_export_disconnects(client: Client) -> None:
    client.greeting()
    client.option(OPT_EXPORT_NAME, b"nope")
    assert client.closed_by_server()


def test_max_connections(healthy: Served) -> None:
    """Beyond max-connections=8, clients wait un-accepted until a slot frees (qsd's way)."""
    idle = [Client(healthy.sock) for _ in range(8)]
    try:
        for c in idle:
            c.recv(18)
        waiting = Client(healthy.sock, timeout=0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(18)
        idle.pop().close()
        waiting.sock.settimeout(5)
        assert waiting.recv(18)[:8] == b"NBDMAGIC"
        waiting.close()
    finally:
        for c in idle:
            c.close()


# -- transmission ------------------------------------------------------------------------------


def test_invalid_requests_keep_the_connection(client: Client) -> None:
    size = client.go()
    cases = [
        (READ, size, 1, 0),  # past the end
        (READ, size - 1, 2, 0),
        (READ, 2**64 - 512, 1024, 0),  # offset + length wraps
        (READ, 0, 33 * MiB, 0),  # more than 32 MiB
        (READ, 0, 0xFFFFFFFF, 0),
        (READ, 0, 512, 1 << 3),  # REQ_ONE on READ
        (READ, 0, 512, 1 << 7),  # unknown flag
        (99, 0, 0, 0),  # unknown command
        (TRIM, size, 1, 0),
        (ZEROES, 0, 512, 1 << 2),  # DF on write zeroes
        (BLOCK_STATUS, 0, 512, 0),  # no meta context negotiated
        (CACHE, size, 1, 0),
        (ZEROES, size - 1, 2, 0),
    ]
    for i, (cmd, offset, length, flags) in enumerate(cases):
        client.request(cmd, offset, length, flags, cookie=i)
        cookie, error, _ = client.answer()
        assert (cookie, error) == (i, EINVAL), (cmd, offset, length, flags)
    for cmd in (READ, WRITE, TRIM, ZEROES, CACHE, FLUSH):
        client.request(cmd, 0, 0, cookie=7)  # zero length: answered, never a hang-up
        assert client.answer()[:2] == (7, 0)
    client.request(FLUSH, 12345, 678, cookie=8)  # qsd ignores FLUSH's offset and length
    assert client.answer()[:2] == (8, 0)
    client.request(READ, 0, 4096, cookie=9)
    assert client.answer(4096) == (9, 0, b"\xa5" * 4096)


def test_read_only_export_refuses_writes(healthy: Served) -> None:
    c = Client(healthy.sock)
    c.go("ro", structured=False)
    c.request(WRITE, 0, 4096, cookie=1, payload=b"x" * 4096)  # payload consumed
    assert c.answer() == (1, EINVAL, b"")
    c.request(TRIM, 0, 4096, cookie=2)
    assert c.answer() == (2, EINVAL, b"")
    c.request(READ, 0, 16, cookie=3)
    assert c.answer(16) == (3, 0, b"\xa5" * 16)
    c.close()


def test_bad_magic_and_garbage_after_handshake(healthy: Served) -> None:
    c = Client(healthy.sock)
    c.go()
    c.request(READ, 0, 512, magic=0xDEADBEEF, cookie=5)
    assert c.answer()[:2] == (5, EINVAL)
    assert c.closed_by_server()
    c.close()
    c = Client(healthy.sock)
    c.go(structured=False)
    c.sock.sendall(os.urandom(4096))
    assert c.closed_by_server()
    c.close()


def test_oversized_write_disconnects(client: Client) -> None:
    client.go()
    client.request(WRITE, 0, 33 * MiB, cookie=3)
    assert client.answer()[:2] == (3, EINVAL)
    assert client.closed_by_server()


def test_abrupt_disconnect_mid_write(healthy: Served) -> None:
    for _ in range(3):
        c = Client(healthy.sock)
        c.go()
        c.request(WRITE, 8 * MiB, MiB, cookie=1, payload=b"\x77" * 4096)  # then hang up
        c.close()


def test_pipelined_reads_then_hang_up(healthy: Served) -> None:
    c = Client(healthy.sock)
    try:
        c.go()
        c.sock.settimeout(1)
        with contextlib.suppress(TimeoutError):  # back-pressure may stop us first
            for i in range(300):
                c.request(READ, (i % 16) * MiB, MiB, cookie=i)
    finally:
        c.close()


def test_requests_after_disc_are_ignored(client: Client) -> None:
    client.go()
    client.request(READ, 0, 512, cookie=1)
    client.request(DISC)
    # The server may already have closed after DISC; a refused late request is fine too.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        client.request(READ, 0, 512, cookie=2)
    cookie, error, data = client.answer()
    assert (cookie, error, data) == (1, 0, b"\xa5" * 512)  # in-flight request still answered
    assert client.closed_by_server()


def test_duplicate_cookies(client: Client) -> None:
    client.go()
    for _ in range(4):
        client.request(READ, 0, 512, cookie=42)
    answers = [client.answer() for _ in range(4)]
    assert answers == [(42, 0, b"\xa5" * 512)] * 4


def test_client_that_never_reads_replies(healthy: Served) -> None:
    """Back-pressure: the daemon stops reading instead of buffering every reply."""
    c = Client(healthy.sock)
    c.go()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sent = 0
    c.sock.settimeout(2)
    head = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, READ, 0, 0, MiB)
    try:
        for _ in range(4096):  # 4 GiB of replies asked for
            c.sock.sendall(head)
            sent += 1
    except TimeoutError:
        pass
    assert sent < 4096, "the daemon kept reading requests whose replies nobody reads"
    rss = _rss_kib(healthy.proc.pid)
    assert rss < 400 * 1024, f"daemon RSS {rss} KiB"
    # Another client is served meanwhile.
    other = Client(healthy.sock)
    other.go()
    other.request(READ, 0, 4096, cookie=1)
    assert other.answer() == (1, 0, b"\xa5" * 4096)
    other.close()
    c.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
