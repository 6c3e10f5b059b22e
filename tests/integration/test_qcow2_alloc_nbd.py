"""Concurrent NBD writes into the same fresh qcow2 clusters, against our daemon.

Integration ring. A libnbd client (system python3, python3-libnbd) submits many
non-overlapping writes at once (aio, up to 64 in flight) that share new clusters: pieces of
one cluster, runs of whole clusters beside partial ones, on tmpfs and on a plain directory
(writes through the file pool). Our allocating writes write data outside the metadata lock;
two writes into one new cluster must never allocate it twice. Checked: `qemu-img check`
finds nothing (no leak, no double reference), `qemu-img compare` with the expected data.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from tests.integration.crash import SYSTEM_PYTHON, nbd_args, needs_libnbd
from tests.integration.daemon import DaemonProcess, ours_command

pytestmark = needs_libnbd

CS = 64 * 1024
SIZE = 16 << 20

CLIENT = r"""
import json, sys, nbd
sock = sys.argv[1]
rounds = json.load(sys.stdin)
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///disk0?socket={sock}")
for pieces in rounds:
    cookies = []
    for offset, length, fill in pieces:
        while h.aio_in_flight() >= 64:
            h.poll(-1)
        buf = nbd.Buffer.from_bytearray(bytearray([fill]) * length)
        cookies.append(h.aio_pwrite(buf, offset))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in cookies:
        h.aio_command_completed(cookie)  # raises the request's error, if any
h.flush()
h.shutdown()
print("done")
"""


def make_rounds(seed: int) -> list[list[tuple[int, int, int]]]:
    """Per round, a region of fresh clusters cut into pieces (512 B up to a few clusters,
    cluster-aligned or not) submitted in random order: no two pieces of a round overlap,
    many share a cluster. Later rounds partly rewrite earlier regions (in place)."""
    rng = random.Random(seed)
    rounds: list[list[tuple[int, int, int]]] = []
    for number in range(12):
        start = rng.randrange(0, SIZE // CS - 40) * CS
        if number % 4 == 3:
            start = min(rounds[rng.randrange(len(rounds))])[0]  # a region written before
        end = start + rng.randrange(4, 32) * CS
        pieces: list[tuple[int, int, int]] = []
        pos = start
        while pos < end:
            length = min(end - pos, rng.choice([512, 4096, 3 * 4096, CS, 2 * CS + 4096, 5 * CS]))
            pieces.append((pos, length, rng.randrange(1, 256)))
            pos += length
        rng.shuffle(pieces)
        rounds.append(pieces)
    return rounds


@pytest.mark.parametrize("where", ["tmp", "shm"])
@pytest.mark.parametrize("seed", [7, 8])
def test_concurrent_writes_into_fresh_clusters(
    tmp_path: Path, shm_dir: Path, where: str, seed: int
) -> None:
    base = tmp_path if where == "tmp" else shm_dir
    image = base / f"fresh{seed}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    rounds = make_rounds(seed)
    model = bytearray(SIZE)
    for pieces in rounds:
        for offset, length, fill in pieces:
            model[offset : offset + length] = bytes([fill]) * length
    workdir = tmp_path / "d"
    sock = workdir / "nbd.sock"
    args = nbd_args(sock, f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={image}")
    daemon = DaemonProcess(ours_command(), args, workdir, monitor="none").start()
    try:
        assert daemon.wait_ready(20), daemon.stderr
        client = subprocess.run(
            [SYSTEM_PYTHON, "-c", CLIENT, str(sock)],
            input=json.dumps(rounds),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert client.returncode == 0 and client.stdout.strip() == "done", client.stderr
    finally:
        daemon.stop()
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors" in check.stdout, check.stdout + check.stderr
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(raw)],
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
