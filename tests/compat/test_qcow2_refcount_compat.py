"""qcow2 refcounts pushed out of their range, on the reference qsd and on ours, compared live.

Compat ring. qsd treats a refcount that would overflow or fall below zero as EINVAL, not as
corruption: the operation fails (or, for a free, is logged and skipped), the node keeps
working and the image is never marked corrupt. Each side's image must pass `qemu-img check`
with nothing worse than leaks, and hold the same guest data. Daemons are stopped by PID.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Compat

pytestmark = pytest.mark.compat

FREE_FAILED = "qcow2_free_clusters failed: Invalid argument"


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _zero_refcount_of_guest_cluster_0(image: Path) -> None:
    """Make the refblock call guest cluster 0's host cluster free while L2 still maps it
    (16-bit refcounts, one L2 table and one refblock: what qemu-img creates by default)."""
    raw = bytearray(image.read_bytes())
    l1_offset, reftable_offset = struct.unpack_from(">QQ", raw, 40)
    l2_offset = struct.unpack_from(">Q", raw, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    host = struct.unpack_from(">Q", raw, l2_offset)[0] & 0x00FFFFFFFFFFFE00
    refblock = struct.unpack_from(">Q", raw, reftable_offset)[0]
    cluster_bits = struct.unpack_from(">I", raw, 20)[0]
    struct.pack_into(">H", raw, refblock + 2 * (host >> cluster_bits), 0)
    image.write_bytes(bytes(raw))


def make_images(d: Path) -> None:
    """rb1.qcow2: valid, refcount_bits=1 (a snapshot would need refcount 2); rb2.qcow2:
    valid, refcount_bits=2 and two snapshots, the first 8k rewritten after the first one (a
    third snapshot counts those clusters up to 3, then overflows on the others); rc0.qcow2:
    guest 0-64k written, its data cluster's refcount zeroed."""
    rb1, rb2, rc0 = f"{d}/rb1.qcow2", f"{d}/rb2.qcow2", f"{d}/rc0.qcow2"
    _run("qemu-img", "create", "-f", "qcow2", "-o", "refcount_bits=1,cluster_size=4k", rb1, "8M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", rb1)
    _run("qemu-img", "create", "-f", "qcow2", "-o", "refcount_bits=2,cluster_size=4k", rb2, "8M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", rb2)
    _run("qemu-img", "snapshot", "-c", "s1", rb2)
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 8k", rb2)
    _run("qemu-img", "snapshot", "-c", "s2", rb2)
    _run("qemu-img", "create", "-f", "qcow2", rc0, "8M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", rc0)
    _zero_refcount_of_guest_cluster_0(Path(rc0))


ARGS = [
    "--blockdev", "driver=file,filename=$D/rb1.qcow2,node-name=f0",
    "--blockdev", "driver=qcow2,file=f0,node-name=rb1",
    "--blockdev", "driver=file,filename=$D/rb2.qcow2,node-name=f2",
    "--blockdev", "driver=qcow2,file=f2,node-name=rb2",
    "--blockdev", "driver=file,filename=$D/rc0.qcow2,node-name=f1",
    "--blockdev", "driver=qcow2,file=f1,node-name=rc0,discard=unmap",
    "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock",
    "--export", "type=nbd,id=e0,node-name=rb1,writable=on",
    "--export", "type=nbd,id=e1,node-name=rc0,writable=on",
    "--export", "type=nbd,id=e2,node-name=rb2,writable=on",
]  # fmt: skip


def _qemu_io(workdir: Path, export: str, *commands: str) -> tuple[int, str]:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    url = f"nbd+unix:///{export}?socket={workdir}/nbd.sock"
    proc = subprocess.run([*argv, url], capture_output=True, text=True, timeout=60)
    failed = [line for line in proc.stdout.splitlines() if "failed" in line]
    return proc.returncode, "\n".join(failed)


def _check(image: Path) -> subprocess.CompletedProcess[str]:
    """`qemu-img check`; exit 0 (clean) or 3 (leaks only) are acceptable."""
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode in (0, 3), check.stdout + check.stderr
    assert "ERROR" not in check.stdout, check.stdout
    return check


