"""Character devices a monitor can sit on: socket (unix/TCP, server or client), stdio, null.

Edge (ring 3): owns listening sockets, outgoing connections and the stdio pipes.
Invariant: a chardev hands out at most one live `Connection` at a time (its consumer asks for
the next one only after closing the previous), so a second client of a server socket waits
in the kernel's listen backlog, connected but unanswered, exactly as with qsd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

from storage_daemon.errors import QmpError
from storage_daemon.hostpath import host_path

_LISTEN_BACKLOG = 16
_CLOSE_TIMEOUT = 2.0


def _strerror(exc: OSError) -> str:
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc)


class Connection:
    """One client stream. Closing it tells the chardev it is free for the next client."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        description: str,
        on_close: Callable[[Connection], None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.description = description  # the chardev's filename while connected
        self._on_close = on_close
        self._closed = False

    def abort(self) -> None:
        """Drop the connection without flushing (peer does not read)."""
        self.writer.transport.abort()

    async def aclose(self) -> None:
        """Flush what is buffered (bounded by a timeout), then close."""
        if self._closed:
            return
        self._closed = True
        try:
            self.writer.close()
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await self.writer.wait_closed()
            except (OSError, TimeoutError):
                self.writer.transport.abort()
        finally:
            if self._on_close is not None:
                self._on_close(self)


class Chardev(ABC):
    """A chardev: `start()` it, then its single consumer calls `accept()` repeatedly.

    `filename` is what query-chardev shows; `frontend` is the object using the chardev
    (the monitor), which makes `chardev-remove` report it busy."""

    supports_oob = True

    def __init__(self, id: str) -> None:
        self.id = id
        self.frontend: object | None = None
        self._closed = asyncio.Event()

    @property
    def frontend_open(self) -> bool:
        return self.frontend is not None

    @property
    @abstractmethod
    def filename(self) -> str: ...

    async def start(self) -> None:
        """Acquire resources; raises QmpError with qsd's text on failure."""

    @abstractmethod
    async def accept(self) -> Connection | None:
        """The next connection, or None once the chardev will never produce another."""

    async def close(self) -> None:
        self._closed.set()

    async def _wait_closed(self) -> None:
        await self._closed.wait()


class NullChardev(Chardev):
    """`null`: never produces a connection; a monitor on it is silent."""

    @property
    def filename(self) -> str:
        return "null"

    async def accept(self) -> Connection | None:
        await self._wait_closed()
        return None


class StdioChardev(Chardev):
    """`stdio`: one connection made of standard input and output; none after input EOF."""

    def __init__(self, id: str, *, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        super().__init__(id)
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._used = False
        self._out_pump: threading.Thread | None = None

    @property
    def filename(self) -> str:
        return "stdio"

    async def accept(self) -> Connection | None:
        if self._used:
            await self._wait_closed()
            return None
        self._used = True
        if not (_pollable(self._stdin_fd) and _pollable(self._stdout_fd)):
            return await self._bridged()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        in_file = os.fdopen(os.dup(self._stdin_fd), "rb", buffering=0)
        out_file = os.fdopen(os.dup(self._stdout_fd), "wb", buffering=0)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), in_file)
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), out_file
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        return Connection(reader, writer, "stdio")

    async def _bridged(self) -> Connection:
        """Stdio that epoll cannot watch (/dev/null, regular files): pump it through a
        socketpair with two threads, so the monitor still sees an ordinary stream."""
        ours, theirs = socket.socketpair()
        pumps = (
            threading.Thread(target=pump_in, args=(self._stdin_fd, theirs), daemon=True),
            threading.Thread(target=pump_out, args=(theirs, self._stdout_fd), daemon=True),
        )
        for pump in pumps:
            pump.start()
        self._out_pump = pumps[1]
        reader, writer = await asyncio.open_connection(sock=ours)
        return Connection(reader, writer, "stdio")

    async def close(self) -> None:
        await super().close()
        if self._out_pump is not None:
            # Replies written before the monitor closed must reach stdout before we exit.
            await asyncio.to_thread(self._out_pump.join, _CLOSE_TIMEOUT)
            self._out_pump = None


def _pollable(fd: int) -> bool:
    """Whether epoll accepts `fd` (it refuses regular files and /dev/null)."""
    poller = select.epoll()
    try:
        poller.register(fd, select.EPOLLIN)
    except OSError:
        return False
    finally:
        poller.close()
    return True


