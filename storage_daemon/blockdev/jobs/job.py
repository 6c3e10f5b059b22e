"""The job engine: a job's life cycle, pause points, cancellation, completion and transactions.

Domain ring. Every state change goes through `Job._set_status()`, which checks fsm.py's table and
emits JOB_STATUS_CHANGE. Pause and cancel are cooperative: a job's `run()` reaches them at
`pause_point()`/`sleep()`. What QEMU runs synchronously when a command wakes a job coroutine
(leaving a pause, turning a sleep into a pause) is done here by the command itself, so those
events precede the command's reply, as on qsd. Invariant: a job's task is owned by its manager.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from storage_daemon.blockdev.jobs.fsm import (
    COMPLETED_STATES,
    JobStatus,
    JobVerb,
    check_transition,
    paused_state,
    verb_refusal,
)
from storage_daemon.errors import QmpError, strerror

if TYPE_CHECKING:
    from storage_daemon.blockdev.jobs.manager import JobManager

log = logging.getLogger(__name__)

S = JobStatus
ECANCELED_TEXT = os.strerror(errno.ECANCELED)  # "Operation canceled", as query-jobs shows it
SLICE_NS = 100_000_000  # QEMU's BLOCK_JOB_SLICE_TIME: rate limits are accounted per 100 ms
# How long a job may go on past pause points that ask for no wait without yielding to the
# loop (ratelimit_sleep_once): qsd's iterations that copy nothing take microseconds, so a
# command sent after the job's start finds them done; ours yield at least this often.
YIELD_BUDGET_NS = 5_000_000


class JobCancelled(Exception):
    """Raised at a pause point of a force-cancelled job; `run()` lets it propagate (or cleans
    up and re-raises). The job then ends as cancelled (ABORTING, BLOCK_JOB_CANCELLED)."""


class RateLimit:
    """QEMU's slice-based rate limit (pure: callers pass the time).

    Requests are accounted per slice; once a slice's quota is used up, the next request waits
    until as many slices have passed as the bytes dispatched fill. One request may always go
    out at once, so a large first chunk is not delayed."""

    def __init__(self) -> None:
        self.slice_ns = SLICE_NS
        self.slice_quota = 0  # bytes per slice; 0 = unlimited
        self.slice_start_ns = 0
        self.slice_end_ns = 0
        self.dispatched = 0

    def set_speed(self, speed: int, slice_ns: int = SLICE_NS) -> None:
        self.slice_ns = slice_ns
        self.slice_quota = 0 if speed == 0 else max(speed * slice_ns // 1_000_000_000, 1)

    def delay_ns(self, n: int, now_ns: int) -> int:
        """Account `n` bytes sent now; return how long to wait before the next request."""
        if not self.slice_quota:
            return 0
        if self.slice_end_ns < now_ns:
            self.slice_start_ns = now_ns
            self.slice_end_ns = now_ns + self.slice_ns
            self.dispatched = 0
        self.dispatched += n
        if self.dispatched < self.slice_quota:
            return 0
        self.slice_end_ns = (
            self.slice_start_ns + self.dispatched * self.slice_ns // self.slice_quota
        )
        return self.slice_end_ns - now_ns


class JobGone(QmpError):
    """The job was dismissed while a command waited for its transaction to settle: qsd,
    which settles it in one go, would not have found it."""

    def __init__(self) -> None:
        super().__init__("Job not found")


class JobTxn:
    """Jobs that complete together: none is finalized before all have finished their work,
    and a failure or cancel of one aborts all. A job alone has a transaction of its own."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False
        # Set while the transaction is being finalized (prepare, commit or abort, clean):
        # qsd does that in one go, so a cancel waits for it to be over.
        self.finalizing: asyncio.Event | None = None

    def add(self, job: Job) -> None:
        self.jobs.append(job)
        job.txn = self