def _corrupt_bit(image: Path) -> Any:
    info = _run("qemu-img", "info", "--output=json", "-U", str(image))
    return '"corrupt": true' in info


# (node, data pattern of each 4k block of guest 0-64k before the test writes 0x33 at 0)
OVERFLOWS = [("rb1", [0x11] * 16), ("rb2", [0x22] * 2 + [0x11] * 14)]


def _snapshot_names(image: Path) -> list[str]:
    out = _run("qemu-img", "snapshot", "-l", str(image))
    return [line.split()[1] for line in out.splitlines()[2:]]


@pytest.mark.parametrize(("node", "patterns"), OVERFLOWS)
def test_snapshot_refcount_overflow_fails_without_corruption(
    compat: Compat, node: str, patterns: list[int]
) -> None:
    """The snapshot fails with EINVAL (rb2: part way through counting), the node still
    serves I/O, a second try fails the same, and the image is neither marked corrupt nor
    left with anything worse than leaks."""
    pair = compat.daemons(ARGS, make_images)
    seen: dict[str, list[Any]] = {}
    reads = [f"read -P {p:#x} {i * 4}k 4k" for i, p in enumerate(patterns)][1:]
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        replies = [client.cmd("blockdev-snapshot-internal-sync", {"device": node, "name": "s"})]
        io = _qemu_io(daemon.workdir, node, "write -P 0x33 0 4k", "read -P 0x33 0 4k", *reads)
        replies.append(client.cmd("blockdev-snapshot-internal-sync", {"device": node, "name": "s"}))
        nodes = client.cmd("query-named-block-nodes", {"flat": True})["return"]
        daemon.stop()
        names = [e["event"] for e in client.events]
        image = daemon.workdir / f"{node}.qcow2"
        _check(image)
        seen[side] = [replies, io, sorted(n["node-name"] for n in nodes), names]
        seen[side] += [_corrupt_bit(image), _snapshot_names(image)]
    assert seen["reference"][0][0]["error"]["desc"] == (
        f"Failed to create snapshot 's' on device '{node}': Invalid argument"
    )
    assert seen["ours"] == seen["reference"]


def test_free_below_zero_is_logged_and_skipped(compat: Compat) -> None:
    """Discarding a cluster whose refcount is already 0: the free fails with qsd's line on
    stderr, the discard succeeds, the node keeps working, the image is not marked corrupt."""
    pair = compat.daemons(ARGS, make_images)
    seen: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        io = _qemu_io(daemon.workdir, "rc0", "discard 0 64k", "flush", "read -P 0 0 64k")
        io2 = _qemu_io(daemon.workdir, "rc0", "write -P 0x33 0 4k", "read -P 0x33 0 4k")
        client.cmd("query-version")  # events sent before this reply are collected
        daemon.stop()
        names = [e["event"] for e in client.events]
        image = daemon.workdir / "rc0.qcow2"
        _check(image)
        seen[side] = [io, io2, names, _corrupt_bit(image), daemon.stderr.count(FREE_FAILED)]
    assert seen["reference"][-1] == 1
    assert seen["ours"] == seen["reference"]


def _guest_data(image: Path) -> bytes:
    raw = image.with_suffix(".raw")
    _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    return raw.read_bytes()


def test_free_queued_on_refcount_0_cluster_never_takes_a_new_write(compat: Compat) -> None:
    """The discard's free of a refcount-0 cluster is applied later than qsd applies it; a
    write in between must not get that cluster (the late free would take its reference
    and punch a hole under acknowledged data)."""
    pair = compat.daemons(ARGS, make_images)
    seen: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        steps = ["discard 0 64k", "write -P 0x22 64k 4k", "read -P 0x22 64k 4k"]
        io = _qemu_io(daemon.workdir, "rc0", *steps, "flush", "read -P 0x22 64k 4k")
        client.cmd("query-version")  # events sent before this reply are collected
        daemon.stop()
        names = [e["event"] for e in client.events]
        image = daemon.workdir / "rc0.qcow2"
        assert io == (0, ""), (side, io)  # no "Pattern verification failed"
        _check(image)
        seen[side] = [names, _corrupt_bit(image), daemon.stderr.count(FREE_FAILED)]
        seen[side].append(_guest_data(image))
    assert seen["ours"] == seen["reference"]
