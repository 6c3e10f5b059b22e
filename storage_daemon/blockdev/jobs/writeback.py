"""Background flushes of a job's target while it copies (stream, backup, mirror).

Domain ring (asyncio tasks). Every WRITEBACK_AHEAD bytes copied, a flush of the target starts
in the background, so the kernel writes back while the copy goes on and the job's own last
flush does not find the whole copy dirty. Errors are left to that last flush, which reports
them through the job's policy; the tasks here only ever end quietly.
"""

from __future__ import annotations

import asyncio
import contextlib

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild

WRITEBACK_AHEAD = 256 * 1024 * 1024


class WritebackAhead:
    """Counts copied bytes and starts a background flush of the target at each threshold;
    `tasks` holds the flushes still running (a paused or ending job waits for them)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self._unflushed = 0

    def copied(self, nbytes: int, target: BdrvChild | None) -> None:
        self._unflushed += nbytes
        if self._unflushed < WRITEBACK_AHEAD or target is None:
            return
        self._unflushed = 0
        task = asyncio.get_running_loop().create_task(_flush_quietly(target))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def _flush_quietly(edge: BdrvChild) -> None:
    with contextlib.suppress(OSError):  # the job's own last flush reports errors
        await io.flush(edge)
