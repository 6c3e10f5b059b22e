"""One thread that copies large writes into tmpfs while the event loop reads the next request.

Edge ring. A write to tmpfs never waits for a device, so small ones run inline on the loop.
A large one is a page-cache copy of ~70 us per 256 KiB: done inline, it is time the loop does
not spend receiving the next request, and the loop is the one thread the NBD data path has.
This thread does those copies in submission order, with the GIL released during each, and
hands the results back in batches: one `call_soon_threadsafe` wakes the loop for everything
finished meanwhile. One thread, not the pool: the copies need CPU, not concurrency, and on two
cores every further thread only contends for them and for the GIL (measured: a pool thread
per payload cost more than the copy).
Invariant: each job's `done(error)` runs on its loop once, after its syscall ended; jobs of
one loop complete in submission order.
"""

from __future__ import annotations

import _thread
import asyncio
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable

from storage_daemon.blockdev.drivers.file.syscalls import write_full

log = logging.getLogger(__name__)

Done = Callable[[BaseException | None], None]


class _Mailbox:
    """Finished jobs of one loop, and whether a wake-up for them is already on its way."""

    __slots__ = ("finished", "loop", "signalled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.finished: deque[tuple[Done, BaseException | None]] = deque()
        self.signalled = False

    def deliver(self) -> None:
        """On the loop: run the `done` of every finished job."""
        self.signalled = False  # before draining: a job finished from now on signals again
        finished = self.finished
        while finished:
            done, error = finished.popleft()
            try:
                done(error)
            except Exception:  # one caller's bug must not hold back the others' results
                log.exception("copier: a completion callback failed")


_Job = tuple[_Mailbox, int, bytes | bytearray | memoryview, int, Done]

_jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_boxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}
_lock = threading.Lock()
_started = False


def pwrite(
    loop: asyncio.AbstractEventLoop,
    fd: int,
    data: bytes | bytearray | memoryview,
    offset: int,
    done: Done,
) -> None:
    """Write all of `data` at `offset` of `fd` on the copier thread; `done(None)` or
    `done(OSError)` follows on `loop` (the running one: the caller's, passed in since
    `get_running_loop` costs a getpid). The caller keeps `fd` open until then."""
    box = _boxes.get(loop)
    if box is None:
        box = _box(loop)
    _jobs.put((box, fd, data, offset, done))
    if not _started:
        _start()


def _box(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    for old in [other for other in _boxes if other.is_closed()]:
        del _boxes[old]  # (tests run many loops in one process)
    box = _boxes[loop] = _Mailbox(loop)
    return box


def _start() -> None:
    global _started
    with _lock:
        if _started:
            return
        _started = True
    # Not threading.Thread: its start() waits until the new thread runs (see pool.py).
    _thread.start_new_thread(_work, ())


def _work() -> None:
    # Lean on purpose: whatever runs here between two pwrites holds the GIL the loop needs.
    get = _jobs.get
    write = os.pwrite
    while True:
        box, fd, data, offset, done = get()
        error: BaseException | None = None
        try:
            written = write(fd, data, offset)
            if written < len(data):  # tmpfs full, or a signal: finish it, or get the errno
                write_full(fd, memoryview(data).cast("B")[written:], offset + written, 0)
        except BaseException as exc:  # handed to `done` on the loop
            error = exc
        box.finished.append((done, error))
        if not box.signalled:
            box.signalled = True
            try:
                box.loop.call_soon_threadsafe(box.deliver)
            except RuntimeError:
                box.finished.clear()  # the loop is closed: nobody waits for these any more
        del box, data, done, error