def pump_in(fd: int, sock: socket.socket) -> None:
    """Thread body: copy a file descriptor into a socket until EOF."""
    try:
        while data := os.read(fd, 65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def pump_out(sock: socket.socket, fd: int) -> None:
    """Thread body: copy a socket into a file descriptor until EOF."""
    try:
        while data := sock.recv(65536):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    except OSError:
        pass
    finally:
        sock.close()


class SocketChardev(Chardev):
    """`socket`: a unix path or TCP host:port, as a server (`server=True`) or a client.

    Server with `wait=True`: the command line must call `wait_for_client()` (after printing
    `waiting_message`) before going on, as qsd blocks startup until a client connects.
    Client with `reconnect` > 0: a failed or lost connection is retried every `reconnect`
    seconds; the first failure is reported once through `on_error`. Without `reconnect`
    a failure at start is an error and a lost connection is never re-made."""

    def __init__(
        self,
        id: str,
        *,
        path: str | None = None,
        host: str | None = None,
        port: str | int | None = None,
        server: bool = True,
        wait: bool = True,
        reconnect: int = 0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(id)
        if (path is None) == (host is None):
            raise QmpError("chardev: socket: exactly one of 'path' or 'host' is required")
        if host is not None and port is None:
            raise QmpError("chardev: socket: 'port' is required with 'host'")
        self.path = path
        self.host = host
        self.port = str(port) if port is not None else None
        self.server = server
        self.wait = wait and server
        self.reconnect = reconnect if not server else 0
        self.on_error = on_error
        self._listener: socket.socket | None = None
        self._bound: tuple[str, str] | None = None  # actual host, port of a TCP listener
        self._current: Connection | None = None
        self._ready: Connection | None = None  # from wait_for_client() or the first connect
        self._ended = False
        self._error_reported = False

    # -- names ---------------------------------------------------------------------------

    def _endpoint(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host, port = self._bound if self._bound else (self.host or "", self.port or "")
        return f"tcp:{host}:{port}"

    @property
    def filename(self) -> str:
        if self._current is not None:
            return self._current.description
        suffix = ",server=on" if self.server else ""
        return f"disconnected:{self._endpoint()}{suffix}"

    @property
    def waiting_message(self) -> str:
        return f"QEMU waiting for connection on: {self.filename}"

    @property
    def address(self) -> str | tuple[str, int]:
        """Where a server listens (unix path or actual (host, port))."""
        if self.path is not None:
            return self.path
        assert self._bound is not None
        return (self._bound[0], int(self._bound[1]))

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self.server:
            await self._listen()
            return
        try:
            self._ready = await self._connect()
        except QmpError as exc:
            if not self.reconnect:
                raise
            self._report(exc)

    async def _listen(self) -> None:
        if self.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                path = host_path(self.path)
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)
                sock.bind(path)
                sock.listen(_LISTEN_BACKLOG)
            except OSError as exc:
                sock.close()
                raise QmpError(f"Failed to bind socket to {self.path}: {_strerror(exc)}") from exc
        else:
            sock = await self._tcp_listen()
        sock.setblocking(False)
        self._listener = sock

    async def _tcp_listen(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        assert self.host is not None and self.port is not None
        try:
            infos = await loop.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise QmpError(
                f"address resolution failed for {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        last: OSError | None = None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(_LISTEN_BACKLOG)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            bound = sock.getsockname()
            self._bound = (str(bound[0]), str(bound[1]))
            return sock
        reason = _strerror(last) if last is not None else "no address"
        raise QmpError(f"Failed to find an available port: {reason}")

    async def wait_for_client(self) -> None:
        """For `wait=True` servers: block until the first client connects."""
        if self._ready is None:
            self._ready = await self._accept_one()

    async def _accept_one(self) -> Connection:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        conn_sock, peer = await loop.sock_accept(self._listener)
        if self.path is not None:
            reader, writer = await asyncio.open_unix_connection(sock=conn_sock)
            desc = f"unix:{self.path},server=on"
        else:
            reader, writer = await asyncio.open_connection(sock=conn_sock)
            desc = f"{self._endpoint()},server=on <-> {peer[0]}:{peer[1]}"
        return Connection(reader, writer, desc, self._released)

    async def _connect(self) -> Connection:
        try:
            if self.path is not None:
                reader, writer = await asyncio.open_unix_connection(host_path(self.path))
                local = writer.get_extra_info("sockname") or ""
                desc = f"unix:{local}"
            else:
                assert self.host is not None and self.port is not None
                reader, writer = await asyncio.open_connection(self.host, int(self.port))
                lh, lp = writer.get_extra_info("sockname")[:2]
                ph, pp = writer.get_extra_info("peername")[:2]
                desc = f"tcp:{lh}:{lp} <-> {ph}:{pp}"
        except OSError as exc:
            target = self.path if self.path is not None else f"{self.host}:{self.port}"
            raise QmpError(f"Failed to connect to '{target}': {_strerror(exc)}") from exc
        self._error_reported = False
        return Connection(reader, writer, desc, self._released)

    def _report(self, exc: QmpError) -> None:
        if not self._error_reported and self.on_error is not None:
            self.on_error(f"Unable to connect character device {self.id}: {exc.desc}")
        self._error_reported = True

    def _released(self, conn: Connection) -> None:
        if self._current is conn:
            self._current = None

    async def accept(self) -> Connection | None:
        if self._closed.is_set() or self._ended:
            return None
        conn: Connection | None
        if self._ready is not None:
            conn, self._ready = self._ready, None
        elif self.server:
            conn = await self._accept_one()
        else:
            conn = await self._reconnect()
            if conn is None:
                self._ended = True
                return None
        self._current = conn
        return conn

    async def _reconnect(self) -> Connection | None:
        if not self.reconnect:
            return None  # a client chardev without reconnect connects once
        while True:
            await asyncio.sleep(self.reconnect)
            try:
                return await self._connect()
            except QmpError as exc:
                self._report(exc)

    async def close(self) -> None:
        await super().close()
        if self._ready is not None:
            await self._ready.aclose()
            self._ready = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(host_path(self.path))
