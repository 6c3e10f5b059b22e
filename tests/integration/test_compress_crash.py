"""kill -9 of our daemon while an NBD client writes through a `compress` filter over qcow2.

Integration ring. A libnbd client (system python3, python3-libnbd) writes whole clusters of
partly compressible data (so streams share host clusters and spill across them) to distinct
clusters in a shuffled order, flushes every few writes and prints what each completed flush
covered. After a varying number of flushes the daemon is killed with SIGKILL (by PID). Then
`qemu-img check` must find no corruption (exit 0, or 3 for leaks) and every cluster
acknowledged before a completed flush must read back as written.
"""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

from tests.integration.crash import check_and_verify, crash_once, nbd_args, needs_libnbd

pytestmark = needs_libnbd

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
    args = nbd_args(
        workdir / "nbd.sock",
        f"driver=qcow2,node-name=q,file.driver=file,file.filename={image}",
        "driver=compress,node-name=disk0,file=q",
    )
    seed = 500 + iteration
    flushed = crash_once(workdir, args, CLIENT, seed, kill_after=2 + iteration % 5)
    rc, out = check_and_verify(image, flushed, CLUSTER, lambda c: expected(c, seed))
    return rc, len(flushed), out


def test_kill9_during_compressed_writes(tmp_path: Path) -> None:
    results = [one_crash(tmp_path / f"it{i}", i) for i in range(ITERATIONS)]
    corrupt = [(i, out) for i, (rc, _, out) in enumerate(results) if rc not in (0, 3)]
    assert not corrupt, corrupt
    # Every image holds compressed clusters ("N.NN% compressed clusters", never 0.00%).
    assert not [out for _, _, out in results if re.search(r"(?<![\d.])0\.00% compressed", out)]
    assert sum(n for _, n, _ in results) >= ITERATIONS * 12  # two flushes each at least
