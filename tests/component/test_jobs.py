"""The job engine in an in-process daemon: every verb in every state, qsd's texts and events.

A test block job (`StepJob`) does one "chunk" of work per wake-up: it sleeps at a pause point
until the test steps it, so tests drive it deterministically, never by sleeping. Commands go
through the daemon's real dispatcher; events are recorded from the daemon's event bus, in
order, so "before the reply" means "recorded before run_command returned".
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from typing import Any

import pytest

from storage_daemon.blockdev.jobs.block_job import BlockJob
from storage_daemon.blockdev.jobs.fsm import VERBS, JobStatus, JobVerb
from storage_daemon.blockdev.jobs.job import JobTxn
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import load_handlers
from storage_daemon.qapi.runtime import command_args

# Import every command module and build the argument validators now, not inside the first
# test's loop turn (the slow-callback detector would take that for a blocked loop).
load_handlers()
command_args("blockdev-add", {"driver": "null-co", "node-name": "warm"})
command_args(
    "blockdev-create", {"job-id": "w", "options": {"driver": "file", "filename": "w", "size": 0}}
)

FOREVER_NS = 3600 * 10**9
STEP = 4096


class StepJob(BlockJob):
    """Copies `steps` chunks, one per wake-up; with `ready`, then waits for job-complete."""

    job_type = "mirror"
    can_complete = True

    def __init__(self, daemon: Daemon, job_id: str, *, steps: int = 2, ready: bool = False,
                 fail_at: int | None = None, rate: bool = False, **kw: Any) -> None:  # fmt: skip
        self.steps = steps
        self.ready = ready
        self.fail_at = fail_at
        self.rate = rate
        self.completing = False
        self.committed = False
        self.aborted = False
        node = daemon.graph.lookup("n0")
        super().__init__(daemon.jobs, job_id, daemon.graph, node, **kw)

    async def run(self) -> None:
        self.progress_set_remaining(self.steps * STEP)
        for i in range(self.steps):
            if self.rate:
                self.ratelimit_processed(1 << 20)
                await self.ratelimit_sleep()
            else:
                await self.sleep(FOREVER_NS)  # the test's `step()` wakes us
            if i == self.fail_at:
                raise OSError(errno.EIO, "Input/output error")
            self.progress_update(STEP)
        if self.ready:
            self.set_ready()
            while not self.completing and not self.cancel_requested:
                await self.sleep(FOREVER_NS)

    def step(self) -> None:
        # Like QEMU's job_enter callers: a paused job is re-entered by its resume, not here.
        self._enter(only_if=lambda: not self.paused)

    def complete(self) -> None:
        self.completing = True
        self._enter(only_if=lambda: not self.paused)

    async def commit(self) -> None:
        self.committed = True

    async def abort(self) -> None:
        self.aborted = True


class Recorder:
    def __init__(self, daemon: Daemon) -> None:
        self.events: list[tuple[str, dict[str, Any] | None]] = []
        daemon.events.subscribe(self)

    def __call__(self, name: str, data: dict[str, Any] | None, ts: int) -> None:
        self.events.append((name, data))

    def take(self) -> list[str]:
        """Events since the last take, compactly: 'running', 'BLOCK_JOB_READY', ..."""
        out = [
            str(data["status"]) if name == "JOB_STATUS_CHANGE" and data else name
            for name, data in self.events
        ]
        self.events.clear()
        return out


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    d = Daemon()
    await d.run_command("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    try:
        yield d
    finally:
        await d.shutdown()


async def run(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> Any:
    return await daemon.run_command(name, args)


async def error(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> tuple[str, str]:
    with pytest.raises(QmpError) as info:
        await daemon.run_command(name, args)
    return info.value.error_class, info.value.desc


async def start(daemon: Daemon, job_id: str = "j0", **kw: Any) -> StepJob:
    job = StepJob(daemon, job_id, **kw)
    await daemon.jobs.launch(job)
    return job


async def step_until(job: StepJob, status: JobStatus) -> None:
    """Wake the job until it reaches `status` (each wake-up is one chunk of its work)."""
    for _ in range(job.steps + 2):
        if job.status is status:
            return
        job.step()
        await job_parked(job)
    assert job.status is status


async def job_parked(job: StepJob) -> None:
    """Until the job waits again (or has ended): its first-yield signal is re-armed here."""
    job._first_yield.clear()
    if job.busy:
        await job._first_yield.wait()


# --- life cycles -------------------------------------------------------------------------


async def test_auto_finalize_and_dismiss(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = await start(daemon)
    assert rec.take() == ["created", "running"]  # before the command returned
    assert (await run(daemon, "query-jobs"))[0] == {
        "id": "j0", "type": "mirror", "status": "running",
        "current-progress": 0, "total-progress": 2 * STEP,
    }  # fmt: skip
    info = (await run(daemon, "query-block-jobs"))[0]
    assert info["busy"] is False and info["paused"] is False and info["ready"] is False
    await step_until(job, JobStatus.NULL)
    assert rec.take() == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert job.committed and not job.aborted
    assert await run(daemon, "query-jobs") == []
    assert daemon.graph.lookup("n0").parents == []  # the job let go of its node


async def test_completed_event_data(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = await start(daemon, speed=1 << 30)
    await step_until(job, JobStatus.NULL)
    completed = [data for name, data in rec.events if name == "BLOCK_JOB_COMPLETED"]
    assert completed == [
        {"type": "mirror", "device": "j0", "len": 2 * STEP, "offset": 2 * STEP, "speed": 1 << 30}
    ]


async def test_manual_finalize_and_dismiss(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = await start(daemon, auto_finalize=False, auto_dismiss=False)
    await step_until(job, JobStatus.PENDING)
    assert rec.take() == ["created", "running", "waiting", "pending", "BLOCK_JOB_PENDING"]
    for verb, cmd in (("pause", "job-pause"), ("complete", "job-complete"),
                      ("dismiss", "job-dismiss")):  # fmt: skip
        assert await error(daemon, cmd, {"id": "j0"}) == (
            "GenericError",
            f"Job 'j0' in state 'pending' cannot accept command verb '{verb}'",
        )
    await run(daemon, "job-finalize", {"id": "j0"})
    assert rec.take() == ["BLOCK_JOB_COMPLETED", "concluded"]
    info = (await run(daemon, "query-block-jobs"))[0]
    assert info["status"] == "concluded" and info["paused"] is False
    await run(daemon, "block-job-dismiss", {"id": "j0"})
    assert rec.take() == ["null"]
    assert await error(daemon, "job-dismiss", {"id": "j0"}) == ("GenericError", "Job not found")


async def test_pause_and_resume_are_visible_before_the_reply(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = await start(daemon)
    rec.take()
    await run(daemon, "job-pause", {"id": "j0"})
    assert rec.take() == ["paused"]
    info = (await run(daemon, "query-block-jobs"))[0]
    assert (info["status"], info["paused"]) == ("paused", True)
    assert await error(daemon, "block-job-pause", {"device": "j0"}) == (
        "GenericError",
        "Job is already paused",
    )
    assert await error(daemon, "block-job-cancel", {"device": "j0"}) == (
        "GenericError",
        "The block job for device 'j0' is currently paused",
    )
    await run(daemon, "block-job-set-speed", {"device": "j0", "speed": 0})
    job.step()  # a paused job does not move on
    assert job.status is JobStatus.PAUSED and job.progress_current == 0
    await run(daemon, "block-job-resume", {"device": "j0"})
    assert rec.take() == ["running"]
    assert await error(daemon, "job-resume", {"id": "j0"}) == (
        "GenericError",
        "Can't resume a job that was not paused",
    )
    await step_until(job, JobStatus.NULL)


async def test_ready_standby_complete(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = await start(daemon, ready=True)
    assert await error(daemon, "job-complete", {"id": "j0"}) == (
        "GenericError",
        "Job 'j0' in state 'running' cannot accept command verb 'complete'",
    )
    await step_until(job, JobStatus.READY)
    assert rec.take() == ["created", "running", "ready", "BLOCK_JOB_READY"]
    await run(daemon, "job-pause", {"id": "j0"})
    assert rec.take() == ["standby"]
    info = (await run(daemon, "query-block-jobs"))[0]
    assert (info["status"], info["ready"], info["paused"]) == ("standby", True, True)
    await run(daemon, "job-complete", {"id": "j0"})  # accepted in standby, acted on later
    assert job.status is JobStatus.STANDBY
    await run(daemon, "job-resume", {"id": "j0"})
    assert rec.take() == ["ready"]
    await job.wait_done()
    assert rec.take() == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]


async def test_cancel_running_job(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = await start(daemon, auto_dismiss=False)
    rec.take()
    await run(daemon, "job-cancel", {"id": "j0"})
    await job.wait_done()
    assert rec.take() == ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
    assert job.aborted and not job.committed
    entry = (await run(daemon, "query-jobs"))[0]
    assert (entry["status"], entry["error"]) == ("concluded", "Operation canceled")
    assert (await run(daemon, "query-block-jobs"))[0]["error"] == "Operation canceled"


async def test_cancel_paused_job_resumes_it_before_the_reply(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = await start(daemon, ready=True)
    await step_until(job, JobStatus.READY)
    await run(daemon, "block-job-pause", {"device": "j0"})
    rec.take()
    await run(daemon, "block-job-cancel", {"device": "j0", "force": True})
    assert rec.take() == ["ready"]
    await job.wait_done()
    assert rec.take() == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


async def test_cancel_pending_job(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = await start(daemon, auto_finalize=False, auto_dismiss=False)
    await step_until(job, JobStatus.PENDING)
    rec.take()
    # Without a cancel hook (only mirror has one), every cancel is a forced one.
    await run(daemon, "block-job-cancel", {"device": "j0"})
    assert rec.take() == ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
    assert job.aborted


async def test_failure_reports_the_error(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = await start(daemon, fail_at=1, auto_dismiss=False)
    await step_until(job, JobStatus.CONCLUDED)
    completed = [data for name, data in rec.events if name == "BLOCK_JOB_COMPLETED"]
    assert rec.take()[-3:] == ["aborting", "BLOCK_JOB_COMPLETED", "concluded"]
    assert completed[0] is not None and completed[0]["error"] == "Input/output error"
    assert (await run(daemon, "query-jobs"))[0]["error"] == "Input/output error"
    assert job.aborted


async def test_set_speed(daemon: Daemon) -> None:
    job = await start(daemon, auto_finalize=False)
    assert await error(daemon, "block-job-set-speed", {"device": "j0", "speed": -1}) == (
        "GenericError",
        "Parameter 'speed' expects a non-negative value",
    )
    await run(daemon, "block-job-set-speed", {"device": "j0", "speed": 65536})
    assert (await run(daemon, "query-block-jobs"))[0]["speed"] == 65536
    await step_until(job, JobStatus.PENDING)
    assert await error(daemon, "block-job-set-speed", {"device": "j0", "speed": -1}) == (
        "GenericError",
        "Job 'j0' in state 'pending' cannot accept command verb 'set-speed'",
    )


async def test_ratelimit_sleep_is_cut_short_by_a_faster_speed(daemon: Daemon) -> None:
    job = await start(daemon, speed=1, rate=True)
    # A megabyte at 1 byte/s was accounted: the job sleeps for days, at a pause point.
    assert job.limit.delay_ns(0, daemon.clock.monotonic_ns()) > 10**13
    assert job.status is JobStatus.RUNNING and not job.busy
    await run(daemon, "block-job-set-speed", {"device": "j0", "speed": 2})  # faster: a kick
    await job_parked(job)
    assert not job.busy and job.progress_current == 0  # ... but the limit still asks for days
    await run(daemon, "block-job-set-speed", {"device": "j0", "speed": 0})
    await job.wait_done()  # returns only because set-speed woke the sleeping job
    assert job.status.value == "null"


# --- refusals and ids ----------------------------------------------------------------------


async def test_unknown_ids_and_non_block_jobs(daemon: Daemon, scratch: Any) -> None:
    for cmd in ("job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize",
                "job-dismiss"):  # fmt: skip
        assert await error(daemon, cmd, {"id": "nosuch"}) == ("GenericError", "Job not found")
    await run(daemon, "blockdev-create", {
        "job-id": "cr0", "options": {"driver": "file", "filename": f"{scratch}/a", "size": 0}})  # fmt: skip
    job = daemon.jobs.lookup("cr0")
    await job.wait_done()
    device_cmds = ("block-job-set-speed", "block-job-cancel", "block-job-pause",
                   "block-job-resume", "block-job-complete")  # fmt: skip
    for name in ("nosuch", "cr0"):
        for cmd in device_cmds:
            args: dict[str, Any] = {"device": name}
            if cmd == "block-job-set-speed":
                args["speed"] = 1
            assert await error(daemon, cmd, args) == (
                "DeviceNotActive",
                f"Block job '{name}' not found",
            )
        for cmd in ("block-job-dismiss", "block-job-finalize"):
            assert await error(daemon, cmd, {"id": name}) == (
                "DeviceNotActive",
                f"Block job '{name}' not found",
            )
    assert await run(daemon, "query-block-jobs") == []


async def test_job_ids(daemon: Daemon) -> None:
    await start(daemon, "a-b.c_1")
    with pytest.raises(QmpError, match=r"^Job ID 'a-b.c_1' already in use$"):
        StepJob(daemon, "a-b.c_1")
    for bad in ("", "1x", "#x", "a b"):
        with pytest.raises(QmpError) as info:
            StepJob(daemon, bad)
        assert info.value.desc == f"Invalid job ID '{bad}'"
    with pytest.raises(QmpError, match=r"^Invalid job ID ''$"):
        BlockJob(daemon.jobs, None, daemon.graph, daemon.graph.lookup("n0"))


async def test_setup_failure_goes_from_created_to_null(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    await start(daemon, "w", perm=Perm.WRITE, shared=PERM_ALL & ~Perm.WRITE)
    rec.take()
    with pytest.raises(QmpError) as info:
        StepJob(daemon, "s0", perm=Perm.WRITE)
    assert info.value.desc == (
        "Permission conflict on node 'n0': permissions 'write' are both required by "
        "mirror job 's0' (uses node 'n0' as 'main node' child) and unshared by "
        "mirror job 'w' (uses node 'n0' as 'main node' child)."
    )
    assert rec.take() == ["created", "null"]
    assert daemon.jobs.find("s0") is None
    with pytest.raises(QmpError, match="non-negative"):
        StepJob(daemon, "s1", speed=-1)
    assert rec.take() == ["created", "null"]


# --- every verb in every state --------------------------------------------------------------

VERB_COMMANDS = {
    JobVerb.CANCEL: ("job-cancel", {}),
    JobVerb.PAUSE: ("job-pause", {}),
    JobVerb.COMPLETE: ("job-complete", {}),
    JobVerb.FINALIZE: ("job-finalize", {}),
    JobVerb.DISMISS: ("job-dismiss", {}),
    JobVerb.SET_SPEED: ("block-job-set-speed", {"speed": 0}),
}


async def _job_in(daemon: Daemon, status: JobStatus) -> StepJob:
    ready = status in (JobStatus.READY, JobStatus.STANDBY)
    job = await start(daemon, ready=ready, auto_finalize=False, auto_dismiss=False)
    if status is JobStatus.PAUSED:
        job.user_pause()
    elif ready:
        await step_until(job, JobStatus.READY)
        if status is JobStatus.STANDBY:
            job.user_pause()
    elif status is not JobStatus.RUNNING:
        await step_until(job, JobStatus.PENDING)
        if status is JobStatus.CONCLUDED:
            await job.user_finalize()
    assert job.status is status
    return job


STATES = [JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.READY, JobStatus.STANDBY,
          JobStatus.PENDING, JobStatus.CONCLUDED]  # fmt: skip


@pytest.mark.parametrize("status", STATES, ids=lambda s: s.value)
@pytest.mark.parametrize("verb", list(VERB_COMMANDS), ids=lambda v: v.value)
async def test_verb_in_state(daemon: Daemon, status: JobStatus, verb: JobVerb) -> None:
    job = await _job_in(daemon, status)
    name, extra = VERB_COMMANDS[verb]
    key = "device" if name.startswith("block-job") else "id"
    args = {key: "j0", **extra}
    if verb is JobVerb.PAUSE and status in (JobStatus.PAUSED, JobStatus.STANDBY):
        assert await error(daemon, name, args) == ("GenericError", "Job is already paused")
    elif status in VERBS[verb]:
        await run(daemon, name, args)
        assert not (verb is JobVerb.DISMISS and daemon.jobs.find("j0") is not None)
    else:
        assert await error(daemon, name, args) == (
            "GenericError",
            f"Job 'j0' in state '{status.value}' cannot accept command verb '{verb.value}'",
        )
        assert job.status is status


async def test_created_job_accepts_pause_and_pauses_when_started(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = StepJob(daemon, "j0")
    assert (await run(daemon, "query-block-jobs"))[0]["paused"] is True  # born paused
    assert await error(daemon, "job-resume", {"id": "j0"}) == (
        "GenericError",
        "Can't resume a job that was not paused",
    )
    await run(daemon, "job-pause", {"id": "j0"})
    await daemon.jobs.launch(job)
    assert rec.take() == ["created", "running", "paused"]
    await run(daemon, "job-resume", {"id": "j0"})
    assert rec.take() == ["running"]


async def test_cancel_before_start(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    job = StepJob(daemon, "j0")
    await run(daemon, "job-cancel", {"id": "j0"})
    assert rec.take() == ["created", "aborting", "concluded", "null"]  # no BLOCK_JOB_* event
    assert job.aborted


# --- transactions and shutdown -------------------------------------------------------------


async def test_transaction_completes_together(daemon: Daemon) -> None:
    rec = Recorder(daemon)
    txn = JobTxn()
    a = await start(daemon, "a", txn=txn, steps=1)
    b = await start(daemon, "b", txn=txn, steps=1)
    rec.take()
    await step_until(a, JobStatus.WAITING)
    assert rec.take() == ["waiting"]
    await step_until(b, JobStatus.NULL)
    assert [(n, d and d.get("id", d.get("device"))) for n, d in rec.events] == [
        ("JOB_STATUS_CHANGE", "b"),  # waiting
        ("JOB_STATUS_CHANGE", "a"),  # pending
        ("JOB_STATUS_CHANGE", "b"),  # pending
        ("BLOCK_JOB_COMPLETED", "a"), ("JOB_STATUS_CHANGE", "a"), ("JOB_STATUS_CHANGE", "a"),
        ("BLOCK_JOB_COMPLETED", "b"), ("JOB_STATUS_CHANGE", "b"), ("JOB_STATUS_CHANGE", "b"),
    ]  # fmt: skip


async def test_transaction_failure_cancels_the_others(daemon: Daemon) -> None:
    txn = JobTxn()
    a = await start(daemon, "a", txn=txn, steps=3, auto_dismiss=False)
    b = await start(daemon, "b", txn=txn, steps=1, fail_at=0, auto_dismiss=False)
    b.step()
    await b.wait_done()
    await a.wait_done()
    assert a.status is b.status is JobStatus.CONCLUDED
    assert a.aborted and b.aborted
    assert a.error == "Operation canceled" and b.error == "Input/output error"


async def test_shutdown_cancels_every_job() -> None:
    d = Daemon()
    await d.run_command("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    rec = Recorder(d)
    await start(d, "run")
    done = await start(d, "done", auto_finalize=False, auto_dismiss=False, steps=0)
    await step_until(done, JobStatus.PENDING)
    await done.user_finalize()
    rec.take()
    await d.shutdown()
    assert len(d.jobs) == 0
    assert rec.take() == [
        "paused", "null", "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"
    ]  # fmt: skip
    assert d.graph.find("n0") is None


def status_of(job: StepJob) -> JobStatus:
    """The job's status now (a call, so that checks in a row are not narrowed away)."""
    return job.status


async def test_drain_waits_for_a_busy_job_to_park_paused(daemon: Daemon) -> None:
    """A drained section (transactions) waits until a job in the middle of its work reaches a
    pause point, so its `paused` event comes first; its end resumes it."""
    rec = Recorder(daemon)
    job = await start(daemon, steps=3)
    rec.take()
    job.step()  # woken: busy until it next waits
    assert job.busy and status_of(job) is JobStatus.RUNNING
    await job.drain_pause()
    assert status_of(job) is JobStatus.PAUSED and rec.take() == ["paused"]
    await job.drain_resume()
    assert status_of(job) is JobStatus.RUNNING and rec.take() == ["running"]
    await job.drain_pause()  # parked in its sleep: paused at once
    await job.drain_pause()  # nested sections: one event
    assert rec.take() == ["paused"]
    await job.drain_resume()
    assert rec.take() == [] and status_of(job) is JobStatus.PAUSED
    await job.drain_resume()
    assert rec.take() == ["running"]
    await run(daemon, "job-cancel", {"id": "j0"})
    await job.wait_done()
