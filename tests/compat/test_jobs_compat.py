"""Job commands and blockdev-create, run on the reference qsd and on ours; replies and events
compared (tests/compat/harness.py normalises timestamps and paths).

Test ring (compat). Each test starts a fresh pair of daemons, stopped by PID at teardown.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, WaitEvent

pytestmark = pytest.mark.compat

STATUS = "JOB_STATUS_CHANGE"


def create(job_id: str, **options: Any) -> Cmd:
    return Cmd("blockdev-create", {"job-id": job_id, "options": {"driver": "file", **options}})


def statuses(n: int) -> list[WaitEvent]:
    return [WaitEvent(STATUS) for _ in range(n)]


def test_blockdev_create_file_life_cycle(compat: Compat) -> None:
    compat.check_transcript(
        [
            create("cr0", filename="$D/new.raw", size=1048576),
            *statuses(5),  # created, running, waiting, pending, concluded
            Cmd("query-jobs"),
            Cmd("query-block-jobs"),
            Cmd("job-pause", {"id": "cr0"}),
            Cmd("job-cancel", {"id": "cr0"}),
            Cmd("job-complete", {"id": "cr0"}),
            Cmd("job-finalize", {"id": "cr0"}),
            Cmd("job-resume", {"id": "cr0"}),
            Cmd("block-job-pause", {"device": "cr0"}),
            Cmd("block-job-dismiss", {"id": "cr0"}),
            create("cr0", filename="$D/other.raw", size=1),
            Cmd("job-dismiss", {"id": "cr0"}),
            WaitEvent(STATUS),  # null
            Cmd("job-dismiss", {"id": "cr0"}),
            Cmd("query-jobs"),
            Cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "$D/new.raw"}),
            Cmd("query-named-block-nodes", {"flat": True}),
        ]
    )


def test_blockdev_create_file_options_and_failures(compat: Compat) -> None:
    compat.check_transcript(
        [
            # One job at a time: concurrent jobs' events interleave by timing.
            create("p1", filename="$D/p1.raw", size=1048577, preallocation="falloc"),
            *statuses(5),
            create("p2", filename="$D/p2.raw", size=300000, preallocation="full"),
            *statuses(5),
            create("p3", filename="$D/p3.raw", size=1048576, preallocation="metadata"),
            *statuses(4),
            create("p4", filename="$D/p4.raw", size=4096, nocow=True, **{"extent-size-hint": 0}),
            *statuses(5),
            create("p5", filename="$D/p5.raw", size=-1),
            *statuses(4),
            create("p6", filename="$D/p6.raw", size=0, **{"extent-size-hint": -1}),
            *statuses(4),
            create("p7", filename="$D/no/such.raw", size=5),
            *statuses(4),
            create("p8", filename="$D", size=5),
            *statuses(4),
            Cmd("query-jobs"),
            Cmd("blockdev-create", {"job-id": "x", "options": {"driver": "null-co"}}),
            Cmd("blockdev-create", {"job-id": "x", "options": {"driver": "raw"}}),
            Cmd("blockdev-create", {"options": {"driver": "file", "filename": "$D/a", "size": 1}}),
            create("", filename="$D/a", size=1),
            create("1x", filename="$D/a", size=1),
            create("a b", filename="$D/a", size=1),
            create("x", filename="$D/a", size=1, bogus=1),
            create("x", filename="$D/a"),
            Cmd("query-jobs"),
        ]
    )


def test_unknown_jobs(compat: Compat) -> None:
    steps: list[Cmd] = []
    for name in ("job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize",
                 "job-dismiss"):  # fmt: skip
        steps.append(Cmd(name, {"id": "nosuch"}))
    for name in ("block-job-pause", "block-job-resume", "block-job-cancel", "block-job-complete"):
        steps.append(Cmd(name, {"device": "nosuch"}))
    steps += [
        Cmd("block-job-set-speed", {"device": "nosuch", "speed": 1}),
        Cmd("block-job-cancel", {"device": "nosuch", "force": True}),
        Cmd("block-job-dismiss", {"id": "nosuch"}),
        Cmd("block-job-finalize", {"id": "nosuch"}),
        Cmd("query-jobs"),
        Cmd("query-block-jobs"),
    ]
    compat.check_transcript(steps)
