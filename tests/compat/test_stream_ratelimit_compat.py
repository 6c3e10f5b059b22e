"""block-stream's rate limit on the reference qsd and on ours: only ranges the job copies count
against the speed, nothing is waited for after a range it skips, and each sleep is one sleep
that a pause/resume cuts short (the job then copies one more chunk and sleeps again).

Test ring (compat). Fresh daemon pairs on the same qemu-img-made chains, stopped by PID at
teardown. At speed 1 the first copy asks for a sleep of days, so where the job stands is
observed at pauses (its offset once the `paused` event came), never at a point in time.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, ExpectEof, WaitEvent, diff_text, normalise_transcript
from tests.integration.daemon import RawQmp

pytestmark = pytest.mark.compat

STATUS = "JOB_STATUS_CHANGE"
QUERIES = 2000
TOP: dict[str, Any] = {
    "driver": "qcow2",
    "node-name": "top",
    "file": {"driver": "file", "node-name": "top-file", "filename": "$D/top.qcow2"},
}
# What the 4 MiB top holds (qemu-io writes) over a base that holds all of it, or nothing.
CHAINS: dict[str, tuple[list[str], bool]] = {
    "top-empty": ([], True),
    "top-full": (["write -P 3 0 4M"], True),
    "base-empty": ([], False),
    "top-some": (["write -P 3 0 1M", "write -P 3 2M 512k"], True),
    "top-odd": (["write -P 3 64k 64k", "write -P 3 1M 1M"], True),
}


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def make_chain(kind: str) -> Any:
    writes, base_data = CHAINS[kind]

    def setup(d: Path) -> None:
        _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "4M")
        if base_data:
            _run("qemu-io", "-c", "write -P 1 0 4M", f"{d}/base.qcow2")
        _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             f"{d}/top.qcow2")  # fmt: skip
        for write in writes:
            _run("qemu-io", "-c", write, f"{d}/top.qcow2")

    return setup


@pytest.mark.parametrize("kind", ["top-full", "base-empty"])
def test_nothing_to_copy_ends_at_once_at_speed_1(compat: Compat, kind: str) -> None:
    """Nothing is copied, so speed 1 never makes the job wait: it completes with len and
    offset the whole image."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", TOP),
            Cmd("block-stream", {"job-id": "s", "device": "top", "speed": 1}),
            *[WaitEvent(STATUS) for _ in range(4)],  # created, running, waiting, pending
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *[WaitEvent(STATUS) for _ in range(2)],  # concluded, null
            Cmd("query-jobs"),
            Cmd("quit"),
            ExpectEof(),
        ],
        setup=make_chain(kind),
    )


def wait_status(client: RawQmp, status: str) -> None:
    while client.wait_event(STATUS)["data"]["status"] != status:
        pass


def offsets_at_pauses(client: RawQmp, cycles: int) -> list[Any]:
    """The job's offset at each of `cycles` pauses, resumed in between; then speed 0 and the
    completion event."""
    for _ in range(QUERIES):  # until the first copy has been counted
        jobs = client.cmd("query-jobs")["return"]
        if not jobs or jobs[0]["current-progress"] > 0:
            break
    seen: list[Any] = []
    for _ in range(cycles):
        assert "return" in client.cmd("block-job-pause", {"device": "s"})
        wait_status(client, "paused")
        seen.append([(j["current-progress"], j["status"]) for j in
                     client.cmd("query-jobs")["return"]])  # fmt: skip
        assert "return" in client.cmd("block-job-resume", {"device": "s"})
        wait_status(client, "running")
    assert "return" in client.cmd("block-job-set-speed", {"device": "s", "speed": 0})
    seen.append(client.wait_event("BLOCK_JOB_COMPLETED")["data"])
    return seen


@pytest.mark.parametrize("kind", ["top-empty", "top-some", "top-odd"])
def test_each_resume_copies_one_more_chunk(compat: Compat, kind: str) -> None:
    """At speed 1 every copy asks for a sleep of days; a pause cuts it short, and once
    resumed the job skips what the top holds, copies one chunk and sleeps again."""
    pair = compat.daemons(setup=make_chain(kind))
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        top = {**TOP, "file": {**TOP["file"], "filename": f"{daemon.workdir}/top.qcow2"}}
        assert "return" in client.cmd("blockdev-add", top), side
        stream = {"job-id": "s", "device": "top", "speed": 1}
        assert "return" in client.cmd("block-stream", stream), side
        records = offsets_at_pauses(client, 3)
        client.cmd("quit")
        out[side] = normalise_transcript([{"steps": records}], daemon.workdir)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))
    steps = out["reference"][0]["steps"]
    offsets = [entry[0][0] for entry in steps[:-1]]
    assert offsets == sorted(set(offsets)) and len(offsets) == 3, offsets
