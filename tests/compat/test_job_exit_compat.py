"""The daemon's exit with jobs, on the reference qsd and on ours: `quit` or SIGTERM while jobs
run, sleep in their rate limit, are READY, paused, pending or concluded. Everything the
client receives after the trigger is compared in arrival order, `quit`'s reply included:
qsd drains every node (jobs pause, READY ones stand by), cancels the jobs one at a time, newest
first, each to its end, and only then answers `quit` and closes the monitor.

Test ring (compat). Each case starts a fresh pair of daemons on the same qemu-img-made chain
(base <- mid <- top), stopped by PID at teardown. Rate-limited jobs (1 KiB/s) park in their
sleep after their first request on both sides, so what they copied before the exit does not
depend on timing.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, StepLike, WaitEvent, normalise_transcript
from tests.compat.harness import run_transcript as run_steps
from tests.compat.test_block_jobs_compat import STATUS, add_chain_by_nodes, make_chain
from tests.integration.daemon import RawQmp

pytestmark = pytest.mark.compat

SLOW = {"speed": 1024}
SETTLE_QUERIES = 2000
NULL_TARGET = Cmd("blockdev-add", {"driver": "null-co", "node-name": "tgt", "size": 4 << 20})


@dataclass(frozen=True)
class Settle:
    """Wait until the job's progress is `progress`: how far a rate-limited job gets with its
    first request, the same on both sides (see `settle`)."""

    progress: int


def ready() -> list[WaitEvent]:
    return [WaitEvent("BLOCK_JOB_READY"), WaitEvent(STATUS)]


def started() -> list[WaitEvent]:
    return [WaitEvent(STATUS), WaitEvent(STATUS)]  # created, running


STREAM = Cmd("block-stream", {"job-id": "j", "device": "top", **SLOW})
STREAMED = Settle(512 << 10)
COMMIT = Cmd("block-commit", {"job-id": "j", "device": "top", "top-node": "mid", **SLOW})
ACTIVE = Cmd("block-commit", {"job-id": "j", "device": "top", **SLOW})
MIRROR = Cmd("blockdev-mirror", {"job-id": "j", "device": "top", "target": "tgt", "sync": "full"})


SCENARIOS: dict[str, list[StepLike | Settle]] = {
    "stream-running": [STREAM, *started(), STREAMED],
    "commit-running": [COMMIT, *started(), Settle(1 << 20)],
    "active-commit-running": [ACTIVE, *started(), Settle(1 << 20)],
    "active-commit-ready": [
        Cmd("block-commit", {"job-id": "j", "device": "top"}),
        *started(),
        *ready(),
    ],
    "mirror-ready": [NULL_TARGET, MIRROR, *started(), *ready()],
    "mirror-running": [
        NULL_TARGET,
        Cmd("blockdev-mirror", {**(MIRROR.args or {}), **SLOW}),
        *started(),
        Settle(4 << 20),  # its first iteration: four 1 MiB requests
    ],
    "backup-running": [
        NULL_TARGET,
        Cmd(
            "blockdev-backup",
            {"job-id": "j", "device": "top", "target": "tgt", "sync": "full", **SLOW},
        ),
        *started(),
        WaitEvent(STATUS),
        WaitEvent(STATUS),
    ],
    "user-paused": [STREAM, *started(), STREAMED, Cmd("job-pause", {"id": "j"}), WaitEvent(STATUS)],
    "user-paused-ready": [
        Cmd("block-commit", {"job-id": "j", "device": "top"}),
        *started(),
        *ready(),
        Cmd("job-pause", {"id": "j"}),
        WaitEvent(STATUS),
    ],
    "pending": [
        Cmd("block-stream", {"job-id": "j", "device": "top", "auto-finalize": False}),
        *started(),
        WaitEvent("BLOCK_JOB_PENDING"),
        WaitEvent(STATUS),
        WaitEvent(STATUS),
    ],
    "concluded": [
        Cmd("block-stream", {"job-id": "j", "device": "top", "auto-dismiss": False}),
        *started(),
        WaitEvent("BLOCK_JOB_COMPLETED"),
        *[WaitEvent(STATUS)] * 3,
    ],
}


def two_jobs() -> list[StepLike | Settle]:
    """jx holds the older nodes and is the older job: the drain reaches it first, the
    cancel takes jy (newest) first, to its end (auto-dismiss off: dismissed at once)."""

    def null(name: str) -> Cmd:
        return Cmd("blockdev-add", {"driver": "null-co", "node-name": name, "size": 4 << 20})

    def job(job_id: str, device: str, target: str, **extra: Any) -> Cmd:
        return Cmd(
            "blockdev-mirror",
            {
                "job-id": job_id,
                "device": device,
                "target": target,
                "sync": "full",
                "speed": 1,
                **extra,
            },
        )

    return [
        null("X"),
        null("Y"),
        null("tx"),
        null("ty"),
        job("jx", "X", "tx"),
        *started(),
        job("jy", "Y", "ty", **{"auto-dismiss": False}),
        *started(),
        Settle(4 << 20),
    ]


def settle(client: RawQmp, progress: int) -> None:
    """Until every job has made its first request and sleeps in its rate limit: the command
    returns at the job's first yield, a zero-length sleep before its first request (qsd's
    too), so a trigger sent at once could find it there on either side. Each query is a
    round trip through the daemon's loop; no sleeping."""
    for _ in range(SETTLE_QUERIES):
        jobs = client.cmd("query-jobs")["return"]
        if jobs and all(job["current-progress"] >= progress for job in jobs):
            return
    raise AssertionError(f"job still at {jobs}")


