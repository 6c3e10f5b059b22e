"""kill -9 of our daemon while an NBD client writes and flushes a qcow2 image, many times.

Integration ring. A small libnbd client (system python3, python3-libnbd) writes patterned
blocks to distinct offsets (deterministic seed), flushes every few writes and prints what each
completed flush covered. After it reported a given number of flushes the daemon is killed with
SIGKILL (by PID). Then: `qemu-img check` must find no corruption (exit 0, or 3 for leaks) and
every block acknowledged before a completed flush must read back with its pattern.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess, ours_command

SYSTEM_PYTHON = "/usr/bin/python3"
pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None
    or subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode != 0,
    reason="qemu-img or python3-libnbd missing",
)

ITERATIONS = 20
SIZE = 32 << 20
BLOCK = 4096

# Runs under the system python (libnbd's binding). argv: socket, seed. Prints "F off,off,..."
# after each completed flush, listing the blocks written since the previous flush.
CLIENT = r"""
import random, sys, nbd
sock, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///disk0?socket={sock}")
blocks = list(range(h.get_size() // 4096))
rng.shuffle(blocks)
pending = []
for n, block in enumerate(blocks):
    count = 3 if n % 7 == 0 and block + 3 <= len(blocks) else 1
    data = b"".join(((block + i) * 2654435761 % (1 << 32) ^ seed).to_bytes(4, "big") * 1024
                    for i in range(count))
    h.pwrite(data, block * 4096)
    pending.extend(range(block, block + count))
    if n % 16 == 15:
        h.flush()
        print("F " + ",".join(map(str, pending)), flush=True)
        pending = []
"""


def pattern(block: int, seed: int) -> bytes:
    return ((block * 2654435761 % (1 << 32)) ^ seed).to_bytes(4, "big") * 1024


def one_crash(workdir: Path, iteration: int) -> tuple[int, int, str]:
    """Returns (qemu-img check exit code, flushed blocks verified, check output)."""
    workdir.mkdir()
    image = workdir / "crash.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    sock = workdir / "nbd.sock"
    args = [
        "--blockdev", f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on",
    ]  # fmt: skip
    daemon = DaemonProcess(ours_command(), args, workdir, monitor="none").start()
    flushed: set[int] = set()
    seed = 1000 + iteration
    try:
        assert daemon.wait_ready(20), daemon.stderr
        client = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", CLIENT, str(sock), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            wanted = 2 + iteration % 6  # crash after a varying number of completed flushes
            assert client.stdout is not None
            for seen, line in enumerate(client.stdout, 1):
                flushed.update(int(b) for b in line[2:].strip().split(",") if b)
                if seen >= wanted:
                    os.kill(daemon.pid, signal.SIGKILL)
                    break
            for line in client.stdout:  # flushes that completed before the kill landed
                flushed.update(int(b) for b in line[2:].strip().split(",") if b)
        finally:
            if client.poll() is None:
                client.kill()
            client.wait(timeout=10)
            if client.stdout is not None:
                client.stdout.close()
        daemon.wait_exit(10)
    finally:
        daemon.stop()
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    raw = workdir / "crash.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    lost = 0
    with open(raw, "rb") as f:
        for block in sorted(flushed):
            f.seek(block * BLOCK)
            if f.read(BLOCK) != pattern(block, seed):
                lost += 1
    assert lost == 0, f"iteration {iteration}: {lost} flushed blocks lost"
    return check.returncode, len(flushed), check.stdout + check.stderr


def test_kill9_during_flushed_writes(tmp_path: Path) -> None:
    results = [one_crash(tmp_path / f"it{i}", i) for i in range(ITERATIONS)]
    corrupt = [(i, out) for i, (rc, _, out) in enumerate(results) if rc not in (0, 3)]
    verified = sum(n for _, n, _ in results)
    leaks = sum(1 for rc, _, _ in results if rc == 3)
    print(
        f"{ITERATIONS} crashes, {verified} flushed blocks verified, {leaks} images with leaks",
        file=sys.stderr,
    )
    assert not corrupt, corrupt
    assert verified > ITERATIONS * 16  # every iteration got past at least two flushes
