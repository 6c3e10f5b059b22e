"""The NBD server edge: listeners, one protocol object per client, requests run as tasks.

Edge ring. Bytes go from the socket straight into the sans-IO core's buffers (asyncio/uvloop
`BufferedProtocol`); each request the core hands out is answered in the read callback when
every layer can do it without waiting (`io.*_now`) or is handed to a driver's own thread that
calls back (`io.pwrite_start`: large tmpfs writes), else starts there (its first step runs at
once) and continues as a task owned by its connection; replies go out as requests complete
(out of order), those of one loop iteration in one write. Invariants: one callback
does at most `EAGER_BUDGET` of work, at most `MAX_RUNNING` requests of a connection
execute at once, the rest wait in a queue while reading is paused, and reading also stops
while the socket's send buffer is above its high-water mark, so a client that never reads
its replies cannot make us buffer without bound; a connection is finished (export reference
dropped, slot freed) only once its last request ended; no exception from the block layer
ever escapes a request.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import errno
import logging
import socket
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from functools import partial
from typing import Any, cast

from storage_daemon.blockdev import io
from storage_daemon.blockdev.bitmaps.registry import DirtyBitmap
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.errors import QmpError
from storage_daemon.export.export import BlockExport
from storage_daemon.export.nbd.constants import (
    CONTEXT_ID_ALLOCATION_DEPTH,
    CONTEXT_ID_BASE_ALLOCATION,
    CONTEXT_ID_FIRST_BITMAP,
    STATE_HOLE,
    STATE_ZERO,
    Cmd,
    CmdFlag,
)
from storage_daemon.export.nbd.listen import Endpoint, Listener, close_listeners, open_listeners
from storage_daemon.export.nbd.protocol import (
    Close,
    Event,
    ExportInfo,
    HandshakeDone,
    Request,
    ServerConnection,
)

log = logging.getLogger(__name__)

HANDSHAKE_LIMIT = 10.0
"""Seconds a client may take to choose an export (qsd 7.2 as Debian patched it)."""
DEFAULT_MAX_CONNECTIONS = 100
MAX_RUNNING = 32
"""Requests of one connection executing at once; further ones queue, reading pauses."""
EAGER_BUDGET = 128 * 1024
"""How much request work one callback may do, in bytes (each request counts `EAGER_COST`,
plus its length when it moves data): requests answered at once (holes, cached reads, tmpfs
writes) or started eagerly need no task, while a callback stays within a few hundred
microseconds. What is left waits in the queue for the next callback (reading paused).
128 KiB rather than 512: with nbdcopy reading at full speed during a mirror, query-jobs p99
7-8.6 ms instead of 9.7 (median of 5 runs, bench/job_bench.py), at the same NBD throughput."""
EAGER_COST = 16 * 1024
START_MIN = 128 * 1024
"""WRITEs this large are offered to `io.pwrite_start` first: a driver may finish them on a
thread of its own (tmpfs copies) while the loop reads on; smaller ones cost less inline, and
only go there when they cannot run inline (a file on a disk: no task, no coroutine)."""
WRITE_HIGH_WATER = 8 * 1024 * 1024
WRITE_LOW_WATER = 2 * 1024 * 1024
SEND_BUFFER = 1024 * 1024
"""SO_SNDBUF asked for each client socket. The default (~208 KiB) holds less than one
256 KiB nbdcopy reply, so each reply took several rounds of "client drains the socket, we
are woken to write the next piece"; measured with nbdcopy on tmpfs: 1.26x -> 1.54x of qsd,
with less CPU per request (4 MiB gained nothing more)."""
LIVE_MIN = 65536
"""Data chunks from this size on may be sent from a live view of a tmpfs image (one copy,
not two). Below it a plain read is cheaper: the copy is small, while a view costs an fstat
and, in a mapping not touched there yet, a page fault per page."""
CHUNKS_PER_STEP = 32
"""A sparse READ yields to the loop after this many chunks (a 32 MiB read of 512-byte
clusters could otherwise be 65536 chunks in one callback)."""
MAX_EXTENTS = 8192
"""Extents per BLOCK_STATUS context in one reply (clients ask again for the rest)."""

_FUA = int(CmdFlag.FUA)
_DF = int(CmdFlag.DF)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_REQ_ONE = int(CmdFlag.REQ_ONE)

# What an error reply says, per command (qsd's wording where it has one).
_FAILURE_TEXT = {
    Cmd.READ: "reading from file failed",
    Cmd.WRITE: "writing to file failed",
    Cmd.WRITE_ZEROES: "writing to file failed",
    Cmd.TRIM: "discard failed",
    Cmd.FLUSH: "flush failed",
    Cmd.CACHE: "caching data failed",
    Cmd.BLOCK_STATUS: "can't get block status",
}
_HOLE_CHECK_FAILED = "unable to check for holes"  # qsd's text (in its log: it hangs up)


class NbdExport(BlockExport):
    """An export served by the NBD server under `info.name`."""

    type_name = "nbd"

    def __init__(
        self,
        export_id: str,
        node: BlockNode,
        *,
        writable: bool,
        writethrough: bool,
        server: NbdServer,
    ) -> None:
        super().__init__(export_id, node, writable=writable, writethrough=writethrough)
        self.server = server
        self.info: ExportInfo | None = None
        self.connections: set[NbdConnection] = set()
        self.bitmaps: list[DirtyBitmap] = []  # info.bitmaps' contexts, in order

    def hold_bitmaps(self, bitmaps: list[DirtyBitmap]) -> None:
        """Export these bitmaps: busy (no other operation may use them) until deleted."""
        self.bitmaps = bitmaps
        for bitmap in bitmaps:
            bitmap.busy = True
        self.on_delete(self._release_bitmaps)

    def _release_bitmaps(self, _export: BlockExport) -> None:
        for bitmap in self.bitmaps:
            bitmap.busy = False

    def publish(self, info: ExportInfo) -> None:
        """Make the export visible to clients (after every check passed).

        The minimum block size is the node's request alignment, as qsd advertises it (65536
        for a compress node over qcow2, 512 for a file node with cache.direct=on); the
        maximum is capped by the smallest max_transfer down its data children (a
        blkdebug max-transfer below raw shows through, as QEMU merges the limits).
        """
        align = self.node.driver.request_alignment
        most = _max_transfer(self.node)
        if align > info.block_size_min or 0 < most < info.block_size_max:
            info = dataclasses.replace(
                info,
                block_size_min=max(align, info.block_size_min),
                block_size_max=min(most, info.block_size_max) if most else info.block_size_max,
            )
        self.info = info
        self.server.add_export(self)

    def _close_clients(self) -> None:
        # qsd frees the name at once: new clients cannot find it, and it may be reused.
        self.server.remove_export(self)
        for conn in list(self.connections):
            conn.abort()


_MERGED_ROLES = ChildRole.DATA | ChildRole.FILTERED | ChildRole.COW


def _max_transfer(node: BlockNode) -> int:
    """The node's max_transfer merged with its data children's (smallest non-zero; 0: none),
    as QEMU's bdrv_refresh_limits merges them."""
    best = node.driver.max_transfer
    for edge in node.children:
        if edge.role & _MERGED_ROLES:
            below = _max_transfer(edge.node)
            if below and (not best or below < best):
                best = below
    return best


