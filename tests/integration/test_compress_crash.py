"""kill -9 of our daemon while an NBD client writes through a `compress` filter over qcow2.

Integration ring. A libnbd client (system python3, python3-libnbd) writes whole clusters of
partly compressible data (so streams share host clusters and spill across them) to distinct
clusters in a shuffled order, flushes every few writes and prints what each completed flush
covered. After a varying number of flushes the daemon is killed with SIGKILL (by PID). Then
`qemu-img check` must find no corruption (exit 0, or 3 for leaks) and every cluster
acknowledged before a completed flush must read back as written.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess, ours_command

SYSTEM_PYTHON = "/usr/bin/python3"
pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None
    or subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode != 0,
    reason="qemu-img or python3-libnbd missing",
)

ITERATIONS = 6
CLUSTER = 64 * 1024
CLUSTERS = 96

# argv: socket, seed. Prints "F c,c,..." after each completed flush.
CLIENT = r"""
import random, sys, nbd
sock, seed = sys.argv[1], int(sys.argv[2])
CS = 65536
def data(c):
    rng = random.Random(seed * 100003 + c)
    noise = rng.randrange(CS // 8, CS * 9 // 10)
    return rng.randbytes(noise) + bytes([c % 251 + 1]) * (CS - noise)
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///disk0?socket={sock}")
clusters = list(range(h.get_size() // CS))
random.Random(seed).shuffle(clusters)
pending = []
for n, c in enumerate(clusters):
    h.pwrite(data(c), c * CS)
    pending.append(c)
    if n % 6 == 5:
        h.flush()
        print("F " + ",".join(map(str, pending)), flush=True)
        pending = []
"""


def expected(cluster: int, seed: int) -> bytes:
    rng = random.Random(seed * 100003 + cluster)
    noise = rng.randrange(CLUSTER // 8, CLUSTER * 9 // 10)
    return rng.randbytes(noise) + bytes([cluster % 251 + 1]) * (CLUSTER - noise)


def one_crash(workdir: Path, iteration: int) -> tuple[int, int, str]:
    """(qemu-img check exit code, flushed clusters verified, check output)."""
    workdir.mkdir()
    image = workdir / "crash.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(CLUSTERS * CLUSTER)],
        check=True,
    )
    sock = workdir / "nbd.sock"
    args = [
        "--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={image}",
        "--blockdev", "driver=compress,node-name=disk0,file=q",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on",
    ]  # fmt: skip
    daemon = DaemonProcess(ours_command(), args, workdir, monitor="none").start()
    flushed: set[int] = set()
    seed = 500 + iteration
    try:
        assert daemon.wait_ready(20), daemon.stderr
        client = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", CLIENT, str(sock), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            wanted = 2 + iteration % 5
            assert client.stdout is not None
            for seen, line in enumerate(client.stdout, 1):
                flushed.update(int(c) for c in line[2:].strip().split(",") if c)
                if seen >= wanted:
                    os.kill(daemon.pid, signal.SIGKILL)
                    break
            for line in client.stdout:  # flushes that completed before the kill landed
                flushed.update(int(c) for c in line[2:].strip().split(",") if c)
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
        for cluster in sorted(flushed):
            f.seek(cluster * CLUSTER)
            if f.read(CLUSTER) != expected(cluster, seed):
                lost += 1
    assert lost == 0, f"iteration {iteration}: {lost} flushed clusters lost"
    return check.returncode, len(flushed), check.stdout + check.stderr


def test_kill9_during_compressed_writes(tmp_path: Path) -> None:
    results = [one_crash(tmp_path / f"it{i}", i) for i in range(ITERATIONS)]
    corrupt = [(i, out) for i, (rc, _, out) in enumerate(results) if rc not in (0, 3)]
    assert not corrupt, corrupt
    # Every image holds compressed clusters ("N.NN% compressed clusters", never 0.00%).
    assert not [out for _, _, out in results if re.search(r"(?<![\d.])0\.00% compressed", out)]
    assert sum(n for _, n, _ in results) >= ITERATIONS * 12  # two flushes each at least