def run_exit(
    compat: Compat, steps: list[StepLike | Settle], trigger: str, *, chain: bool = True
) -> dict[str, list[Any]]:
    """Run `steps` on both sides, then `quit` (or SIGTERM); record, normalised, the steps and
    then every message that arrives after the trigger, in order, with EOF and exit status."""
    all_steps: list[StepLike | Settle] = [*add_chain_by_nodes(), *steps] if chain else steps
    pair = compat.daemons(setup=make_chain if chain else None)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        records: list[Any] = []
        segment: list[StepLike] = []
        for step in [*all_steps, None]:
            if isinstance(step, Settle) or step is None:
                done = run_steps(client, daemon, segment, daemon.workdir)
                records += json.loads(json.dumps(done))
                client.events.clear()
                segment = []
                if step is not None:
                    settle(client, step.progress)
            else:
                segment.append(step)
        for record in records:
            assert "outcome" not in record, (side, record)
        mark = len(client.raw_lines)
        if trigger == "quit":
            client.send_json({"execute": "quit"})
        else:
            os.kill(daemon.pid, signal.SIGTERM)
        eof = client.at_eof(15)
        after = [json.loads(line) for line in client.raw_lines[mark:]]
        records.append({"after-" + trigger: after, "eof": eof, "exit": daemon.wait_exit(15)})
        out[side] = normalise_transcript(records, daemon.workdir)
    return out


def assert_same(result: dict[str, list[Any]]) -> None:
    ref, ours = result["reference"], result["ours"]
    if ref != ours:
        from tests.compat.harness import diff_text

        raise AssertionError("exit mismatch\n" + diff_text(ref, ours))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_quit(compat: Compat, scenario: str) -> None:
    result = run_exit(compat, SCENARIOS[scenario], "quit")
    assert_same(result)
    after = result["reference"][-1]["after-quit"]
    assert after[-1] == {"return": {}}, "qsd answers quit last"
    assert result["reference"][-1]["exit"] == 0


@pytest.mark.parametrize("scenario", ["active-commit-ready", "user-paused", "pending"])
def test_sigterm(compat: Compat, scenario: str) -> None:
    assert_same(run_exit(compat, SCENARIOS[scenario], "sigterm"))


@pytest.mark.parametrize("trigger", ["quit", "sigterm"])
def test_two_jobs(compat: Compat, trigger: str) -> None:
    result = run_exit(compat, two_jobs(), trigger, chain=False)
    assert_same(result)
    statuses = [
        f"{m['data']['id']}:{m['data']['status']}"
        for m in result["reference"][-1]["after-" + trigger]
        if m.get("event") == STATUS
    ]
    assert statuses[:3] == ["jx:paused", "jy:paused", "jy:running"]
