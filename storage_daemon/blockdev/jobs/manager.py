"""The daemon's jobs: ids, lookup with qsd's errors, and the tasks that run them.

Domain ring. Every job registers here when created and leaves when it reaches NULL; every job
task is created and owned here (kept until done, cancelled at shutdown if a job ignores a
forced cancel). Invariant: ids are unique among registered jobs; lists are newest first, as
qsd's query-jobs and query-block-jobs show them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine, Iterator, Sequence
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

    async def settled(self, job: Job) -> None:
        """Until no finalization or abort of the job's transaction is in progress: qsd runs
        those in one go, so a command sent meanwhile acts on (and looks up) what follows."""
        while (finalizing := job.txn.finalizing) is not None:
            await finalizing.wait()

    async def lookup_settled(self, job_id: str) -> Job:
        """`lookup`, as qsd would answer once a settling transaction is over (an
        auto-dismissed job is then not found)."""
        await self.settled(self.lookup(job_id))
        return self.lookup(job_id)

    async def lookup_block_job_settled(self, job_id: str) -> BlockJob:
        await self.settled(self.lookup_block_job(job_id))
        return self.lookup_block_job(job_id)

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

    async def shutdown(self, drained: Sequence[Job] = (), grace: float = SHUTDOWN_GRACE) -> None:
        """qsd's exit: bdrv_drain_all_begin, then job_cancel_sync_all.

        `drained` are the jobs the drain reaches, in the order it reaches them (the block
        jobs, by the graph's node order): each is paused (a sleeping one parks as paused, or
        standby when READY) and waited for until it parks (transaction.drain_all says why
        one at a time). The drain never ends. Then, newest first, each job is force-cancelled
        (leaving the pause: its `running`/`ready` event) and waited for until its completion
        is over, a concluded one dismissed, before the next one is taken, so the jobs' events
        do not interleave. A job that ignores the cancel for `grace` seconds has its task
        cancelled."""
        for job in drained:
            await self._bounded(job.drain_pause(), grace)
        tries: dict[Job, int] = {}
        while self._jobs:
            job = self._jobs[-1]
            tries[job] = tries.get(job, 0) + 1
            if tries[job] > 2:  # neither cancelled nor dismissed: give up on it
                await self._abandon(job)
                continue
            try:
                # (The cancel first lets a finalization in progress end, as qsd's would.)
                cancelled = await self._bounded(job.cancel(True), grace)
            except Exception:  # a job in no state to cancel cleanly is abandoned next round
                log.exception("job %s: cancel at shutdown failed", job.id)
                continue
            if not cancelled or (job.started and not await self._bounded(job.wait_done(), grace)):
                await self._abandon(job)

    @staticmethod
    async def _bounded(wait: Coroutine[Any, Any, None], grace: float) -> bool:
        try:
            async with asyncio.timeout(grace):
                await wait
        except TimeoutError:
            return False
        return True

    async def _abandon(self, job: Job) -> None:
        for task in [task for task, owner in self._tasks.items() if owner is job]:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if job in self._jobs:
            self.unregister(job)
            job.release()