class Job:
    """One background job. Subclasses set `job_type` and implement `run()`; they may override
    the completion hooks (`prepare`, `commit`, `abort`, `clean`), `complete()` (and set
    `can_complete`), `cancel_hook()`, and the event hooks that BlockJob implements."""

    job_type: ClassVar[str] = ""  # a JobType wire name: "create", "stream", ...
    can_complete: ClassVar[bool] = False  # has a `complete()` (job-complete in READY)

    def __init__(
        self,
        manager: JobManager,
        job_id: str | None,
        *,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        txn: JobTxn | None = None,
    ) -> None:
        """Validate the id, register with the manager and become CREATED (an event)."""
        manager.check_new_id(job_id)
        assert job_id is not None
        self.manager = manager
        self.id = job_id
        self.status = S.UNDEFINED
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.progress_current = 0
        self.progress_total = 0
        self.failed = False  # QEMU's job->ret != 0
        self.error: str | None = None  # the text of job->err
        self.cancelled = False  # a cancel was requested (soft or forced)
        self.force_cancel = False  # ... and it is a real cancel (QEMU's job_is_cancelled)
        self.pause_count = 1  # a created job is paused until started
        self.user_paused = False
        self.paused = True  # parked at a pause point
        self.busy = False  # the job's coroutine runs (is not parked)
        self.started = False
        self.deferred_to_main_loop = False  # run() is over; completion is the manager's
        self.speed = 0
        self.limit = RateLimit()
        self._next_delay_ns = 0  # ratelimit_account -> ratelimit_sleep_once
        self._parked_ns = 0  # when the job last left a park (ratelimit_sleep_once's budget)
        self._status_before_pause = S.RUNNING
        self._wake: asyncio.Future[None] | None = None
        self._deadline_ns: int | None = None  # a sleep's timer is pending
        self._first_yield = asyncio.Event()
        self._done = asyncio.Event()
        self._quiet_waiters: list[asyncio.Future[None]] = []  # drains waiting for a pause
        self._task: asyncio.Task[None] | None = None
        self.txn: JobTxn
        (txn or JobTxn()).add(self)
        manager.register(self)
        self._set_status(S.CREATED)

    # --- what subclasses implement ------------------------------------------------------

    async def run(self) -> None:
        """The job's work. Raise QmpError/OSError to fail; reach pause points regularly."""
        raise NotImplementedError

    async def setup(self) -> None:
        """Work between CREATED and RUNNING that may fail (the job then goes to NULL)."""

    async def prepare(self) -> None:
        """First completion step of a successful transaction (may still fail it)."""

    async def commit(self) -> None:
        """Make the job's effect permanent (success)."""

    async def abort(self) -> None:
        """Undo what can be undone (failure or cancel)."""

    async def clean(self) -> None:
        """Release what commit and abort both leave behind."""

    def complete(self) -> None:
        """job-complete: leave READY (jobs with `can_complete`)."""
        raise NotImplementedError

    def cancel_hook(self, force: bool) -> bool:
        """Decide whether a cancel is forced; jobs without one treat every cancel as forced."""
        return True

    def user_resume_hook(self) -> None:
        """Called when the user resumes the job (BlockJob resets its I/O status)."""

    def release(self) -> None:
        """The job is gone (NULL): drop what it holds (BlockJob detaches its nodes)."""

    def event_ready(self) -> None: ...

    def event_pending(self) -> None: ...

    def event_completed(self) -> None: ...

    def event_cancelled(self) -> None: ...

    # --- state --------------------------------------------------------------------------

    def _set_status(self, new: JobStatus) -> None:
        old = self.status
        check_transition(old, new)
        self.status = new
        if new is not old:
            self.manager.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new.value})

    def _apply_verb(self, verb: JobVerb) -> None:
        refusal = verb_refusal(self.id, self.status, verb)
        if refusal is not None:
            raise QmpError(refusal)

    @property
    def is_cancelled(self) -> bool:
        return self.force_cancel

    @property
    def cancel_requested(self) -> bool:
        return self.cancelled

    @property
    def is_completed(self) -> bool:
        return self.status in COMPLETED_STATES

    def should_pause(self) -> bool:
        return self.pause_count > 0

    # --- progress and speed -------------------------------------------------------------

    def progress_update(self, done: int) -> None:
        self.progress_current += done

    def progress_set_remaining(self, remaining: int) -> None:
        self.progress_total = self.progress_current + remaining

    def progress_increase_remaining(self, delta: int) -> None:
        self.progress_total += delta

    def _now_ns(self) -> int:
        return self.manager.clock.monotonic_ns()

    def set_speed(self, speed: int) -> None:
        """Change the rate limit (bytes/s, 0 = none); a faster or unlimited speed cuts a
        pending rate-limit sleep short."""
        if speed < 0:
            raise QmpError("Parameter 'speed' expects a non-negative value")
        old = self.speed
        self.limit.set_speed(speed)
        self.speed = speed
        if speed and speed <= old:
            return
        self._enter(only_if=lambda: self._deadline_ns is not None)

    def ratelimit_processed(self, nbytes: int) -> None:
        """Account bytes the job copied; the next `ratelimit_sleep()` waits for them."""
        self.limit.delay_ns(nbytes, self._now_ns())

    def ratelimit_account(self, nbytes: int) -> None:
        """qsd 7.2's stream and commit (block_job_ratelimit_get_delay): account bytes the
        job copied and remember the delay they ask for; `ratelimit_sleep_once()` sleeps it."""
        self._next_delay_ns = self.limit.delay_ns(nbytes, self._now_ns())

    async def ratelimit_sleep_once(self) -> None:
        """qsd 7.2's stream and commit: one sleep of the delay the last chunk asked for (a
        pause point even without one). Woken early by a resume or a faster speed, the job
        goes on at once: each drained section a rate-limited job sits through lets it copy
        one more chunk, as on qsd. A wait of 0 is skipped (no yield) while the job has been
        running for less than YIELD_BUDGET_NS since it last parked, once it has parked once
        (the command that started it returns then) and unless a pause or cancel is due."""
        delay, self._next_delay_ns = self._next_delay_ns, 0
        if (
            not delay
            and self._first_yield.is_set()
            and not self.should_pause()
            and not self.is_cancelled
            and self._now_ns() - self._parked_ns < YIELD_BUDGET_NS
        ):
            # Nothing could wake or pause the job in a wait of 0 that a command can see
            # (qsd's is over long before the next command arrives): go on without one.
            return
        await self.sleep(delay)

    async def ratelimit_sleep(self) -> None:
        """Wait as long as the speed limit asks (at least one pause point even without one);
        woken early, sleep again until the limit allows the next request (block-copy's, for
        backup)."""
        while True:
            delay = self.limit.delay_ns(0, self._now_ns())
            await self.sleep(delay)
            if not delay or self.is_cancelled:
                return

    # --- the job's side: pause points and sleeps ----------------------------------------

    def release_start(self) -> None:
        """Let the command that started the job return now (as the first real wait does)."""
        self._first_yield.set()

    async def pause_point(self) -> None:
        """Park here while paused; raise JobCancelled once force-cancelled."""
        if self.should_pause() and not self.is_cancelled:
            self._status_before_pause = self.status
            self._set_status(paused_state(self.status))
            self.paused = True
            self._notify_quiet()
            await self._park(None)
        if self.is_cancelled:
            raise JobCancelled

    async def sleep(self, ns: int) -> None:
        """Sleep `ns` (a pause point); woken early by cancel, pause or a faster speed."""
        if self.is_cancelled:
            raise JobCancelled
        if not self.should_pause():
            await self._park(self._now_ns() + ns)
        await self.pause_point()

    async def _park(self, deadline_ns: int | None) -> None:
        """Yield until `_enter()` (or the sleep's timer) sets `busy` again."""
        loop = asyncio.get_running_loop()
        self.busy = False
        self._deadline_ns = deadline_ns
        self._first_yield.set()
        self._notify_quiet()
        try:
            while not self.busy:
                wake: asyncio.Future[None] = loop.create_future()
                self._wake = wake
                deadline = self._deadline_ns
                if deadline is None:
                    await wake
                    continue
                try:
                    async with asyncio.timeout(max(0, deadline - self._now_ns()) / 1e9):
                        await wake
                except TimeoutError:
                    if self._deadline_ns is None:
                        # The timer was deleted: `_enter()` parked the job as paused while
                        # it slept (a pause or drain), and only a resume may wake it now.
                        continue
                    self._deadline_ns = None
                    self._enter()
        finally:
            self._wake = None
            self._deadline_ns = None
            self.busy = True
            self._parked_ns = self._now_ns()

    def _enter(self, only_if: Callable[[], bool] | None = None) -> None:
        """QEMU's job_enter: wake a parked job, doing now the state changes its coroutine
        would make before its next real wait."""
        if not self.started or self.deferred_to_main_loop or self.busy:
            return
        if only_if is not None and not only_if():
            return
        self._deadline_ns = None
        if self.paused:
            self.paused = False
            self._set_status(self._status_before_pause)
        elif self.should_pause() and not self.is_cancelled:
            # The sleep ends in a pause point that parks the job again, as paused.
            self._status_before_pause = self.status
            self._set_status(paused_state(self.status))
            self.paused = True
            return
        self.busy = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def set_ready(self) -> None:
        """RUNNING -> READY (mirror, active commit): job-complete is now accepted."""
        self._set_status(S.READY)
        self.event_ready()

    # --- internal pause and resume (drains, error policies) -----------------------------

    def pause(self) -> None:
        self.pause_count += 1
        if not self.paused:
            self._enter()

    def _notify_quiet(self) -> None:
        waiters, self._quiet_waiters = self._quiet_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def is_quiet(self) -> bool:
        """Nothing of the job's work runs: parked paused, not started, or its work is over."""
        return self.paused or not self.started or self.deferred_to_main_loop or not self.busy

    async def drain_pause(self) -> None:
        """A drained section begins (QEMU's job_pause from a drain, then the drain's poll):
        the pause count rises, and a job in the middle of its work is waited for until it
        parks at its next pause point, so its `paused` event precedes what follows."""
        self.pause()
        await self.wait_quiet()

    async def wait_quiet(self) -> None:
        """The poll of a drain: until a paused job in the middle of its work has parked."""
        while self.should_pause() and not self.is_quiet() and not self.is_cancelled:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._quiet_waiters.append(waiter)
            await waiter

    async def drain_resume(self) -> None:
        """A drained section ends: resume, and let a job woken by it run up to its next
        suspension (QEMU enters the job's coroutine at once), so a command that follows
        finds a rate-limited job parked in its sleep again, as on qsd."""
        if self.pause_count <= 0:
            return
        self.resume()
        if not self.is_quiet():
            await asyncio.sleep(0)

    def resume(self) -> None:
        assert self.pause_count > 0
        self.pause_count -= 1
        if self.pause_count:
            return
        self._enter(only_if=lambda: self._deadline_ns is None)

    # --- user verbs (QMP) ---------------------------------------------------------------

    def user_pause(self) -> None:
        self._apply_verb(JobVerb.PAUSE)
        if self.user_paused:
            raise QmpError("Job is already paused")
        self.user_paused = True
        self.pause()

    def user_resume(self) -> None:
        if not self.user_paused or self.pause_count <= 0:
            raise QmpError("Can't resume a job that was not paused")
        self._apply_verb(JobVerb.RESUME)
        self.user_resume_hook()
        self.user_paused = False
        self.resume()

    def user_complete(self) -> None:
        self._apply_verb(JobVerb.COMPLETE)
        if self.cancel_requested or not self.can_complete:
            raise QmpError(f"The active block job '{self.id}' cannot be completed")
        self.complete()

    async def user_cancel(self, force: bool) -> None:
        self._apply_verb(JobVerb.CANCEL)
        finalizing = self.txn.finalizing
        if finalizing is not None:
            await finalizing.wait()
            # As qsd sees it: after the finalization, where an auto-dismissed job is gone.
            if self.status is S.NULL:
                raise JobGone()
            self._apply_verb(JobVerb.CANCEL)
        await self.cancel(force)

    async def user_finalize(self) -> None:
        self._apply_verb(JobVerb.FINALIZE)
        await self._do_finalize()

    def user_dismiss(self) -> None:
        self._apply_verb(JobVerb.DISMISS)
        self._do_dismiss()

    def user_set_speed(self, speed: int) -> None:
        self._apply_verb(JobVerb.SET_SPEED)
        self.set_speed(speed)

    # --- starting, failing early, cancelling --------------------------------------------

    async def start(self) -> None:
        """CREATED -> RUNNING; returns once the job first waits (or has ended)."""
        assert self.status is S.CREATED and not self.started
        self.started = True
        self.pause_count -= 1
        self.busy = True
        self.paused = False
        self._set_status(S.RUNNING)
        self._task = self.manager.spawn(self, self._main())
        await self._first_yield.wait()

    def early_fail(self) -> None:
        """Setup failed: CREATED -> NULL, and the job is gone."""
        assert self.status is S.CREATED and not self.started
        self._do_dismiss()

    async def cancel(self, force: bool) -> None:
        """QEMU's job_cancel (no verb check): also used at shutdown."""
        finalizing = self.txn.finalizing
        if finalizing is not None:
            await finalizing.wait()
        if self.status is S.NULL:
            return
        if self.status is S.CONCLUDED:
            self._do_dismiss()
            return
        self._cancel_async(force)
        if not self.started:
            await self._completed()
        elif self.deferred_to_main_loop:
            if self.is_cancelled:
                await self._txn_abort()
        else:
            self._enter()

    def _cancel_async(self, force: bool) -> None:
        force = self.cancel_hook(force)
        if self.user_paused:
            self.user_resume_hook()
            self.user_paused = False
            assert self.pause_count > 0
            self.pause_count -= 1
        # A soft cancel of a job whose work is over changes nothing.
        if force or not self.deferred_to_main_loop:
            self.cancelled = True
            self.force_cancel |= force

    async def wait_done(self) -> None:
        """Until the job's run() has ended and its completion was processed."""
        await self._done.wait()

    # --- the job coroutine and completion -----------------------------------------------

    async def _main(self) -> None:
        try:
            try:
                await self.pause_point()
                await self.run()
            except JobCancelled:
                pass
            except QmpError as err:
                self._fail(err.desc)
            except OSError as err:
                self._fail(strerror(err))
            except asyncio.CancelledError:
                self.force_cancel = self.cancelled = True
                self.deferred_to_main_loop = True
                raise
            except Exception as exc:  # a job bug must not take the daemon down
                log.exception("job %s failed unexpectedly", self.id)
                self._fail(f"internal error: {exc}")
            self.deferred_to_main_loop = True
            self.busy = False
            self._notify_quiet()
            await self._completed()
        finally:
            self._first_yield.set()
            self._done.set()
            self._notify_quiet()

    def _fail(self, message: str) -> None:
        self.failed = True
        if self.error is None:
            self.error = message

    def _update_rc(self) -> None:
        if not self.failed and self.is_cancelled:
            self.failed = True
        if self.failed:
            if self.error is None:
                self.error = ECANCELED_TEXT
            self._set_status(S.ABORTING)

    async def _completed(self) -> None:
        self._update_rc()
        if self.failed:
            await self._txn_abort()
        else:
            await self._txn_success()

    async def _txn_success(self) -> None:
        self._set_status(S.WAITING)
        jobs = self.txn.jobs
        if not all(job.is_completed for job in jobs):
            return
        for job in list(jobs):
            job._set_status(S.PENDING)
            if not job.auto_finalize:
                job.event_pending()
        if all(job.auto_finalize for job in jobs):
            await self._do_finalize()

    async def _prepare(self) -> bool:
        """QEMU's job_prepare; False if the job failed."""
        if not self.failed:
            try:
                await self.prepare()
            except QmpError as err:
                self._fail(err.desc)
            except OSError as err:
                self._fail(strerror(err))
            self._update_rc()
        return not self.failed

    async def _do_finalize(self) -> None:
        txn = self.txn
        done = txn.finalizing = asyncio.Event()
        try:
            for job in list(txn.jobs):
                if not await job._prepare():
                    await self._txn_abort()
                    return
            for job in list(txn.jobs):
                await job._finalize_single()
        finally:
            done.set()
            if txn.finalizing is done:
                txn.finalizing = None

    async def _txn_abort(self) -> None:
        txn = self.txn
        if txn.aborting:
            return  # cancelled by another job of the transaction, which handles everything
        txn.aborting = True
        # qsd aborts in one go too: commands sent meanwhile see the end (unless a
        # finalization that failed is what brought us here, which already says so).
        done = None
        if txn.finalizing is None:
            done = txn.finalizing = asyncio.Event()
        try:
            for other in txn.jobs:
                if other is not self:
                    other._cancel_async(False)
                    other._enter()
            while txn.jobs:
                other = txn.jobs[0]
                if not other.is_completed:
                    await other.wait_done()
                await other._finalize_single()
        finally:
            if done is not None:
                done.set()
                if txn.finalizing is done:
                    txn.finalizing = None

    async def _finalize_single(self) -> None:
        assert self.is_completed
        self._update_rc()
        try:
            if not self.failed:
                await self.commit()
            else:
                await self.abort()
            await self.clean()
        finally:
            if self.started:
                if self.is_cancelled:
                    self.event_cancelled()
                else:
                    self.event_completed()
            if self in self.txn.jobs:
                self.txn.jobs.remove(self)
            self._set_status(S.CONCLUDED)
            if self.auto_dismiss or not self.started:
                self._do_dismiss()

    def _do_dismiss(self) -> None:
        self.busy = False
        self.paused = False
        self.deferred_to_main_loop = True
        if self in self.txn.jobs:
            self.txn.jobs.remove(self)
        self._set_status(S.NULL)
        self.manager.unregister(self)
        self.release()

    # --- queries ------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """A query-jobs entry (JobInfo)."""
        entry: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type,
            "status": self.status.value,
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self.failed:
            entry["error"] = self.error or ECANCELED_TEXT
        return entry
