"""Shared harness of the kill -9 crash tests: write, flush, kill, then check and verify.

Integration ring. A libnbd client script (system python3, python3-libnbd) writes to an export
and prints "F u,u,..." after each completed flush, listing the units (blocks or clusters)
written since the previous one. After `kill_after` such lines the daemon gets SIGKILL (by PID).
Then `qemu-img check` runs and every unit acknowledged before a completed flush must read back
as `expected(unit)` from the image converted to raw.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess, ours_command

SYSTEM_PYTHON = "/usr/bin/python3"

needs_libnbd = pytest.mark.skipif(
    shutil.which("qemu-img") is None
    or subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode != 0,
    reason="qemu-img or python3-libnbd missing",
)


def _units(line: str) -> list[int]:
    return [int(u) for u in line[2:].strip().split(",") if u]


def crash_once(
    workdir: Path,
    daemon_args: list[str],
    client: str,
    seed: int,
    kill_after: int,
) -> set[int]:
    """Runs the daemon and the client, kills the daemon; returns the flushed units."""
    daemon = DaemonProcess(ours_command(), daemon_args, workdir, monitor="none").start()
    flushed: set[int] = set()
    sock = workdir / "nbd.sock"
    try:
        assert daemon.wait_ready(20), daemon.stderr
        proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", client, str(sock), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout is not None
            for seen, line in enumerate(proc.stdout, 1):
                flushed.update(_units(line))
                if seen >= kill_after:
                    os.kill(daemon.pid, signal.SIGKILL)
                    break
            for line in proc.stdout:  # flushes that completed before the kill landed
                flushed.update(_units(line))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        daemon.wait_exit(10)
    finally:
        daemon.stop()
    return flushed


def check_and_verify(
    image: Path, flushed: set[int], unit: int, expected: Callable[[int], bytes]
) -> tuple[int, str]:
    """qemu-img check's (exit code, output); asserts that no flushed unit was lost."""
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    raw = image.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    with open(raw, "rb") as f:
        lost = []
        for u in sorted(flushed):
            f.seek(u * unit)
            if f.read(unit) != expected(u):
                lost.append(u)
    assert not lost, f"{image}: {len(lost)} flushed units lost, first {lost[:5]}"
    return check.returncode, check.stdout + check.stderr


def nbd_args(sock: Path, *blockdevs: str) -> list[str]:
    """Command line: the given --blockdev values, a unix NBD server, a writable export disk0."""
    args: list[str] = []
    for spec in blockdevs:
        args += ["--blockdev", spec]
    return [
        *args,
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on",
    ]  # fmt: skip