class NbdServer:
    """The one NBD server of the daemon: listening sockets, exports by name, connections."""

    def __init__(
        self,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_limit: float = 10.0,
        started: asyncio.Event | None = None,
    ) -> None:
        self.max_connections = max_connections
        # Clients are accepted only once this is set (Daemon.started: not while start-up
        # applies the command line, as qsd, whose main loop is not running then).
        self._started = started
        self.handshake_limit = handshake_limit
        self.infos: dict[str, ExportInfo] = {}
        self._exports: dict[str, NbdExport] = {}
        self._listeners: list[Listener] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self.connections: set[NbdConnection] = set()
        self._slot_free = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- listening --------------------------------------------------------------------

    async def start(self, endpoint: Endpoint, *, from_monitor: bool) -> None:
        """Bind (QmpError with qsd's texts) and start accepting clients."""
        self._listeners = await open_listeners(endpoint, from_monitor=from_monitor)
        for listener in self._listeners:
            task = asyncio.get_running_loop().create_task(self._accept_loop(listener.sock))
            self._accept_tasks.append(task)

    @property
    def addresses(self) -> list[Any]:
        return [listener.sock.getsockname() for listener in self._listeners]

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if self._started is not None:
            await self._started.wait()  # until then clients wait in the kernel's backlog
        while True:
            # At the limit, leave new clients in the kernel's backlog (as qsd does).
            while self.max_connections and len(self.connections) >= self.max_connections:
                self._slot_free.clear()
                await self._slot_free.wait()
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.1)  # out of descriptors: back off, do not spin
                continue
            if client.family in (socket.AF_INET, socket.AF_INET6):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            elif client.family == socket.AF_UNIX:
                _grow_send_buffer(client)  # (TCP tunes its own buffers, better left alone)
            conn = NbdConnection(self)
            self._track(conn)
            try:
                await loop.connect_accepted_socket(conn.factory, client)
            except OSError:
                client.close()
                self._finished(conn)

    def _track(self, conn: NbdConnection) -> None:
        self.connections.add(conn)
        self._idle.clear()

    def _finished(self, conn: NbdConnection) -> None:
        self.connections.discard(conn)
        self._slot_free.set()
        if not self.connections:
            self._idle.set()

    async def stop(self) -> None:
        """Stop listening, shut every NBD export down, drop every client; wait until done."""
        for task in self._accept_tasks:
            task.cancel()
        await asyncio.gather(*self._accept_tasks, return_exceptions=True)
        self._accept_tasks.clear()
        close_listeners(self._listeners)
        self._listeners.clear()
        # Exports go in creation order (qsd's BLOCK_EXPORT_DELETED order).
        for export in list(self._exports.values()):
            export.request_shutdown()
        for conn in list(self.connections):
            conn.abort()
        await self._idle.wait()

    # --- exports ----------------------------------------------------------------------

    def find_export(self, name: str) -> NbdExport | None:
        return self._exports.get(name)

    def add_export(self, export: NbdExport) -> None:
        assert export.info is not None
        self._exports[export.info.name] = export
        self.infos[export.info.name] = export.info

    def remove_export(self, export: NbdExport) -> None:
        info = export.info
        if info is not None and self._exports.get(info.name) is export:
            del self._exports[info.name]
            del self.infos[info.name]


