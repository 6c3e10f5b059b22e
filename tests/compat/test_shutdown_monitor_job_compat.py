"""Commands sent to a monitor while the daemon exits with a job running, on the reference qsd
and on ours: after `quit`, the commands pipelined behind it get no reply (only the jobs'
cancel events, then `quit`'s reply, then EOF); after SIGTERM, a command sent once the exit
has begun (the job's drain is seen) is not answered during the exit either.

Test ring (compat). Each case starts a fresh pair of daemons on the same qemu-img-made chain,
stopped by PID at teardown.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, diff_text, normalise_transcript, substitute
from tests.compat.test_block_jobs_compat import add_chain_by_nodes, make_chain
from tests.integration.daemon import RawQmp

pytestmark = pytest.mark.compat

QUERIES = 2000
START = [
    *add_chain_by_nodes(),
    Cmd("blockdev-add", {"driver": "null-co", "node-name": "tgt", "size": 4 << 20}),
    Cmd("blockdev-mirror",
        {"job-id": "j", "device": "top", "target": "tgt", "sync": "full", "speed": 1024}),
]  # fmt: skip
LATER = [
    {"execute": "query-jobs", "id": 2},
    {"execute": "query-version", "id": 3},
    {"execute": "block-job-cancel", "arguments": {"device": "j"}, "id": 4},
]


def run(compat: Compat, trigger: str) -> dict[str, list[Any]]:
    pair = compat.daemons(setup=make_chain)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client: RawQmp = compat.connect(daemon)
        client.negotiate()
        for cmd in START:
            assert "return" in client.cmd(cmd.name, substitute(cmd.args, daemon.workdir))
        for _ in range(QUERIES):  # until the mirror sleeps in its rate limit
            jobs = client.cmd("query-jobs")["return"]
            if jobs and jobs[0]["current-progress"] > 0:
                break
        client.events.clear()
        mark = len(client.raw_lines)
        if trigger == "quit":
            client.send_json({"execute": "quit", "id": 1})
        else:
            os.kill(daemon.pid, signal.SIGTERM)
            client.wait_event("JOB_STATUS_CHANGE", 15)  # the exit's drain has begun
        for message in LATER:
            try:
                client.send_json(message)
            except OSError:  # already gone: unanswered all the same
                break
        eof = client.at_eof(15)
        after = [json.loads(line) for line in client.raw_lines[mark:]]
        records = [{"after": after, "eof": eof, "exit": daemon.wait_exit(15)}]
        out[side] = normalise_transcript(records, daemon.workdir)
    return out


@pytest.mark.parametrize("trigger", ["quit", "sigterm"])
def test_no_command_runs_during_the_exit(compat: Compat, trigger: str) -> None:
    result = run(compat, trigger)
    if result["ours"] != result["reference"]:
        raise AssertionError(diff_text(result["reference"], result["ours"]))
    after = result["reference"][0]["after"]
    assert not any(m.get("id") in (2, 3, 4) for m in after)
