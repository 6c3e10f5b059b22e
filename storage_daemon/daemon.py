"""The composition root: builds the daemon from its command line and runs it until exit.

Edge ring. Options are applied strictly left to right through the same handlers QMP uses.
Shutdown (quit, SIGTERM, SIGINT, SIGHUP) runs qsd's exit: exports closed, every job drained
and then cancelled, nodes closed, and only then `quit`'s reply and the monitors' last output
flushed; sockets we created and the pidfile are removed, and the exit status is 0.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING, Any

from storage_daemon import __version__
from storage_daemon.blockdev.graph import BlockGraph
from storage_daemon.blockdev.jobs.manager import JobManager
from storage_daemon.clock import Clock, SystemClock
from storage_daemon.errors import QmpError
from storage_daemon.events import EventBus
from storage_daemon.export.export import ExportRegistry
from storage_daemon.monitor.chardev import Chardev
from storage_daemon.monitor.dispatch import CommandContext, Dispatcher
from storage_daemon.monitor.server import MonitorServer
from storage_daemon.objects import ObjectRegistry
from storage_daemon.qapi_generated.commands import COMMANDS

if TYPE_CHECKING:
    from storage_daemon.export.nbd.server import NbdServer

# The QEMU version whose interface we implement; clients gate features on it.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}


class Daemon:
    """Everything the daemon holds: nodes, objects, chardevs, monitors, event listeners."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self.graph = BlockGraph()
        self.objects = ObjectRegistry(self.clock)
        self.events = EventBus(self.clock)
        self.graph.emit_hook = self.events.emit  # drivers' events (node.graph.emit)
        self.jobs = JobManager(self.events.emit, self.clock)
        self.exports = ExportRegistry(self.graph, self.events.emit)
        self.nbd_server: NbdServer | None = None
        self.dispatcher = Dispatcher(self)
        self.chardevs: dict[str, Chardev] = {}
        # Set except while start-up applies the command line (`begin_startup`): qsd's main
        # loop only runs afterwards, so until then no monitor runs a command and the NBD
        # server greets no client (both wait for this).
        self.started = asyncio.Event()
        self.started.set()
        self.monitor_server = MonitorServer(
            self.dispatcher.dispatch,
            self.version_info(),
            commands=set(COMMANDS),
            started=self.started,
        )
        self.events.subscribe(self.monitor_server.broadcast)
        self._exit = asyncio.Event()
        self._monitors_closing = asyncio.Event()  # qsd's monitor_cleanup: replies go out

    # --- facts ------------------------------------------------------------------------

    def version_info(self) -> dict[str, Any]:
        return {"qemu": dict(QEMU_VERSION), "package": f"storage-daemon {__version__}"}

    # --- lifecycle --------------------------------------------------------------------

    def begin_startup(self) -> None:
        self.started.clear()

    def end_startup(self) -> None:
        self.started.set()

    def request_exit(self) -> None:
        self.monitor_server.stop_dispatching()
        self._exit.set()

    async def wait_monitor_cleanup(self) -> None:
        """Until shutdown reaches the monitors. qsd runs `quit` in the main loop, which then
        ends, and its reply is only sent by the monitor cleanup at the very end of the exit:
        after the jobs' and exports' last events."""
        await self._monitors_closing.wait()

    async def wait_exit(self) -> None:
        await self._exit.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self.request_exit)

    async def run_command(self, name: str, arguments: dict[str, Any] | None) -> Any:
        """Run a QMP command as the command line does (no monitor session)."""
        return await self.dispatcher.dispatch(None, name, arguments)

    async def call_handler(self, name: str, args: Any) -> Any:
        """Run a handler with already-typed arguments (command-line options)."""
        handler = await self.dispatcher.handler(name)
        return await handler(CommandContext(self), args)

    def add_monitor(self, chardev: Chardev, *, pretty: bool, monitor_id: str | None) -> None:
        self.monitor_server.add(chardev, pretty=pretty, id=monitor_id)

    async def shutdown(self) -> None:
        """qsd's exit, in its order: the exports go (their BLOCK_EXPORT_DELETED events still
        reach the monitors), every node is drained, which pauses the block jobs, and every
        job is force-cancelled and waited for, newest first (transaction.drain_all_order,
        JobManager.shutdown); then the nodes are closed, newest first, and only then the
        monitors are cleaned up: `quit`'s reply is written, output flushed, chardevs closed.
        Unlike qsd, the NBD server's unix socket file is removed."""
        from storage_daemon.blockdev.transaction import drain_all_order

        try:
            server, self.nbd_server = self.nbd_server, None
            if server is not None:
                await server.stop()
            for export in self.exports:
                export.request_shutdown()
            drained, _resumed = drain_all_order(self)
            await self.jobs.shutdown(drained)
            await self.graph.settle()  # nodes freed when their last export went away
            await self._close_nodes()
        finally:
            self._monitors_closing.set()
        await self.monitor_server.close()
        for chardev in reversed(list(self.chardevs.values())):
            await chardev.close()
        self.chardevs.clear()
        self.objects.close_all()  # throttle timers and the like

    async def _close_nodes(self) -> None:
        for node in reversed(list(self.graph)):
            if node.monitor_owned and self.graph.find(node.name) is node:
                try:
                    await self.graph.delete(node.name)
                except QmpError:
                    pass  # still used by another node: closed with its parent
        for node in reversed(list(self.graph)):
            await self.graph.remove(node)
