"""The writer thread of a file (`drivers/file/copier.py`): writes off the event loop.

Component ring: real files on tmpfs and on the disk, the real thread, a real event loop. What
the callers rely on: every job's `done` runs on the loop thread (never on the writer's),
exactly once, in submission order, after the bytes are in the file; a failed write hands its
OSError over; after `stop()` the thread ends once the jobs before it are done.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

from storage_daemon.blockdev.drivers.file.copier import Copier

KiB = 1 << 10


async def test_jobs_end_on_the_loop_in_order_with_their_data_written(shm_dir: Path) -> None:
    path = shm_dir / "copier.img"
    path.write_bytes(bytes(1024 * KiB))
    loop = asyncio.get_running_loop()
    ended: list[tuple[int, BaseException | None, int]] = []
    all_done = loop.create_future()
    fd = os.open(path, os.O_RDWR)
    writer = Copier(loop)
    try:
        for i in range(8):
            data = bytearray([i + 1]) * (128 * KiB)

            def done(error: BaseException | None, i: int = i) -> None:
                ended.append((i, error, threading.get_ident()))
                if len(ended) == 8:
                    all_done.set_result(None)

            writer.pwrite(fd, data, i * 128 * KiB, done)
        assert ended == []  # results only ever arrive through the loop
        await asyncio.wait_for(all_done, 10)
    finally:
        writer.stop()
        os.close(fd)
    assert [(i, error) for i, error, _ in ended] == [(i, None) for i in range(8)]
    assert {thread for *_, thread in ended} == {threading.get_ident()}
    contents = path.read_bytes()
    for i in range(8):
        assert contents[i * 128 * KiB : (i + 1) * 128 * KiB] == bytes([i + 1]) * (128 * KiB)


async def test_a_failed_write_hands_its_errno_to_done(shm_dir: Path) -> None:
    path = shm_dir / "copier-ro.img"
    path.write_bytes(bytes(256 * KiB))
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[BaseException | None] = loop.create_future()
    fd = os.open(path, os.O_RDONLY)  # writing through it fails with EBADF
    try:
        writer = Copier(loop)
        writer.pwrite(fd, bytes(128 * KiB), 0, ended.set_result)
        error = await asyncio.wait_for(ended, 10)
        writer.stop()
    finally:
        os.close(fd)
    assert isinstance(error, OSError) and error.errno == errno.EBADF
    assert path.read_bytes() == bytes(256 * KiB)


async def test_one_failing_callback_does_not_hold_back_the_others(shm_dir: Path) -> None:
    path = shm_dir / "copier-cb.img"
    path.write_bytes(bytes(256 * KiB))
    loop = asyncio.get_running_loop()
    second: asyncio.Future[BaseException | None] = loop.create_future()
    fd = os.open(path, os.O_RDWR)

    def broken(error: BaseException | None) -> None:
        raise RuntimeError("a caller's bug")

    try:
        writer = Copier(loop)
        writer.pwrite(fd, b"a" * (128 * KiB), 0, broken)
        writer.pwrite(fd, b"b" * (128 * KiB), 128 * KiB, second.set_result)
        assert await asyncio.wait_for(second, 10) is None
        writer.stop()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"a" * (128 * KiB) + b"b" * (128 * KiB)


def threads() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


async def test_the_thread_starts_with_the_first_job_and_ends_after_stop(scratch: Path) -> None:
    """Writes to a file on the disk (ext4 here: they may wait, never inline) go through the
    same thread; it exists only between the first job and `stop()`."""
    path = scratch / "writer.img"
    path.write_bytes(bytes(64 * KiB))
    loop = asyncio.get_running_loop()
    writer = Copier(loop)
    fd = os.open(path, os.O_RDWR)
    try:
        writer.stop()  # not started: nothing to end, and no thread appears
        assert writer.join(0)
        before = threads()
        ended: asyncio.Future[BaseException | None] = loop.create_future()
        writer.pwrite(fd, b"\x5a" * 4096, 8192, ended.set_result)
        assert await asyncio.wait_for(ended, 10) is None
        started = threads() - before
        assert len(started) == 1  # its own thread, still there between jobs
        assert not await loop.run_in_executor(None, writer.join, 0.05)
        writer.stop()
        assert await loop.run_in_executor(None, writer.join, 10)  # (its last steps may remain)
    finally:
        os.close(fd)
    assert path.read_bytes()[8192 : 8192 + 4096] == b"\x5a" * 4096
