"""blkdebug rules run on the reference qsd and on ours; what an NBD client sees is compared.

Test ring (compat). One pair of daemons serves every scenario: each has its own image, node
stack and NBD export, and a script of reads, writes, zero writes, trims and flushes run by
nbdsh (libnbd) prints `ok` or the errno of each request. Which requests fail shows which
events fired when. Daemons are stopped by PID at teardown (Compat.close).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import SIDES, Compat, ours_missing_reason, reference_missing_reason
from tests.integration.daemon import DaemonProcess

pytestmark = pytest.mark.compat

NBD_PYTHON = "/usr/bin/python3"
Op = tuple[Any, ...]  # ("r"|"w"|"z"|"t", offset, length) or ("f",)


@dataclass(frozen=True)
class Scenario:
    name: str
    stack: str  # "raw": raw over blkdebug over file; "direct": blkdebug exported; "qcow2"
    ops: tuple[Op, ...]
    inject: tuple[dict[str, Any], ...] = ()
    set_state: tuple[dict[str, Any], ...] = field(default=())
    gap: str = ""  # why ours differs (the scenario is then a strict xfail)
    prefill: tuple[str, ...] = ()  # qemu-io commands run on a qcow2 image before the start


READ_SECTOR_8 = {"event": "read_aio", "sector": 8}
STATES = (
    {"event": "read_aio", "state": 1, "new_state": 2},
    {"event": "read_aio", "state": 2, "new_state": 3},
    {"event": "read_aio", "state": 1, "new_state": 4},  # the first declared rule wins
)
DATA = ("write -P 1 0 128k",)

SCENARIOS = [
    Scenario(
        "sector-and-default-iotypes",
        "raw",
        (("r", 0, 512), ("r", 4096, 512), ("r", 0, 8192), ("w", 4096, 512), ("w", 0, 512)),
        inject=(READ_SECTOR_8,),
    ),
    Scenario(
        "an-event-rearms-its-rules-only",
        "raw",
        (
            ("r", 0, 512),
            ("r", 4096, 512),
            ("w", 0, 512),
            ("w", 0, 512),
            ("w", 8192, 512),
            ("w", 4096, 512),
            ("r", 4096, 512),
        ),
        inject=(READ_SECTOR_8, {"event": "write_aio", "errno": 28, "once": True}),
    ),
    Scenario(
        "set-state-without-inject-keeps-armed-rules",
        "raw",
        (("r", 0, 512), ("w", 4096, 512)),
        inject=({"event": "read_aio", "sector": 8, "iotype": "write"},),
        set_state=({"event": "write_aio", "new_state": 2},),
    ),
    Scenario(
        "states",
        "raw",
        (("r", 0, 512), ("w", 0, 512), ("r", 0, 512), ("r", 0, 512), ("r", 0, 512)),
        inject=(
            {"event": "read_aio", "state": 2, "iotype": "write"},
            {"event": "read_aio", "state": 3},
            {"event": "read_aio", "state": 4, "errno": 28},
        ),
        set_state=STATES,
    ),
    Scenario(
        "immediately-still-checks-the-sector",
        "raw",
        (("r", 0, 512), ("r", 4096, 512)),
        inject=({**READ_SECTOR_8, "immediately": True},),
    ),
    Scenario(
        "errno-0-and-rule-order",
        "raw",
        (("r", 4096, 512), ("r", 0, 512)),
        inject=(
            {"event": "read_aio", "sector": 8, "errno": 0},
            {"event": "read_aio", "errno": 28},
            {"event": "read_aio", "errno": 5},
        ),
    ),
    Scenario(
        "generic-write-events",
        "raw",
        (("w", 0, 512), ("r", 0, 512), ("z", 0, 4096), ("w", 0, 512), ("t", 0, 4096)),
        inject=(
            {"event": "pwritev", "errno": 28, "once": True, "iotype": "write"},
            {"event": "read_aio", "state": 2, "iotype": "read"},
            {"event": "pwritev_zero", "iotype": "write-zeroes", "errno": 28, "once": True},
            {"event": "pwritev", "iotype": "discard"},
        ),
        set_state=({"event": "pwritev_done", "new_state": 2},),
    ),
    Scenario(
        "flush",
        "raw",
        (("f",), ("w", 0, 512), ("f",), ("f",), ("r", 0, 512), ("f",)),
        inject=({"event": "flush_to_disk", "iotype": "flush", "errno": 5},),
    ),
    Scenario(
        "flush-to-os",
        "raw",
        (("f",), ("w", 0, 512), ("f",)),
        inject=({"event": "flush_to_os", "iotype": "flush", "errno": 5},),
    ),
    Scenario(
        "direct-read",
        "direct",
        (("r", 0, 512), ("r", 4096, 512), ("w", 4096, 512)),
        inject=(READ_SECTOR_8,),
    ),
    Scenario(
        "direct-flush",
        "direct",
        (("w", 0, 512), ("f",), ("w", 0, 512), ("f",)),
        inject=({"event": "flush_to_disk", "iotype": "flush"},),
    ),
    Scenario(
        "direct-pwritev",
        "direct",
        (("w", 0, 512), ("w", 0, 512), ("r", 0, 512)),
        inject=({"event": "pwritev", "errno": 28, "once": True},),
    ),
    Scenario(
        "qcow2-cluster-alloc",
        "qcow2",
        (("r", 0, 512), ("w", 0, 512), ("w", 0, 512), ("w", 1 << 20, 512)),
        inject=({"event": "cluster_alloc", "iotype": "write", "errno": 28},),
    ),
    Scenario(
        "qcow2-read-aio",
        "qcow2",
        (("r", 1 << 20, 4096), ("r", 4096, 512), ("w", 0, 512), ("r", 1 << 20, 512)),
        inject=({"event": "read_aio", "iotype": "read", "errno": 28},),
        prefill=DATA,
    ),
    Scenario(
        "qcow2-l2-load",
        "qcow2",
        (("r", 0, 512), ("r", 4096, 512), ("w", 1 << 20, 512), ("r", 0, 512)),
        inject=({"event": "l2_load", "errno": 28, "once": True},),
        prefill=DATA,
    ),
    Scenario(
        "qcow2-write-aio-once",
        "qcow2",
        (("w", 0, 512), ("w", 0, 512), ("w", 1 << 20, 4096), ("r", 0, 512)),
        inject=({"event": "write_aio", "errno": 28, "once": True},),
    ),
    Scenario(
        "qcow2-new-l2-table",
        "qcow2",
        (("w", 0, 512), ("w", 65536, 512), ("r", 0, 512)),
        inject=({"event": "l2_alloc_write", "iotype": "write", "errno": 28, "once": True},),
    ),
    Scenario(
        "qcow2-refblock-events",
        "qcow2",
        (("w", 0, 512), ("w", 1 << 20, 512), ("w", 2 << 20, 512)),
        inject=({"event": "refblock_load", "state": 2, "iotype": "write", "errno": 28},),
        set_state=({"event": "l1_update", "new_state": 2},),
    ),
    Scenario(
        "qcow2-cluster-alloc-space",
        "qcow2",
        (("w", 0, 512), ("w", 0, 65536), ("w", 1 << 20, 65536), ("w", 2 << 20, 4096)),
        inject=({"event": "cluster_alloc_space", "iotype": "write", "errno": 28, "once": True},),
    ),
    Scenario(
        # The zero-fill of a new cluster around a partial write is a write-zeroes request
        # (qsd on tmpfs and ext4 alike); a failing one fails the guest write.
        "qcow2-pwritev-zero",
        "qcow2",
        (("w", 0, 512), ("w", 0, 65536), ("w", 1 << 20, 4096), ("w", 2 << 20, 65536)),
        inject=({"event": "pwritev_zero", "iotype": "write-zeroes", "errno": 28, "once": True},),
    ),
    Scenario(
        # Whole-cluster writes zero-fill nothing; a zero-fill arms the rule for the data.
        "qcow2-pwritev-zero-arms",
        "qcow2",
        (("w", 65536, 65536), ("r", 65536, 512), ("w", 3 << 20, 512), ("r", 65536, 512)),
        inject=({"event": "pwritev_zero", "errno": 28},),
    ),
    Scenario(
        "qcow2-compressed-read",
        "qcow2",
        (("r", 0, 512), ("r", 1 << 20, 512), ("r", 65536, 512)),
        inject=({"event": "read_compressed", "iotype": "read", "errno": 28},),
        prefill=("write -c 0 64k", "write -P 1 64k 64k"),
    ),
    Scenario(
        "qcow2-flush",
        "qcow2",
        (("w", 0, 512), ("f",), ("f",), ("w", 0, 512), ("f",)),
        inject=({"event": "flush_to_disk", "iotype": "flush", "errno": 5},),
    ),
]


def _blockdev(index: int, scenario: Scenario) -> dict[str, Any]:
    image_name = f"s{index}.qcow2" if scenario.stack == "qcow2" else f"s{index}.raw"
    blkdebug: dict[str, Any] = {
        "driver": "blkdebug",
        "image": {"driver": "file", "filename": f"$D/{image_name}"},
    }
    if scenario.inject:
        blkdebug["inject-error"] = list(scenario.inject)
    if scenario.set_state:
        blkdebug["set-state"] = list(scenario.set_state)
    if scenario.stack == "direct":
        top = {**blkdebug, "node-name": f"n{index}"}
    else:
        top = {"driver": scenario.stack, "node-name": f"n{index}", "file": blkdebug}
    # Trims reach the nodes only with discard=unmap (inherited by the children).
    return {**top, "discard": "unmap"}


def _setup(d: Path) -> None:
    for index, scenario in enumerate(SCENARIOS):
        if scenario.stack == "qcow2":
            image = str(d / f"s{index}.qcow2")
            subprocess.run(
                ["qemu-img", "create", "-f", "qcow2", image, "4M"], check=True, capture_output=True
            )
            if scenario.prefill:
                command = ["qemu-io", "-f", "qcow2", image]
                for line in scenario.prefill:
                    command += ["-c", line]
                subprocess.run(command, check=True, capture_output=True)
        else:
            # Data everywhere: NBD servers answer reads of holes without reading.
            (d / f"s{index}.raw").write_bytes(b"\1" * (1 << 20))


# Simple replies: with structured replies qsd 7.2 drops the connection after a failed read
# (the client sees ENOTCONN), which would hide every later request of a scenario.
_NBDSH_SCRIPT = """
import json
import nbd
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(URI)
for op in json.loads(OPS):
    try:
        if op[0] == "r":
            h.pread(op[2], op[1])
        elif op[0] == "w":
            h.pwrite(b"x" * op[2], op[1])
        elif op[0] == "z":
            h.zero(op[2], op[1])
        elif op[0] == "t":
            h.trim(op[2], op[1])
        else:
            h.flush()
        print("ok")
    except nbd.Error as err:
        print(err.errno)
