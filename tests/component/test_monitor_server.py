"""Component tests: monitors served in-process on real sockets, driven by qemu.qmp and raw bytes.

The dispatcher is a small fake (a few commands); the chardevs and the server are the real
ones. Every server, chardev and client a test opens is closed by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from storage_daemon.errors import QmpError
from storage_daemon.monitor.chardev import Chardev, NullChardev, SocketChardev
from storage_daemon.monitor.jsonstream import JsonValue
from storage_daemon.monitor.server import MonitorContext, MonitorServer

VERSION: dict[str, JsonValue] = {
    "qemu": {"major": 7, "minor": 2, "micro": 22},
    "package": "test",
}
GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
    b'"package": "test"}, "capabilities": ["oob"]}}\r\n'
)
TIMEOUT = 10.0


class Fake:
    """The fake dispatcher and the knobs tests turn."""

    def __init__(self) -> None:
        self.server: MonitorServer | None = None
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.quit_requested = asyncio.Event()
        self.finished: list[str] = []

    async def __call__(
        self, ctx: MonitorContext, name: str, args: dict[str, JsonValue] | None
    ) -> object:
        if name == "query-version":
            return VERSION
        if name == "echo":
            return args or {}
        if name == "fail":
            raise QmpError("Parameter 'x' is unexpected")
        if name == "emit":
            assert self.server is not None
            self.server.broadcast("TEST_EVENT", {"n": 1}, 1_700_000_000_123_456_789)
            return {}
        if name == "slow":
            self.started.set()
            await self.release.wait()
            self.finished.append("slow")
            return {}
        if name == "quit":
            self.quit_requested.set()
            return {}
        if name == "busy":  # a command that works ~5 ms without suspending (query-qmp-schema)
            deadline = time.monotonic() + 0.005
            while time.monotonic() < deadline:
                pass
            self.finished.append("busy")
            return {}
        raise QmpError(f"The command {name} has not been found", "CommandNotFound")


@contextlib.asynccontextmanager
async def serving(
    *chardevs: Chardev, pretty: bool = False, max_output_buffer: int = 16 << 20
) -> AsyncIterator[tuple[MonitorServer, Fake]]:
    fake = Fake()
    server = MonitorServer(
        fake,
        VERSION,
        commands={"query-version", "echo", "fail", "emit", "slow", "quit", "busy"},
        max_output_buffer=max_output_buffer,
    )
    fake.server = server
    for chardev in chardevs:
        await chardev.start()
        server.add(chardev, pretty=pretty)
    try:
        yield server, fake
    finally:
        fake.release.set()
        await server.close()
        for chardev in chardevs:
            await chardev.close()


class Raw:
    """A raw-bytes client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def unix(cls, path: Path) -> Raw:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def line(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.readuntil(b"\r\n")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def negotiate(self) -> None:
        assert await self.line() == GREETING
        await self.send(b'{"execute":"qmp_capabilities"}')
        assert await self.line() == b'{"return": {}}\r\n'

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def test_qemu_qmp_client(scratch: Path) -> None:
    path = scratch / "m.sock"
    async with serving(SocketChardev("m", path=str(path), wait=False)):
        qmp = QMPClient("test")
        await qmp.connect(str(path))
        try:
            assert await qmp.execute("query-version") == VERSION
            assert await qmp.execute("echo", {"a": [1, "é"]}) == {"a": [1, "é"]}
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("fail")
            assert info.value.error_class == "GenericError"
            assert info.value.error.error.desc == "Parameter 'x' is unexpected"
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("qmp_capabilities")
            assert info.value.error_class == "CommandNotFound"
        finally:
            await qmp.disconnect()


async def test_raw_session_and_garbage_never_disconnects(scratch: Path) -> None:
    path = scratch / "m.sock"
    async with serving(SocketChardev("m", path=str(path), wait=False)):
        c = await Raw.unix(path)
        assert await c.line() == GREETING
        await c.send(b'{"execute":"query-version"}')
        assert await c.line() == (
            b'{"error": {"class": "CommandNotFound", "desc": '
            b"\"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n"
        )
        await c.send(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
        assert await c.line() == b'{"return": {}}\r\n'
        await c.send(b'\xff\x00{bad json}[1,2]}"\\u12"')
        assert await c.line() == (
            b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\r\n'
        )
        # qsd prints the stray text as a C string: it ends at the NUL.
        assert b"stray ''" in await c.line()
        assert b"invalid keyword 'bad'" in await c.line()
        assert b"QMP input must be a JSON object" in await c.line()
        assert b"expecting value" in await c.line()
        assert b'\\\\u12\\" is not a valid Unicode character' in await c.line()
        # Split over many writes, with two messages back to back.
        msg = b'{"execute":"echo","arguments":{"k":"v"},"id":[1,{"a":null}]}{"execute":"fail"}'
        for i in range(len(msg)):
            await c.send(msg[i : i + 1])
        assert await c.line() == b'{"return": {"k": "v"}, "id": [1, {"a": null}]}\r\n'
        assert await c.line() == (
            b'{"error": {"class": "GenericError", "desc": "Parameter \'x\' is unexpected"}}\r\n'
        )
        await c.send(b'{"exec-oob":"echo","id":3}{"execute":"nosuch"}')
        assert await c.line() == (
            b'{"id": 3, "error": {"class": "GenericError", '
            b'"desc": "The command echo does not support OOB"}}\r\n'
        )
        assert await c.line() == (
            b'{"error": {"class": "CommandNotFound", '
            b'"desc": "The command nosuch has not been found"}}\r\n'
        )
        await c.close()


async def test_one_client_at_a_time(scratch: Path) -> None:
    path = scratch / "m.sock"
    chardev = SocketChardev("m", path=str(path), wait=False)
    async with serving(chardev):
        first = await Raw.unix(path)
        await first.negotiate()
        assert chardev.filename == f"unix:{path},server=on"
        second = await Raw.unix(path)  # the kernel accepts the connection
        await second.send(b'{"execute":"qmp_capabilities"}')  # queued, unanswered for now
        # A full round trip on the first client proves the server is running meanwhile.
        await first.send(b'{"execute":"echo","arguments":{"x":1}}')
        assert await first.line() == b'{"return": {"x": 1}}\r\n'
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await second.reader.readuntil(b"\r\n")
        await first.close()
        assert await second.line() == GREETING
        assert await second.line() == b'{"return": {}}\r\n'
        await second.close()


async def test_events_go_to_negotiated_sessions_only(scratch: Path) -> None:
    paths = [scratch / f"m{i}.sock" for i in range(3)]
    chardevs = [SocketChardev(f"m{i}", path=str(p), wait=False) for i, p in enumerate(paths)]
    async with serving(*chardevs):
        a, b, c = [await Raw.unix(p) for p in paths]
        await a.negotiate()
        await b.negotiate()
        assert await c.line() == GREETING  # c never negotiates
        await a.send(b'{"execute":"emit","id":"e"}')
        event = (
            b'{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, '
            b'"event": "TEST_EVENT", "data": {"n": 1}}\r\n'
        )
        assert await a.line() == event  # the event precedes the command's reply
        assert await a.line() == b'{"return": {}, "id": "e"}\r\n'
        assert await b.line() == event
        await c.send(b'{"execute":"qmp_capabilities"}')
        assert await c.line() == b'{"return": {}}\r\n'  # no stale event before it
        for client in (a, b, c):
            await client.close()


async def test_tcp_listener_with_qemu_qmp(scratch: Path) -> None:
    chardev = SocketChardev("t", host="127.0.0.1", port=0, wait=False)
    async with serving(chardev):
        address = chardev.address
        assert isinstance(address, tuple)
        assert chardev.filename == f"disconnected:tcp:127.0.0.1:{address[1]},server=on"
        qmp = QMPClient("tcp")
        await qmp.connect(address)
        try:
            assert await qmp.execute("query-version") == VERSION
            assert chardev.filename.startswith(f"tcp:127.0.0.1:{address[1]},server=on <-> ")
        finally:
            await qmp.disconnect()


async def test_client_mode_chardev_connects_out(scratch: Path) -> None:
    path = scratch / "listen.sock"
    qmp = QMPClient("listener")
    await qmp.start_server(str(path))
    chardev = SocketChardev("c", path=str(path), server=False)
    try:
        async with serving(chardev):
            async with asyncio.timeout(TIMEOUT):
                await qmp.accept()
            assert chardev.filename == "unix:"
            assert await qmp.execute("echo", {"dir": "out"}) == {"dir": "out"}
            await qmp.disconnect()
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()


async def test_client_mode_failure_texts(scratch: Path) -> None:
    chardev = SocketChardev("c", path=str(scratch / "nobody.sock"), server=False)
    with pytest.raises(QmpError) as info:
        await chardev.start()
    assert (
        info.value.desc
        == f"Failed to connect to '{scratch}/nobody.sock': No such file or directory"
    )
    reported: list[str] = []
    retrying = SocketChardev(
        "r", path=str(scratch / "nobody.sock"), server=False, reconnect=1, on_error=reported.append
    )
    await retrying.start()
    await retrying.close()
    assert reported == [
        f"Unable to connect character device r: Failed to connect to '{scratch}/nobody.sock': "
        "No such file or directory"
    ]


async def test_pretty_monitor(scratch: Path) -> None:
    path = scratch / "p.sock"
    async with serving(SocketChardev("p", path=str(path), wait=False), pretty=True):
        c = await Raw.unix(path)
        greeting = b"".join([await c.line() for _ in range(15)])
        assert greeting.startswith(b'{\r\n    "QMP": {\r\n        "version": {\r\n')
        assert greeting.endswith(
            b'        "capabilities": [\r\n            "oob"\r\n        ]\r\n    }\r\n}\r\n'
        )
        await c.send(b'{"execute":"qmp_capabilities"}')
        assert b"".join([await c.line() for _ in range(3)]) == b'{\r\n    "return": {\r\n    }\r\n'
        assert await c.line() == b"}\r\n"
        await c.close()


async def test_quit_reply_is_flushed_before_close(scratch: Path) -> None:
    path = scratch / "m.sock"
    chardev = SocketChardev("m", path=str(path), wait=False)
    async with serving(chardev) as (server, fake):
        c = await Raw.unix(path)
        await c.negotiate()
        await c.send(b'{"execute":"quit"}')
        async with asyncio.timeout(TIMEOUT):
            await fake.quit_requested.wait()
        await server.close()  # what the daemon does on quit
        assert await c.line() == b'{"return": {}}\r\n'
        async with asyncio.timeout(TIMEOUT):
            assert await c.reader.read() == b""
        await c.close()
    assert not path.exists()  # the socket file goes with the chardev


async def test_close_waits_for_a_command_in_flight(scratch: Path) -> None:
    path = scratch / "m.sock"
    async with serving(SocketChardev("m", path=str(path), wait=False)) as (server, fake):
        c = await Raw.unix(path)
        await c.negotiate()
        await c.send(b'{"execute":"slow","id":1}')
        async with asyncio.timeout(TIMEOUT):
            await fake.started.wait()
        closing = asyncio.ensure_future(server.close())
        fake.release.set()
        async with asyncio.timeout(TIMEOUT):
            await closing
        assert await c.line() == b'{"return": {}, "id": 1}\r\n'
        await c.close()


async def test_client_gone_mid_command(scratch: Path) -> None:
    path = scratch / "m.sock"
    async with serving(SocketChardev("m", path=str(path), wait=False)) as (_, fake):
        c = await Raw.unix(path)
        await c.negotiate()
        await c.send(b'{"execute":"slow"}')
        async with asyncio.timeout(TIMEOUT):
            await fake.started.wait()
        c.writer.transport.abort()
        fake.release.set()
        # The monitor survives and serves the next client.
        d = await Raw.unix(path)
        await d.negotiate()
        await d.send(b'{"execute":"echo","arguments":{"after":true}}')
        assert await d.line() == b'{"return": {"after": true}}\r\n'
        assert fake.finished == ["slow"]
        await d.close()


async def test_pipelined_commands_run_one_per_loop_turn(scratch: Path) -> None:
    """40 commands of ~5 ms in one write: the loop runs other callbacks between them (the
    suite fails a test whose callback holds the loop 50 ms), and every reply arrives."""
    path = scratch / "m.sock"
    async with serving(SocketChardev("m", path=str(path), wait=False)) as (_, fake):
        client = await Raw.unix(path)
        try:
            await client.negotiate()
            await client.send(b'{"execute":"busy"}' * 40)
            for _ in range(40):
                assert await client.line() == b'{"return": {}}\r\n'
        finally:
            await client.close()
        assert fake.finished == ["busy"] * 40


async def test_commands_of_a_client_gone_are_dropped(scratch: Path) -> None:
    """A client that pipelines commands and hangs up: the rest of its queue is dropped, as
    qsd drops it, and the next client is served at once (not after the whole queue)."""
    path = scratch / "m.sock"
    async with serving(SocketChardev("m", path=str(path), wait=False)) as (_, fake):
        gone = await Raw.unix(path)
        await gone.negotiate()
        await gone.send(b'{"execute":"busy"}' * 40)
        await gone.close()
        client = await Raw.unix(path)
        try:
            await client.negotiate()
        finally:
            await client.close()
        assert len(fake.finished) < 40


async def test_client_that_never_reads_is_dropped(scratch: Path) -> None:
    stuck_path, ok_path = scratch / "stuck.sock", scratch / "ok.sock"
    async with serving(
        SocketChardev("s", path=str(stuck_path), wait=False),
        SocketChardev("o", path=str(ok_path), wait=False),
        max_output_buffer=64 << 10,
    ) as (server, _):
        stuck = await Raw.unix(stuck_path)
        await stuck.negotiate()
        ok = await Raw.unix(ok_path)
        await ok.negotiate()
        big = {"blob": "x" * 4000}
        ok_lines = 0
        for _ in range(400):  # 1.6 MB: more than the kernel buffers plus our 64 KiB
            server.broadcast("BIG", big, 0)
            await ok.line()
            ok_lines += 1
        assert ok_lines == 400
        # The stuck client was cut off; its stream ends before all 400 events.
        got = 0
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while await stuck.reader.readuntil(b"\r\n"):
                    got += 1
        assert got < 400
        await ok.send(b'{"execute":"echo"}')
        assert await ok.line() == b'{"return": {}}\r\n'
        await stuck.close()
        await ok.close()


async def test_wait_on_blocks_until_a_client_connects(scratch: Path) -> None:
    path = scratch / "w.sock"
    chardev = SocketChardev("w", path=str(path), wait=True)
    await chardev.start()
    try:
        assert chardev.waiting_message == (
            f"QEMU waiting for connection on: disconnected:unix:{path},server=on"
        )
        waiting = asyncio.ensure_future(chardev.wait_for_client())
        c = await Raw.unix(path)
        async with asyncio.timeout(TIMEOUT):
            await waiting
        async with serving(NullChardev("n")) as (server, _):
            server.add(chardev)
            await c.negotiate()
            await c.close()
    finally:
        await chardev.close()
    assert not path.exists()


async def test_stale_socket_file_is_replaced(scratch: Path) -> None:
    path = scratch / "m.sock"
    first = SocketChardev("a", path=str(path), wait=False)
    await first.start()
    first._listener.close()  # type: ignore[union-attr]  # simulate a crashed previous owner
    first._listener = None
    assert path.exists()
    async with serving(SocketChardev("m", path=str(path), wait=False)):
        c = await Raw.unix(path)
        await c.negotiate()
        await c.close()
    assert not path.exists()


def test_null_chardev_filename() -> None:
    assert NullChardev("n").filename == "null"


async def test_a_chardev_takes_one_monitor() -> None:
    chardev = NullChardev("n")
    async with serving(chardev) as (server, _):
        assert chardev.frontend_open
        with pytest.raises(QmpError, match=r"^Device 'n' is in use$"):
            server.add(chardev)
