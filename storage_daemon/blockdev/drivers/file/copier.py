"""A writer thread per open file: writes whose caller takes a callback, in order, off the loop.

Edge ring. Two kinds of write come here (`posix.FileDriver.pwritev_start`):
- large tmpfs writes: a page-cache copy of ~70 us per 256 KiB, time the loop would otherwise
  not spend receiving the next request (small ones run inline on the loop);
- every buffered write to a file elsewhere (ext4, xfs...), which may wait for the journal or
  for dirty-page throttling and so must not run on the loop. Without a task, a future and a
  pool hop each, a 4 KiB NBD write to a settled ext4 file cost the daemon 63-78 us of CPU
  instead of 116-131 (bench/README.md, "Session 9").
One thread per file, not the pool: buffered writes to one file are serialised by the kernel
(the inode lock) anyway, and on two cores more threads only contend for them and for the GIL
(measured: a pool thread per payload cost more than the copy). Per file, not per process, so
that a file on a slow disk never holds up the writes to another.
The thread writes with the GIL released and hands results back in batches: one
`call_soon_threadsafe` wakes the loop for everything finished meanwhile.
Invariant: each job's `done(error)` runs on the loop once, after its syscall ended, in
submission order; the thread ends once `stop()` was called and the jobs before it are done.
"""

from __future__ import annotations

import _thread
import asyncio
import logging
import os
import queue
from collections import deque
from collections.abc import Callable

from storage_daemon.blockdev.drivers.file.syscalls import write_full

log = logging.getLogger(__name__)

Done = Callable[[BaseException | None], None]
_Job = tuple[int, bytes | bytearray | memoryview, int, Done]


class Copier:
    """The writer thread of one open file, started on its first job."""

    __slots__ = ("_alive", "_finished", "_jobs", "_loop", "_signalled", "_started")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._finished: deque[tuple[Done, BaseException | None]] = deque()
        self._signalled = False  # a wake-up for `_finished` is on its way to the loop
        self._started = False
        self._alive = _thread.allocate_lock()  # held from the thread's start to its end

    def pwrite(
        self, fd: int, data: bytes | bytearray | memoryview, offset: int, done: Done
    ) -> None:
        """Write all of `data` at `offset` of `fd` on the thread; `done(None)` or
        `done(OSError)` follows on the loop. The caller keeps `fd` open until then."""
        self._jobs.put((fd, data, offset, done))
        if not self._started:
            self._started = True
            self._alive.acquire()
            # Not threading.Thread: its start() waits until the new thread runs (pool.py).
            _thread.start_new_thread(self._work, ())

    def stop(self) -> None:
        """End the thread once the jobs already submitted are done (the file is closing)."""
        if self._started:
            self._jobs.put(None)

    def join(self, timeout: float) -> bool:
        """Blocking (not on the loop): wait up to `timeout` s for the thread to end; True
        once it has (or never started)."""
        if self._alive.acquire(timeout=timeout):
            self._alive.release()
            return True
        return False

    def _deliver(self) -> None:
        """On the loop: run the `done` of every finished job."""
        self._signalled = False  # before draining: a job finished from now on signals again
        finished = self._finished
        while finished:
            done, error = finished.popleft()
            try:
                done(error)
            except Exception:  # one caller's bug must not hold back the others' results
                log.exception("copier: a completion callback failed")

    def _work(self) -> None:
        try:
            self._write_until_stopped()
        finally:
            self._alive.release()

    def _write_until_stopped(self) -> None:
        # Lean on purpose: whatever runs here between two pwrites holds the GIL the loop needs.
        get = self._jobs.get
        write = os.pwrite
        finished = self._finished
        while True:
            job = get()
            if job is None:
                return
            fd, data, offset, done = job
            error: BaseException | None = None
            try:
                written = write(fd, data, offset)
                if written < len(data):  # disk full, or a signal: finish it, or get the errno
                    write_full(fd, memoryview(data).cast("B")[written:], offset + written, 0)
            except BaseException as exc:  # handed to `done` on the loop
                error = exc
            finished.append((done, error))
            if not self._signalled:
                self._signalled = True
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:
                    finished.clear()  # the loop is closed: nobody waits for these any more
            del job, data, done, error
