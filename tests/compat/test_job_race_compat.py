"""Job verbs that race a stream's finish, on the reference qsd and on ours: qsd finalizes a
job in one go before it reads the next command, so a verb sent after the `waiting` or
`pending` event sees the job gone (auto-dismiss: "Job not found", or DeviceNotActive for
block-job-*) or concluded. Replies and every event are compared. Test ring (compat); every
daemon is stopped by PID at teardown.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, Raw, WaitEvent

pytestmark = pytest.mark.compat

STATUS = "JOB_STATUS_CHANGE"
ARGS = [
    "--blockdev", "driver=file,filename=$D/top.qcow2,node-name=topf",
    "--blockdev", "driver=qcow2,file=topf,node-name=top",
]  # fmt: skip


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def small_chain(d: Path) -> None:
    """A 1 MiB qcow2 base full of data under an empty overlay: the stream finishes at once."""
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "1M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 5 0 1M", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", f"{d}/base.qcow2",
         f"{d}/top.qcow2")  # fmt: skip


def verb(name: str) -> Cmd:
    if name.startswith("block-job-"):
        key = "id" if name in ("block-job-dismiss", "block-job-finalize") else "device"
        args: dict[str, Any] = {key: "j"}
        if name == "block-job-set-speed":
            args["speed"] = 0
        return Cmd(name, args)
    return Cmd(name, {"id": "j"})


# (verb, the status event after which it is sent, auto-dismiss)
CASES = [
    ("job-cancel", "waiting", True),
    ("job-cancel", "pending", True),
    ("block-job-cancel", "waiting", True),
    ("block-job-cancel", "pending", True),
    ("job-pause", "pending", True),
    ("job-dismiss", "pending", True),
    ("block-job-set-speed", "waiting", True),
    ("job-cancel", "pending", False),
    ("job-dismiss", "pending", False),
    ("block-job-cancel", "waiting", False),
]


@pytest.mark.parametrize(("name", "after", "auto_dismiss"), CASES)
def test_verb_racing_stream_finish(
    compat: Compat, name: str, after: str, auto_dismiss: bool
) -> None:
    # created, running, waiting, pending: the verb follows the `after` one.
    n_before = ["created", "running", "waiting", "pending"].index(after) + 1
    stream = {"device": "top", "job-id": "j", "auto-dismiss": auto_dismiss}
    compat.check_transcript(
        [
            Cmd("block-stream", stream),
            *[WaitEvent(STATUS) for _ in range(n_before)],
            verb(name),
            Cmd("query-jobs"),
            Cmd("job-dismiss", {"id": "j"}),
            Cmd("query-named-block-nodes", {"flat": True}),
        ],
        args=ARGS,
        setup=small_chain,
    )


def _mask_offsets(value: Any) -> Any:
    """BLOCK_JOB_CANCELLED's `offset`: how far the stream got before it saw the cancel
    depends on qsd's timers (it copied its first 512 KiB chunk in every run seen)."""
    if isinstance(value, dict):
        masked = {key: _mask_offsets(item) for key, item in value.items()}
        if masked.get("event") == "BLOCK_JOB_CANCELLED":
            masked["data"] = {**masked["data"], "offset": "<offset>"}
        return masked
    if isinstance(value, list):
        return [_mask_offsets(item) for item in value]
    return value


def test_cancel_in_the_same_write_as_the_stream(compat: Compat) -> None:
    """block-stream and job-cancel in one write: the cancel finds the job and cancels it."""
    both = [
        {"execute": "block-stream", "arguments": {"device": "top", "job-id": "j"}},
        {"execute": "job-cancel", "arguments": {"id": "j"}},
    ]
    result = compat.run_transcript(
        [
            Raw("".join(json.dumps(m) for m in both).encode() + b"\n"),
            # (qsd may still show the job running here: the cancel takes effect at its next
            # pause point, so the job is looked at only once it is gone.)
            WaitEvent("BLOCK_JOB_CANCELLED"),
            Cmd("query-jobs"),
            Cmd("job-cancel", {"id": "j"}),
        ],
        args=ARGS,
        setup=small_chain,
    )
    result.norm = {side: _mask_offsets(records) for side, records in result.norm.items()}
    result.assert_same()