"""


def _run_ops(daemon: DaemonProcess, index: int, ops: tuple[Op, ...]) -> list[str]:
    uri = f"nbd+unix:///n{index}?socket={daemon.workdir / 'nbd.sock'}"
    script = f"OPS = {json.dumps(ops)!r}\nURI = {uri!r}\n{_NBDSH_SCRIPT}"
    # As nbdsh does: the system interpreter holds libnbd's Python bindings.
    done = subprocess.run(
        [NBD_PYTHON, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.fixture(scope="module")
def pair() -> Iterator[dict[str, DaemonProcess]]:
    reason = reference_missing_reason() or ours_missing_reason()
    probe = subprocess.run([NBD_PYTHON, "-c", "import nbd"], capture_output=True)
    if reason is None and probe.returncode:
        reason = f"libnbd's Python bindings are not importable by {NBD_PYTHON}"
    if reason is not None:
        pytest.skip(reason)
    args: list[str] = []
    for index, scenario in enumerate(SCENARIOS):
        args += ["--blockdev", json.dumps(_blockdev(index, scenario))]
    args += ["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"]
    for index in range(len(SCENARIOS)):
        args += ["--export", f"type=nbd,id=e{index},node-name=n{index},writable=on"]
    driver = Compat()
    try:
        yield driver.daemons(args, setup=_setup)
    finally:
        driver.close()


def _params() -> list[Any]:
    params = []
    for index, scenario in enumerate(SCENARIOS):
        marks = [pytest.mark.xfail(strict=True, reason=scenario.gap)] if scenario.gap else []
        params.append(pytest.param(index, id=scenario.name, marks=marks))
    return params


@pytest.mark.parametrize("index", _params())
def test_blkdebug_scenario(pair: dict[str, DaemonProcess], index: int) -> None:
    scenario = SCENARIOS[index]
    outcomes = {side: _run_ops(pair[side], index, scenario.ops) for side in SIDES}
    assert len(outcomes["reference"]) == len(scenario.ops), outcomes
    assert outcomes["ours"] == outcomes["reference"]
    # A scenario where nothing fails on the reference proves little, unless that is its point.
    assert scenario.stack == "direct" or set(outcomes["reference"]) != {"ok"}