class NbdConnection(asyncio.BufferedProtocol):
    """One client: feeds the core, runs its requests, writes the replies."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._core = ServerConnection(server.infos)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self.export: NbdExport | None = None
        self._edge: BdrvChild | None = None
        self._writethrough = False
        self._sparse_reads = False  # structured replies: READs may be answered by holes
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue: deque[Request] = deque()
        self._running = 0
        self._read_paused = False
        self._write_paused = False
        self._closing = False  # no more requests: finish the running ones, then close
        self._lost = False  # the socket is gone: replies are dropped
        self._finished = False
        self._out: list[bytes | bytearray | memoryview] = []  # replies not yet written
        self._flush_soon = False  # a _flush is scheduled
        self._pump_soon = False  # a _pump_deferred is scheduled
        self._batching = False  # inside _handle: it flushes when done
        self._budget = 0  # what _start may still run eagerly in this callback
        # BufferedProtocol.get_buffer: the transport asks the core directly (it binds the
        # method once; a forwarding method here cost a Python call per read).
        self.get_buffer = self._core.get_buffer  # type: ignore[method-assign]

    def factory(self) -> NbdConnection:
        """The protocol factory handed to the loop for this (already accepted) socket."""
        return self

    # --- transport callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but implement it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        transport.write(self._core.start())
        if self._server.handshake_limit > 0:
            self._timer = self._loop.call_later(self._server.handshake_limit, self._too_slow)

    def buffer_updated(self, nbytes: int) -> None:
        events = self._core.buffer_updated(nbytes)
        if events:
            self._handle(events)
        else:  # a piece of a payload, most of the time: nothing to start
            out = self._core.data_to_send()
            if out:
                self._send(out)

    def eof_received(self) -> bool:
        self._handle(self._core.receive_eof())
        return True  # half-open: replies to requests already read may still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True
        self._cancel_timer()
        self._queue.clear()
        self._out.clear()
        self._maybe_finish()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    # --- control ----------------------------------------------------------------------

    def abort(self) -> None:
        """Hard disconnect (export deleted, server stopped, handshake too slow)."""
        self._closing = True
        self._queue.clear()
        if self._transport is None:
            self._lost = True  # never connected: nothing will call connection_lost
            self._maybe_finish()
        elif not self._lost:
            self._transport.abort()

    def _too_slow(self) -> None:
        self._timer = None
        if self.export is None:
            self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _pause_reading(self) -> None:
        if not self._read_paused and not self._lost and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _handle(self, events: list[Event]) -> None:
        self._batching = True
        self._budget = EAGER_BUDGET
        out = self._core.data_to_send()
        if out:
            self._send(out)
        try:
            for event in events:
                if type(event) is Request:
                    self._submit(event)
                elif isinstance(event, HandshakeDone):
                    self._chosen(event)
                elif isinstance(event, Close):
                    self._closing = True
                    self._pause_reading()
                    self._maybe_finish()
        finally:
            self._batching = False
            if self._out and not self._flush_soon:
                # Not now: libuv reads up to 32 times per readiness event, so more requests
                # may complete in this loop iteration, and their replies join this write.
                self._flush_soon = True
                self._loop.call_soon(self._flush)

    def _chosen(self, event: HandshakeDone) -> None:
        self._cancel_timer()
        export = self._server.find_export(event.export.name)
        if export is None or export.info is not event.export or export.shutting_down:
            self.abort()
            return
        export.ref()
        export.connections.add(self)
        self.export = export
        self._edge = export.edge
        self._writethrough = export.writethrough
        self._sparse_reads = event.structured_replies

    # --- requests ---------------------------------------------------------------------

    def _submit(self, req: Request) -> None:
        if self._closing:
            return  # aborted: the client is being dropped
        if (
            self._running < MAX_RUNNING
            and not self._queue
            and not self._write_paused
            and self._budget > 0
        ):
            self._budget -= EAGER_COST  # (`_run`, inlined: this is the path of every request)
            if not self._answer_now(req):
                self._budget -= req.length
                self._start(req)
            return
        self._queue.append(req)
        self._pause_reading()
        if self._budget <= 0:
            self._pump_later()

    def _run(self, req: Request) -> None:
        """Answer `req` at once when every layer can without waiting, else start it."""
        self._budget -= EAGER_COST
        if not self._answer_now(req):
            self._budget -= req.length
            self._start(req)

    def _answer_now(self, req: Request) -> bool:
        """A READ or WRITE completed synchronously: block status and data from memory, tmpfs
        or the page cache (`io.*_now`); no coroutine, no task. False: nothing was done."""
        edge = self._edge
        if edge is None:
            return False
        cmd = req.command
        try:
            if cmd is Cmd.READ:
                return self._read_now(edge, req)
            if cmd is Cmd.WRITE and edge.node.options.active:
                payload = req.payload
                assert payload is not None
                fua = self._writethrough or bool(req.flags & _FUA)
                large = len(payload) >= START_MIN
                if not fua and large and self._write_start(edge, req, payload):
                    return True
                if io.pwrite_now(edge, req.offset, payload, fua=fua):
                    self._budget -= req.length
                    req.payload = None
                    self._send(self._core.reply_ok(req))
                    return True
                # Not inline (a file on a disk): a driver's writer thread, else a task.
                return not fua and not large and self._write_start(edge, req, payload)
        except OSError as err:
            req.payload = None
            self._fail(req, err.errno or errno.EIO)
            return True
        except Exception:
            log.exception("NBD request %s failed unexpectedly", req.command.name)
            req.payload = None
            self._fail(req, errno.EIO)
            return True
        return False

    def _write_start(self, edge: BdrvChild, req: Request, payload: io.Buffer) -> bool:
        """Hand the WRITE to `io.pwrite_start`; `_written` answers it. False: not taken."""
        if not io.pwrite_start(edge, req.offset, payload, partial(self._written, req)):
            return False
        self._running += 1
        req.payload = None
        return True

    def _written(self, req: Request, error: BaseException | None) -> None:
        """A WRITE that `_answer_now` started (`io.pwrite_start`) ended: answer it."""
        self._running -= 1
        if error is None:
            self._send(self._core.reply_ok(req))
        elif isinstance(error, OSError):
            self._fail(req, error.errno or errno.EIO)
        else:
            log.error("NBD request WRITE failed unexpectedly", exc_info=error)
            self._fail(req, errno.EIO)
        if self._queue or self._read_paused or self._closing:
            self._pump()

    def _read_now(self, edge: BdrvChild, req: Request) -> bool:
        flags = req.flags
        length = req.length
        if flags & _FUA or not length:
            return False
        core = self._core
        if self._sparse_reads and not flags & _DF:
            # One block-status extent covering the read: one hole chunk, or one data chunk
            # (as the awaited path would send them).
            status = io.block_status_now(edge, req.offset, length)
            if status is None or status.length != length:
                return False
            if status.zero:
                self._send(core.reply_hole(req))
                return True
        data = io.pread_now(edge, req.offset, length, live=length >= LIVE_MIN)
        if data is None:
            return False
        self._budget -= length
        self._send(core.reply_read(req), data)
        return True

    def _start(self, req: Request) -> None:
        self._running += 1
        coro = self._serve(req)
        # Eager start (3.12's eager tasks, by hand): the first step runs here, and a request
        # that never waits costs no task at all. Its own context, as a task would have, so
        # context variables set before a wait are still there after it.
        ctx = contextvars.copy_context()
        try:
            waiting = ctx.run(coro.send, None)
        except StopIteration:
            self._running -= 1
            return
        except BaseException:
            self._running -= 1
            raise
        task = self._loop.create_task(_resume(coro, waiting), context=ctx)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._running -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("NBD request task failed", exc_info=task.exception())
        self._pump()

    def _pump_later(self) -> None:
        """Continue with the queue in a later callback: this one used its budget."""
        if not self._pump_soon:
            self._pump_soon = True
            self._loop.call_soon(self._pump_deferred)

    def _pump_deferred(self) -> None:
        self._pump_soon = False
        if not self._lost:
            self._pump()

    def _pump(self) -> None:
        self._budget = EAGER_BUDGET
        while self._queue and self._running < MAX_RUNNING and not self._write_paused:
            if self._budget <= 0:
                self._pump_later()
                break
            self._run(self._queue.popleft())
        if (
            self._read_paused
            and not self._queue
            and not self._closing
            and not self._write_paused
            and self._running < MAX_RUNNING
            and self._transport is not None
        ):
            self._read_paused = False
            self._transport.resume_reading()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self._closing or self._running or self._queue or self._finished:
            return
        if not self._lost:
            # Clean end (DISC, EOF, protocol error): flush what is queued, then close.
            if self._transport is not None:
                self._flush()
                self._transport.close()
            return  # connection_lost calls us again
        self._finished = True
        export, self.export = self.export, None
        if export is not None:
            export.connections.discard(self)
            export.unref()
        self._server._finished(self)

    def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        """Queue a reply; the replies of one callback or loop iteration go in one write."""
        if self._transport is None or self._lost:
            return
        self._out.extend(parts)
        if not self._batching and not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        out = self._out
        if not out:
            return
        self._out = []
        transport = self._transport
        if transport is None or self._lost:
            return
        if len(out) == 1:
            transport.write(out[0])
        else:
            transport.writelines(out)

    async def _serve(self, req: Request) -> None:
        """Execute one request and answer it; every failure becomes an NBD error reply."""
        core = self._core
        edge = self._edge
        try:
            if edge is None:
                raise OSError(errno.ESHUTDOWN, "export gone")
            cmd = req.command
            if cmd is Cmd.READ:
                await self._read(core, edge, req)
                return
            if not edge.node.options.active:
                # QEMU 10.0: an inactive export (allow-inactive) serves reads only.
                self._send(core.reply_error(req, errno.EPERM, "export is inactive"))
                return
            if cmd is Cmd.WRITE:
                assert req.payload is not None
                fua = self._writethrough or bool(req.flags & _FUA)
                await io.pwrite(edge, req.offset, req.payload, fua=fua)
                req.payload = None
            elif cmd is Cmd.BLOCK_STATUS:
                self._send(core.reply_block_status(req, await self._extents(edge, req)))
                return
            elif cmd is Cmd.WRITE_ZEROES:
                await io.pwrite_zeroes(
                    edge,
                    req.offset,
                    req.length,
                    may_unmap=not req.flags & _NO_HOLE,
                    fua=self._writethrough or bool(req.flags & _FUA),
                    fast_only=bool(req.flags & _FAST_ZERO),
                )
            elif cmd is Cmd.TRIM:
                await io.pdiscard(edge, req.offset, req.length)
                if req.flags & _FUA:
                    await io.flush(edge)
            elif cmd is Cmd.FLUSH:
                await io.flush(edge)
            # CACHE: advisory; nothing to prefetch into (the page cache does that for us).
            self._send(core.reply_ok(req))
        except OSError as err:
            self._fail(req, err.errno or errno.EIO)
        except Exception:
            log.exception("NBD request %s failed unexpectedly", req.command.name)
            self._fail(req, errno.EIO)

    def _fail(self, req: Request, code: int, text: str | None = None) -> None:
        if req._reply_state == 2:
            return  # already answered (the failure came after the reply)
        if text is None:
            text = _FAILURE_TEXT.get(req.command, "")
        self._send(self._core.reply_error(req, code, text))

    async def _read(self, core: ServerConnection, edge: BdrvChild, req: Request) -> None:
        if req.flags & _FUA:
            try:
                await io.flush(edge)  # qsd flushes before a FUA read
            except OSError as err:
                self._fail(req, err.errno or errno.EIO, _FAILURE_TEXT[Cmd.FLUSH])
                return
        if not core.structured_replies or not req.length or req.flags & _DF:
            # One piece: a simple reply, or one data chunk (DF: even over holes, as qsd).
            # The whole read happens before any byte is sent, so a failure can still be an
            # error reply in simple mode too.
            data = await self._pread(edge, req.offset, req.length)
            self._send(core.reply_read(req), data)
            return
        # Sparse read, as qsd's: one chunk per block-status extent of the exported node
        # (through its backing chain), a hole chunk for each extent reading as zeroes
        # (never read), a data chunk for the rest. Extents are not merged, so the chunks
        # fall where qsd's fall. A failure after some chunks ends the reply with an error
        # chunk (qsd drops the connection instead; see test_nbd_compat).
        pos, end = req.offset, req.offset + req.length
        chunks = 0
        while pos < end:
            chunks += 1
            if chunks % CHUNKS_PER_STEP == 0:
                await asyncio.sleep(0)  # many small extents: let the loop breathe between
            status = io.block_status_now(edge, pos, end - pos)
            if status is None:
                try:
                    status = await io.block_status(edge, pos, end - pos)
                except OSError as err:
                    self._fail(req, err.errno or errno.EIO, _HOLE_CHECK_FAILED)
                    return
            count = status.length
            if count <= 0:  # no answer: read the rest as data
                count = end - pos
            done = pos + count >= end
            if status.zero:
                self._send(core.read_chunk_hole(req, pos, count, done))
            else:
                data = await self._pread(edge, pos, count)
                self._send(core.read_chunk_data(req, pos, count, done), data)
            pos += count

    @staticmethod
    async def _pread(edge: BdrvChild, offset: int, length: int) -> io.Buffer:
        """Data to send at once: from LIVE_MIN on, possibly a live view of a tmpfs image
        (sent as is and never read here, see `io.pread_live`)."""
        if length >= LIVE_MIN:
            return (await io.pread_live(edge, offset, length))[0]
        return await io.pread(edge, offset, length)

    async def _extents(self, edge: BdrvChild, req: Request) -> dict[int, list[tuple[int, int]]]:
        one = bool(req.flags & _REQ_ONE)
        out: dict[int, list[tuple[int, int]]] = {}
        for ctx in self._core.meta_contexts:
            if ctx.id == CONTEXT_ID_BASE_ALLOCATION:
                out[ctx.id] = await _collect(edge, req, one, _allocation)
            elif ctx.id == CONTEXT_ID_ALLOCATION_DEPTH:
                out[ctx.id] = await _collect(edge, req, one, _depth)
            else:
                # A dirty bitmap context: its id indexes the export's bitmaps (handshake.py).
                assert self.export is not None  # cleared only once no request is left
                bits = self.export.bitmaps[ctx.id - CONTEXT_ID_FIRST_BITMAP].bits
                out[ctx.id] = bits.extents(req.offset, req.length, 1 if one else MAX_EXTENTS)
        return out


def _grow_send_buffer(sock: socket.socket) -> None:
    """Ask for SEND_BUFFER of kernel send buffer (Linux doubles it, net.core.wmem_max caps
    it); an optimisation only, so a refusal is ignored."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * SEND_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass


