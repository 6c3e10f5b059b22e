"""The daemon's exit with jobs in an in-process daemon: qsd drains every node (the jobs pause,
in the order the drain reaches them) and then cancels the jobs one at a time, newest first,
each to the end before the next; and a job paused in its sleep stays paused.

Component ring. Jobs are real mirrors between null-co nodes (rate-limited ones park in their
sleep after their first request) and a bare job whose sleep ends at once; nothing waits on
time, every wait is for an event or for the job to park again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from storage_daemon.blockdev.jobs.fsm import JobStatus
from storage_daemon.blockdev.jobs.job import Job
from storage_daemon.daemon import Daemon
from tests.component.test_mirror import Recorder

MiB = 1 << 20


async def null_node(daemon: Daemon, name: str) -> None:
    await daemon.run_command("blockdev-add", {"driver": "null-co", "node-name": name, "size": MiB})


def mirror(job_id: str, source: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"job-id": job_id, "device": source, "target": target, "sync": "full", **extra}


def statuses(rec: Recorder, data: bool = False) -> list[str]:
    """The recorded events as 'id:status' or the event name with its device."""
    out = []
    for name, body in rec.data:
        assert body is not None
        if name == "JOB_STATUS_CHANGE":
            out.append(f"{body['id']}:{body['status']}")
        else:
            out.append(f"{name}:{body['device']}")
    rec.data.clear()
    return out


async def test_ready_job_stands_by_then_is_cancelled() -> None:
    d = Daemon()
    for name in ("src", "tgt"):
        await null_node(d, name)
    rec = Recorder(d)
    await d.run_command("blockdev-mirror", mirror("m0", "src", "tgt"))
    await rec.wait_for("ready")
    rec.data.clear()
    await d.shutdown()
    assert statuses(rec) == [
        "m0:standby",  # the drain
        "m0:ready",  # the cancel enters the job
        "m0:aborting",
        "BLOCK_JOB_CANCELLED:m0",
        "m0:concluded",
        "m0:null",
    ]
    assert len(d.jobs) == 0 and len(d.graph) == 0


async def test_drained_in_node_order_cancelled_newest_first() -> None:
    """jx holds the older nodes but is the older job: the drain pauses it first, the cancel
    takes jy first and ends it (dismissing it) before it takes jx."""
    d = Daemon()
    for name in ("X", "Y", "tx", "ty"):
        await null_node(d, name)
    rec = Recorder(d)
    await d.run_command("blockdev-mirror", mirror("jx", "X", "tx", speed=1))
    await d.run_command(
        "blockdev-mirror", mirror("jy", "Y", "ty", speed=1, **{"auto-dismiss": False})
    )
    rec.data.clear()
    await d.shutdown()
    assert statuses(rec) == [
        "jx:paused",
        "jy:paused",
        "jy:running",
        "jy:aborting",
        "BLOCK_JOB_CANCELLED:jy",
        "jy:concluded",
        "jy:null",
        "jx:running",
        "jx:aborting",
        "BLOCK_JOB_CANCELLED:jx",
        "jx:concluded",
        "jx:null",
    ]


async def test_pending_and_concluded_jobs_at_exit() -> None:
    d = Daemon()
    for name in ("X", "Y", "tx", "ty"):
        await null_node(d, name)
    rec = Recorder(d)
    await d.run_command("blockdev-mirror", mirror("done", "X", "tx", **{"auto-dismiss": False}))
    await rec.wait_for("ready")
    await d.run_command("job-complete", {"id": "done"})
    await rec.wait_for("concluded")
    rec.take()
    await d.run_command("blockdev-mirror", mirror("pend", "Y", "ty", **{"auto-finalize": False}))
    await rec.wait_for("BLOCK_JOB_READY")
    await d.run_command("job-complete", {"id": "pend"})
    await rec.wait_for("BLOCK_JOB_PENDING")
    rec.data.clear()
    await d.shutdown()
    assert statuses(rec) == [
        "pend:aborting",
        "BLOCK_JOB_CANCELLED:pend",
        "pend:concluded",
        "pend:null",
        "done:null",
    ]


class SleepyJob(Job):
    """READY at once, then sleeps in 0 ns slices until cancelled: the timer of each sleep is
    due at once."""

    job_type = "mirror"

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon.jobs, "z")

    async def run(self) -> None:
        self.set_ready()
        while not self.cancel_requested:
            await self.sleep(0)


async def test_a_job_paused_in_its_sleep_stays_paused() -> None:
    """job_enter deletes the sleep's timer: once parked as paused (standby) only a resume
    wakes the job, however soon its sleep would have ended."""
    d = Daemon()
    rec = Recorder(d)
    job = SleepyJob(d)
    await d.jobs.launch(job)
    rec.data.clear()
    sleeping = job._wake
    assert sleeping is not None
    job.user_pause()
    assert statuses(rec) == ["z:standby"]
    # The due timer fires at the next loop turns; the job then waits on a new future (or,
    # were the timer still armed, would run again).
    for _ in range(100):
        if job._wake is not sleeping:
            break
        await asyncio.sleep(0)
    assert job._wake is not sleeping
    assert job.status is JobStatus.STANDBY and not job.busy and statuses(rec) == []
    job.user_resume()
    assert statuses(rec) == ["z:ready"]
    await d.shutdown()
    assert statuses(rec)[-1] == "z:null"


class SlowPrepareJob(Job):
    """Nothing to do; its prepare waits for the test (as a flush may take its time)."""

    job_type = "mirror"

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon.jobs, "p")
        self.gate = asyncio.Event()
        self.preparing = asyncio.Event()

    async def run(self) -> None:
        self.release_start()

    async def prepare(self) -> None:
        self.preparing.set()
        await self.gate.wait()


async def test_the_exit_lets_a_finalization_end_first() -> None:
    """qsd finalizes a job in one go: the exit's cancel comes after it, and finds the job
    gone (here: concluded, not aborted)."""
    d = Daemon()
    rec = Recorder(d)
    job = SlowPrepareJob(d)
    await d.jobs.launch(job)
    await job.preparing.wait()
    assert job.status is JobStatus.PENDING
    rec.data.clear()
    exiting = asyncio.get_running_loop().create_task(d.shutdown())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not exiting.done() and statuses(rec) == []
    job.gate.set()
    await exiting
    assert statuses(rec) == ["p:concluded", "p:null"]
