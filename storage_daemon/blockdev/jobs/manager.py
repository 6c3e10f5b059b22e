"""The daemon's jobs: ids, lookup with qsd's errors, and the tasks that run them.

Domain ring. Every job registers here when created and leaves when it reaches NULL; every job
task is created and owned here (kept until done, cancelled at shutdown if a job ignores a
forced cancel). Invariant: ids are unique among registered jobs; lists are newest first, as
qsd's query-jobs and query-block-jobs show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from storage_daemon.clock import Clock, SystemClock
from storage_daemon.errors import DeviceNotActive, QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.jobs.block_job import BlockJob
    from storage_daemon.blockdev.jobs.job import Job

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any] | None], None]
# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_JOB_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
SHUTDOWN_GRACE = 5.0  # seconds jobs get to honour a forced cancel at shutdown


class JobManager:
    def __init__(self, emit: Emit, clock: Clock | None = None) -> None:
        self.emit = emit
        self.clock: Clock = clock or SystemClock()
        self._jobs: list[Job] = []  # creation order
        self._tasks: dict[asyncio.Task[None], Job] = {}

    # --- registry -----------------------------------------------------------------------

    def check_new_id(self, job_id: str | None) -> None:
        if job_id is None:
            raise QmpError("An explicit job ID is required")
        if not _JOB_ID.match(job_id):
            raise QmpError(f"Invalid job ID '{job_id}'")
        if self.find(job_id) is not None:
            raise QmpError(f"Job ID '{job_id}' already in use")

    def register(self, job: Job) -> None:
        self._jobs.append(job)

    def unregister(self, job: Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)

    def __iter__(self) -> Iterator[Job]:
        """Newest first."""
        return iter(list(reversed(self._jobs)))

    def __len__(self) -> int:
        return len(self._jobs)

    def find(self, job_id: str) -> Job | None:
        for job in self._jobs:
            if job.id == job_id:
                return job
        return None

    def lookup(self, job_id: str) -> Job:
        """For job-*: qsd's GenericError."""
        job = self.find(job_id)
        if job is None:
            raise QmpError("Job not found")
        return job

    def lookup_block_job(self, job_id: str) -> BlockJob:
        """For block-job-*: only block jobs count, and the error class is DeviceNotActive."""
        from storage_daemon.blockdev.jobs.block_job import BlockJob

        job = self.find(job_id)
        if not isinstance(job, BlockJob):
            raise DeviceNotActive(f"Block job '{job_id}' not found")
        return job

    def block_jobs(self) -> list[BlockJob]:
        from storage_daemon.blockdev.jobs.block_job import BlockJob

        return [job for job in self if isinstance(job, BlockJob)]

    # --- running ------------------------------------------------------------------------

    def spawn(self, job: Job, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"job-{job.id}")
        self._tasks[task] = job
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        job = self._tasks.pop(task, None)
        if task.cancelled() or job is None:
            return
        exc = task.exception()
        if exc is not None:
            log.error("job %s task failed", job.id, exc_info=exc)

    async def launch(self, job: Job) -> None:
        """Run the job's setup (on failure: CREATED -> NULL and the error), then start it;
        returns once the job first waits, so early events precede the command's reply."""
        try:
            await job.setup()
        except BaseException:
            job.early_fail()
            raise
        await job.start()

    async def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """qsd's job_cancel_sync_all: force-cancel every job and wait for each to end."""
        for job in list(self):
            with contextlib.suppress(QmpError):
                await job.cancel(True)
        tasks = list(self._tasks)
        if tasks:
            try:
                async with asyncio.timeout(grace):
                    await asyncio.gather(*tasks, return_exceptions=True)
            except TimeoutError:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        for job in list(self):
            # Jobs whose cancel ended in CONCLUDED (auto-dismiss off), or abandoned ones.
            try:
                await job.cancel(True)
            except Exception:  # an abandoned job may be in no state to cancel cleanly
                log.exception("job %s: cancel at shutdown failed", job.id)
            if job in self._jobs:
                self.unregister(job)
                job.release()