async def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """The rest of a request coroutine whose first step already ran (see `_start`)."""
    await _rest(coro, waiting)


@types.coroutine
def _rest(coro: Coroutine[Any, Any, None], waiting: Any) -> Generator[Any, Any, None]:
    # Hands what the coroutine yielded (the future it waits for) to the task, and the task's
    # answers (a value, or an exception such as CancelledError) back into the coroutine.
    while True:
        try:
            value = yield waiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting = coro.send(value)
            except StopIteration:
                return


async def _allocation(edge: BdrvChild, offset: int, length: int) -> tuple[int, int]:
    status = await io.block_status(edge, offset, length)
    flags = (0 if status.data else STATE_HOLE) | (STATE_ZERO if status.zero else 0)
    return status.length, flags


async def _depth(edge: BdrvChild, offset: int, length: int) -> tuple[int, int]:
    return await io.allocation_depth(edge, offset, length)


async def _collect(
    edge: BdrvChild,
    req: Request,
    one: bool,
    probe: Callable[[BdrvChild, int, int], Coroutine[Any, Any, tuple[int, int]]],
) -> list[tuple[int, int]]:
    """Extents from `req.offset` on, adjacent equal flags merged (as qsd merges them)."""
    extents: list[tuple[int, int]] = []
    pos, end = req.offset, req.offset + req.length
    while pos < end:
        length, flags = await probe(edge, pos, end - pos)
        if length <= 0:
            break
        if extents and extents[-1][1] == flags:
            extents[-1] = (extents[-1][0] + length, flags)
        elif len(extents) >= MAX_EXTENTS:
            break
        else:
            extents.append((length, flags))
        pos += length
        if one:
            break
    if not extents:
        raise OSError(errno.EIO, "no extent")
    return extents


def check_export_strings(name: str, description: str) -> None:
    """qsd's length limits on the export name and description (bytes, as C counts them)."""
    if len(name.encode()) > 4096:
        raise QmpError(f"export name '{name}' too long")
    if len(description.encode()) > 4096:
        raise QmpError(f"description '{description}' too long")
