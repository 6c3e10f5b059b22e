"""QMP monitors: serve one client at a time per chardev, run its requests, broadcast events.

Edge (ring 3): owns one task per monitor and the client streams; the protocol itself lives in
`protocol.QmpSession` and commands in the injected dispatcher.
Invariants: a monitor's next request starts only after its previous reply was queued for
writing; nothing a client sends or fails to read can stop another monitor (malformed input
gets an error reply; a client that does not read has its own command loop held back by
`drain()`, and is dropped when events pile up past `max_output_buffer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Awaitable, Callable, Container, Mapping
from dataclasses import dataclass

from storage_daemon.errors import QmpError
from storage_daemon.monitor.chardev import Chardev, Connection
from storage_daemon.monitor.jsonstream import JsonValue
from storage_daemon.monitor.protocol import (
    Execute,
    QmpSession,
    SendBytes,
    SessionState,
    encode_event,
)

log = logging.getLogger(__name__)

READ_CHUNK = 8192  # bytes parsed per loop turn: keeps each turn well under a few ms
MAX_OUTPUT_BUFFER = 16 << 20  # unsent bytes tolerated before a non-reading client is dropped
CLOSE_GRACE = 5.0  # seconds close() waits for an in-flight command before cancelling it


@dataclass(frozen=True)
class MonitorContext:
    """What a command handler may want to know about the monitor that sent it."""

    monitor: Monitor
    session: QmpSession


Dispatcher = Callable[[MonitorContext, str, dict[str, JsonValue] | None], Awaitable[object]]


class Monitor:
    """`--monitor chardev=ID[,pretty=on]`: a QMP server on one chardev.

    Created by `MonitorServer.add()`. Clients are served one at a time; each gets the greeting
    and a fresh `QmpSession`."""

    def __init__(
        self,
        owner: MonitorServer,
        chardev: Chardev,
        *,
        pretty: bool = False,
        id: str | None = None,
    ) -> None:
        self.owner = owner
        self.chardev = chardev
        self.pretty = pretty
        self.id = id
        self.session: QmpSession | None = None
        self._conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # running a command or writing its reply
        self._closing = False
        self._finishing = False  # the session ended and its stream is being flushed
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("monitor already started")
        self.chardev.frontend = self
        self._task = asyncio.get_running_loop().create_task(
            self._serve(), name=f"qmp-monitor-{self.chardev.id}"
        )

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def _serve(self) -> None:
        while not self._closing:
            try:
                conn = await self.chardev.accept()
            except OSError as exc:
                log.error("monitor %s: accept failed: %s", self.chardev.id, exc)
                await asyncio.sleep(0.1)  # e.g. out of file descriptors: retry later
                continue
            if conn is None:
                return
            try:
                await self._run_session(conn)
            except (ConnectionError, OSError) as exc:
                log.debug("monitor %s: client gone: %s", self.chardev.id, exc)
            finally:
                self._finishing = True
                self.session = None
                self._conn = None
                await conn.aclose()
                self._finishing = False

    async def _run_session(self, conn: Connection) -> None:
        owner = self.owner
        session = QmpSession(
            owner.version,
            pretty=self.pretty,
            oob_offered=self.chardev.supports_oob,
            commands=owner.commands,
        )
        self._conn = conn
        self.session = session
        writer = conn.writer
        writer.write(session.greeting())
        # As qsd (its monitor thread greets; the main loop runs commands once start-up is
        # over): nothing the client sends is read before the command line is applied.
        await owner.started.wait()
        context = MonitorContext(self, session)
        while True:
            event = session.next_event()
            while event is not None:
                if isinstance(event, SendBytes):
                    writer.write(event.data)
                elif not owner.dispatching:
                    # The daemon is exiting: as qsd, whose monitors dispatch nothing once its
                    # main loop has ended, no command runs or gets a reply any more (events
                    # still go out) until the monitors are closed.
                    await writer.drain()
                    await owner.closed.wait()
                    return
                else:
                    # One command per loop turn: a client that pipelines many must not hold
                    # the loop (NBD clients, other monitors) for the whole batch, and its
                    # replies go out (or fail: it is gone) as they are made.
                    await asyncio.sleep(0)
                    if conn.reader.at_eof():
                        # The client closed its side: push the replies out, which fails at
                        # once if it is gone entirely (not if it only half-closed to read).
                        await writer.drain()
                    if writer.is_closing():
                        # A reply could not be sent: the client is gone. Its queued commands
                        # are dropped, as qsd drops them, so the next client is served at once.
                        return
                    writer.write(await self._execute(context, session, event))
                if self._closing:
                    return
                event = session.next_event()
            await writer.drain()
            if self._closing:
                return
            data = await conn.reader.read(READ_CHUNK)
            if not data:
                return  # EOF: anything still buffered has nobody to answer to
            session.receive_data(data)

    async def _execute(self, context: MonitorContext, session: QmpSession, ex: Execute) -> bytes:
        self._busy = True
        self._idle.clear()
        try:
            try:
                result = await self.owner.dispatcher(context, ex.command, ex.arguments)
            except QmpError as err:
                return session.reply_error(ex, err)
            except MemoryError:  # a size the host cannot hold (qsd aborts): a clean error
                log.error("command %s: out of memory", ex.command)
                return session.reply_error(ex, QmpError(os.strerror(errno.ENOMEM)))
            except Exception as exc:  # a handler bug must not take the monitor down
                log.exception("command %s failed unexpectedly", ex.command)
                return session.reply_error(ex, QmpError(f"internal error: {exc}"))
            try:
                return session.reply(ex, result)
            except TypeError as exc:
                log.error("command %s returned a non-JSON value: %s", ex.command, exc)
                return session.reply_error(ex, QmpError(f"internal error: {exc}"))
        finally:
            self._busy = False
            self._idle.set()

    def send_event(
        self, data_by_pretty: dict[bool, bytes], name: str, data: object | None, timestamp_ns: int
    ) -> None:
        """Write an event to this monitor's client if its session is negotiated."""
        session, conn = self.session, self._conn
        if session is None or conn is None or session.state is not SessionState.COMMAND:
            return
        payload = data_by_pretty.get(session.pretty)
        if payload is None:
            payload = encode_event(session, name, data, timestamp_ns)
            data_by_pretty[session.pretty] = payload
        transport = conn.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() + len(payload) > self.owner.max_output_buffer:
            log.warning("monitor %s: client is not reading; dropping it", self.chardev.id)
            conn.abort()
            return
        conn.writer.write(payload)

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop serving. A command in flight may finish (up to `grace` seconds) so that its
        reply (e.g. `quit`'s) is written; buffered output is flushed before the stream closes."""
        self._closing = True
        task = self._task
        if task is None:
            return
        if self._busy:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        if not task.done() and not self._finishing:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self.chardev.frontend is self:
            self.chardev.frontend = None


class MonitorServer:
    """All monitors of the daemon, one dispatcher, and event broadcast.

    `dispatcher(context, command, arguments)` runs a command: it returns the JSON-able result
    or raises QmpError. `version` is the greeting's version object. `commands`, if given, is
    the set of known command names (see `QmpSession`)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        version: Mapping[str, JsonValue],
        *,
        commands: Container[str] | None = None,
        max_output_buffer: int = MAX_OUTPUT_BUFFER,
        started: asyncio.Event | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.version = dict(version)
        self.commands = commands
        self.max_output_buffer = max_output_buffer
        self.monitors: list[Monitor] = []
        self.dispatching = True  # False once the daemon exits: commands are left unanswered
        self.closed = asyncio.Event()
        # Clear while start-up applies the command line (Daemon.begin_startup): like qsd,
        # whose main loop only runs once every option is applied, a client that connects
        # meanwhile is greeted but no command of its runs (none at all if start-up fails).
        if started is None:
            started = asyncio.Event()
            started.set()
        self.started = started

    def stop_dispatching(self) -> None:
        """The daemon is exiting (quit, a signal): no monitor runs another command; a command
        in flight (`quit` itself) still gets its reply."""
        self.dispatching = False

    def add(self, chardev: Chardev, *, pretty: bool = False, id: str | None = None) -> Monitor:
        """Attach and start a monitor on a started chardev (call from the running loop)."""
        if chardev.frontend is not None:
            raise QmpError(f"Device '{chardev.id}' is in use")  # qsd's text for --monitor
        monitor = Monitor(self, chardev, pretty=pretty, id=id)
        monitor.start()
        self.monitors.append(monitor)
        return monitor

    def broadcast(self, name: str, data: object | None, timestamp_ns: int) -> None:
        """Send an event to every monitor whose client has negotiated capabilities.
        `data` None omits the `data` member. Never blocks."""
        encoded: dict[bool, bytes] = {}
        for monitor in self.monitors:
            monitor.send_event(encoded, name, data, timestamp_ns)

    async def remove(self, monitor: Monitor) -> None:
        await monitor.close()
        with contextlib.suppress(ValueError):
            self.monitors.remove(monitor)

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop every monitor, letting in-flight replies be written and flushed first."""
        monitors, self.monitors = self.monitors, []
        self.dispatching = False
        self.closed.set()
        await asyncio.gather(*(m.close(grace) for m in monitors))
