"""kill -9 of our daemon while an NBD client writes and flushes a qcow2 image, many times.

Integration ring. A small libnbd client (system python3, python3-libnbd) writes patterned
blocks to distinct offsets (deterministic seed), flushes every few writes and prints what each
completed flush covered. After it reported a given number of flushes the daemon is killed with
SIGKILL (by PID). Then: `qemu-img check` must find no corruption (exit 0, or 3 for leaks) and
every block acknowledged before a completed flush must read back with its pattern.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.crash import check_and_verify, crash_once, nbd_args, needs_libnbd

pytestmark = needs_libnbd

ITERATIONS = 20
SIZE = 32 << 20
BLOCK = 4096

# Runs under the system python (libnbd's binding). argv: socket, seed; BLOCK_SIZE is replaced
# by the block size. Prints "F off,off,..." after each completed flush, listing the blocks
# written since the previous flush.
CLIENT = r"""
import random, sys, nbd
sock, seed, size = sys.argv[1], int(sys.argv[2]), BLOCK_SIZE
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///disk0?socket={sock}")
blocks = list(range(h.get_size() // size))
rng.shuffle(blocks)
pending = []
for n, block in enumerate(blocks):
    count = 3 if n % 7 == 0 and block + 3 <= len(blocks) else 1
    data = b"".join(((block + i) * 2654435761 % (1 << 32) ^ seed).to_bytes(4, "big")
                    * (size // 4) for i in range(count))
    h.pwrite(data, block * size)
    pending.extend(range(block, block + count))
    if n % 16 == 15:
        h.flush()
        print("F " + ",".join(map(str, pending)), flush=True)
        pending = []
"""


def pattern(block: int, seed: int, size: int = BLOCK) -> bytes:
    return ((block * 2654435761 % (1 << 32)) ^ seed).to_bytes(4, "big") * (size // 4)


def one_crash(workdir: Path, iteration: int, size: int = BLOCK) -> tuple[int, int, str]:
    """Returns (qemu-img check exit code, flushed blocks verified, check output)."""
    workdir.mkdir()
    image = workdir / "crash.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    args = nbd_args(
        workdir / "nbd.sock",
        f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={image}",
    )
    seed = 1000 + iteration
    # crash after a varying number of completed flushes
    client = CLIENT.replace("BLOCK_SIZE", str(size))
    flushed = crash_once(workdir, args, client, seed, kill_after=2 + iteration % 6)
    rc, out = check_and_verify(image, flushed, size, lambda block: pattern(block, seed, size))
    return rc, len(flushed), out


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


def test_kill9_during_flushed_large_writes(tmp_path: Path) -> None:
    """96 KiB blocks (one and a half clusters: partial and whole new clusters), whose data
    is written outside the metadata lock, between reserving the clusters and linking them."""
    results = [one_crash(tmp_path / f"it{i}", i, 96 * 1024) for i in range(8)]
    corrupt = [(i, out) for i, (rc, _, out) in enumerate(results) if rc not in (0, 3)]
    assert not corrupt, corrupt
    assert sum(n for _, n, _ in results) > 8 * 16
