"""Small helpers of the job-over-NBD integration tests: tools run to completion, qemu-io
with pattern checks, QMP commands that must succeed, waiting for a job status.

Integration ring (subprocesses and the raw QMP client of tests/integration/daemon.py).
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

from tests.integration.daemon import RawQmp

needs_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-io", "qemu-img", "fio")),
    reason="qemu-io, qemu-img or fio missing",
)


def run(*argv: str, timeout: float = 120) -> str:
    """The tool's stdout; fails the test on a non-zero exit."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}: {result.stderr}{result.stdout}"
    return result.stdout


def qemu_io(target: str, fmt: str, *cmds: str) -> None:
    """qemu-io's commands on `target` (a file or an NBD URI); a failed `read -P` fails."""
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, target)
    assert "Pattern verification failed" not in out, out


def cmd(qmp: RawQmp, name: str, args: dict[str, Any] | None = None) -> Any:
    """The command's return value; fails the test on an error reply."""
    reply = qmp.cmd(name, args)
    assert "return" in reply, reply
    return reply["return"]


def wait_status(qmp: RawQmp, status: str) -> None:
    """Until a JOB_STATUS_CHANGE to `status` (60 s at most per event)."""
    while True:
        event = qmp.wait_event("JOB_STATUS_CHANGE", timeout=60)
        if event["data"]["status"] == status:
            return
