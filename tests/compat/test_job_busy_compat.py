"""Compat: qsd's op blockers ("Node 'X' is busy: block device is in use by block job: T") for
block-commit, block-stream and blockdev-mirror while other jobs hold nodes of the chain.

Test ring. Every job is rate-limited so that it is still running when the next command
comes; only the replies are compared (the job events' interleaving is timing).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, StepLike, WaitEvent
from tests.compat.test_block_jobs_compat import add_chain_by_nodes, make_chain

pytestmark = pytest.mark.compat

SLOW = 1024  # bytes per second: no job below finishes during the test


def backup(device: str) -> list[StepLike]:
    """A running backup of `device`: its copy-before-write filter (the job's main node)
    goes above `device`."""
    return [
        Cmd("blockdev-add", {"driver": "null-co", "node-name": "tgt", "size": 4 << 20}),
        Cmd(
            "blockdev-backup",
            {"job-id": "b", "device": device, "target": "tgt", "sync": "full", "speed": SLOW},
        ),
        WaitEvent("JOB_STATUS_CHANGE"),
        WaitEvent("JOB_STATUS_CHANGE"),
    ]


def job_replies(records: list[Any]) -> list[Any]:
    return [
        (rec["send"]["execute"], rec["send"].get("arguments"), rec.get("reply"))
        for rec in records
        if "send" in rec
    ]


def assert_same_replies(compat: Compat, steps: list[StepLike]) -> list[Any]:
    r = compat.run_transcript(steps, setup=make_chain)
    ref = job_replies(r.norm["reference"])
    assert job_replies(r.norm["ours"]) == ref
    return ref


ATTEMPTS: list[StepLike] = [
    Cmd("block-commit", {"job-id": "c1", "device": "top", "top-node": "mid", "speed": SLOW}),
    Cmd("block-commit", {"job-id": "c2", "device": "top", "speed": SLOW}),
    Cmd("block-stream", {"job-id": "s1", "device": "top", "speed": SLOW}),
    Cmd("block-stream", {"job-id": "s2", "device": "mid", "speed": SLOW}),
    Cmd("block-stream", {"job-id": "s3", "device": "top", "base-node": "mid", "speed": SLOW}),
    Cmd("blockdev-mirror", {"job-id": "m1", "device": "top", "target": "tgt", "sync": "full"}),
]


@pytest.mark.parametrize("watched", ["base", "mid", "top"])
def test_jobs_on_a_chain_with_a_backup(compat: Compat, watched: str) -> None:
    ref = assert_same_replies(compat, [*add_chain_by_nodes(), *backup(watched), *ATTEMPTS])
    errors = [reply["error"]["desc"] for _, _, reply in ref if "error" in reply]
    assert any("is busy: block device is in use by block job" in e for e in errors)


def test_commit_checks_order_with_busy_nodes(compat: Compat) -> None:
    """The backup's filter sits between mid and base: bad top/base arguments and the
    intermediate commit's blockers, in qsd's order."""
    commits: list[dict[str, Any]] = [
        {"top-node": "nosuch"},
        {"top-node": "mid", "base-node": "nosuch"},
        {"top-node": "mid", "base-node": "top"},
        {"top-node": "mid", "base-node": "mid"},
        {"top-node": "mid", "base-node": "base", "backing-file": "x"},
        {"base-node": "base", "backing-file": "x"},
        {"top-node": "top", "base-node": "mid"},
    ]
    steps: list[StepLike] = [*add_chain_by_nodes(), *backup("base")]
    for i, extra in enumerate(commits):
        steps.append(Cmd("block-commit", {"job-id": f"c{i}", "device": "top", **extra}))
    ref = assert_same_replies(compat, steps)
    assert any("is busy" in str(reply) for _, _, reply in ref)
