"""x-blockdev-amend and x-blockdev-change, run on the reference qsd and on ours; replies,
job states and events compared live (tests/compat/harness.py normalises the rest).

Test ring (compat). Each test starts a fresh pair of daemons, stopped by PID at teardown.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, ExpectEof, WaitEvent, all_of, raw_image

pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing"),
]

STATUS = "JOB_STATUS_CHANGE"


def qcow2_image(d: Path) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(d / "img.qcow2"), "1M"],
        check=True,
        timeout=30,
    )


NODES = [
    "--blockdev", "driver=file,filename=$D/img.qcow2,node-name=qf",
    "--blockdev", "driver=qcow2,file=qf,node-name=q",
    "--blockdev", "driver=file,filename=$D/img.raw,node-name=rf",
    "--blockdev", "driver=raw,file=rf,node-name=r",
]  # fmt: skip
SETUP = all_of(qcow2_image, raw_image())


def amend(job_id: str, node: str, options: dict[str, Any], **extra: Any) -> Cmd:
    return Cmd(
        "x-blockdev-amend", {"job-id": job_id, "node-name": node, "options": options, **extra}
    )


def statuses(n: int) -> list[WaitEvent]:
    return [WaitEvent(STATUS) for _ in range(n)]


def test_amend_qcow2_job_life_cycle(compat: Compat) -> None:
    luks = {"format": "luks", "state": "active", "new-secret": "s"}
    compat.check_transcript(
        [
            amend("a0", "q", {"driver": "qcow2"}),
            *statuses(5),  # created, running, waiting, pending, concluded
            Cmd("query-jobs"),
            Cmd("query-block-jobs"),
            amend("a0", "q", {"driver": "qcow2"}),  # the id is still in use
            Cmd("job-dismiss", {"id": "a0"}),
            WaitEvent(STATUS),  # null
            amend("a1", "q", {"driver": "qcow2", "encrypt": luks}),
            *statuses(4),  # created, running, aborting, concluded
            Cmd("query-jobs"),
            Cmd("job-dismiss", {"id": "a1"}),
            WaitEvent(STATUS),
            amend("a2", "q", {"driver": "qcow2", "encrypt": {"format": "qcow"}}, force=True),
            *statuses(4),
            Cmd("query-jobs"),
            Cmd("job-dismiss", {"id": "a2"}),
            WaitEvent(STATUS),
            amend("a3", "q", {"driver": "qcow2"}, force=False),
            *statuses(5),
            Cmd("query-jobs"),
            Cmd("job-dismiss", {"id": "a3"}),
            WaitEvent(STATUS),
            Cmd("query-jobs"),
            amend("a4", "q", {"driver": "qcow2"}),
            *statuses(5),
            Cmd("quit"),  # the concluded job is dismissed on the way out
            ExpectEof(),
        ],
        args=NODES,
        setup=SETUP,
    )


def test_amend_refused_before_the_job(compat: Compat) -> None:
    compat.check_transcript(
        [
            amend("j", "r", {"driver": "raw"}),
            amend("j", "rf", {"driver": "file"}),
            amend("j", "nope", {"driver": "qcow2"}),
            amend("j", "", {"driver": "qcow2"}),
            amend("j", "q", {"driver": "raw"}),
            amend("j", "r", {"driver": "qcow2"}),
            amend("j", "q", {"driver": "luks", "state": "active"}),
            amend("j", "r", {"driver": "luks", "state": "inactive", "keyslot": 1}),
            amend("j", "q", {"driver": "vmdk"}),
            amend("1x", "q", {"driver": "qcow2"}),
            amend("", "q", {"driver": "qcow2"}),
            amend("1x", "r", {"driver": "raw"}),  # the driver is checked before the id
            amend("1x", "q", {"driver": "raw"}),
            amend("j", "q", {"driver": "luks"}),  # 'state' is mandatory
            amend("j", "q", {"driver": "qcow2", "encrypt": {"format": "aes"}}),
            amend("j", "q", {"driver": "qcow2", "bogus": 1}),
            amend("j", "q", {"driver": "nosuch"}),
            Cmd("x-blockdev-amend", {"job-id": "j", "node-name": "q"}),
            Cmd("query-jobs"),
        ],
        args=NODES,
        setup=SETUP,
    )


def test_change_always_refused(compat: Compat) -> None:
    compat.check_transcript(
        [
            Cmd("x-blockdev-change", {"parent": "nope"}),
            Cmd("x-blockdev-change", {"parent": "nope", "node": "nope"}),
            Cmd("x-blockdev-change", {"parent": "nope", "child": "x", "node": "r"}),
            Cmd("x-blockdev-change", {"parent": ""}),
            Cmd("x-blockdev-change", {"parent": "q"}),
            Cmd("x-blockdev-change", {"parent": "q", "child": "x", "node": "r"}),
            Cmd("x-blockdev-change", {"parent": "q", "child": "x"}),
            Cmd("x-blockdev-change", {"parent": "q", "child": "qf"}),
            Cmd("x-blockdev-change", {"parent": "rf", "child": "file"}),
            Cmd("x-blockdev-change", {"parent": "q", "child": "file"}),
            Cmd("x-blockdev-change", {"parent": "r", "child": "file"}),
            Cmd("x-blockdev-change", {"parent": "q", "child": "backing"}),
            Cmd("x-blockdev-change", {"parent": "q", "node": "nope"}),
            Cmd("x-blockdev-change", {"parent": "q", "node": "r"}),
            Cmd("x-blockdev-change", {"parent": "q", "node": "qf"}),
            Cmd("x-blockdev-change", {"parent": "rf", "node": "q"}),
            Cmd("x-blockdev-change", {"parent": "q", "child": 1}),
            Cmd("x-blockdev-change", {"child": "file"}),
            Cmd("query-named-block-nodes", {"flat": True}),
        ],
        args=NODES,
        setup=SETUP,
    )


def test_amend_job_ends_before_the_reply(compat: Compat) -> None:
    """qsd runs the whole amend job, up to CONCLUDED, before replying: the order of events
    and reply on the wire (which the transcript comparison does not look at) must match."""
    orders: dict[str, list[str]] = {}
    for side, daemon in compat.daemons(NODES, SETUP).items():
        qmp = compat.connect(daemon)
        qmp.send_json({"execute": "qmp_capabilities"})
        assert qmp.recv_reply() == {"return": {}}
        seen: list[str] = []
        for options in ({"driver": "qcow2"}, {"driver": "qcow2", "encrypt": {"format": "qcow"}}):
            qmp.send_json(
                {"execute": "x-blockdev-amend", "id": 1,
                 "arguments": {"job-id": "j", "node-name": "q", "options": options}}
            )  # fmt: skip
            while True:
                message = qmp.recv()
                if "event" in message:
                    seen.append(message["data"]["status"])
                    continue
                seen.append(f"reply {message}")
                break
            qmp.send_json({"execute": "job-dismiss", "arguments": {"id": "j"}})
            seen.append(f"event {qmp.recv()['data']['status']}")
            seen.append(f"reply {qmp.recv()}")
        orders[side] = seen
    assert orders["ours"] == orders["reference"]
    assert orders["ours"][:6] == [*("created", "running", "waiting", "pending", "concluded"),
                                  "reply {'return': {}, 'id': 1}"]  # fmt: skip


def test_amend_job_holds_its_node_until_dismissed(compat: Compat) -> None:
    """qsd's amend job keeps a reference to its node (no edge, no op blocker) until it is
    dismissed: blockdev-del refuses the node until then."""
    compat.check_transcript(
        [
            amend("a0", "q", {"driver": "qcow2"}),
            *statuses(5),
            Cmd("blockdev-del", {"node-name": "q"}),
            Cmd("job-dismiss", {"id": "a0"}),
            WaitEvent(STATUS),
            Cmd("blockdev-del", {"node-name": "q"}),
            Cmd("query-named-block-nodes", {"flat": True}, sort_by="node-name"),
        ],
        args=NODES,
        setup=SETUP,
    )
