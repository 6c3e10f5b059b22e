"""kill -9 of our daemon in the middle of blockdev-snapshot-internal-sync on a qcow2 image.

Integration ring. The image is full (4 KiB clusters, so the create has thousands of refcounts
to raise); the kill lands once the image file has grown by two clusters (the snapshot's copy
of L1, then the new snapshot table: the raised refcounts are stable, the header may not name
the table yet), observed by polling the file size, then SIGKILL by PID. Then `qemu-img check`
may find leaks (it does, typically every cluster) but no corruption, the active data is intact,
and a snapshot that made it into the table holds the same data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.integration.daemon import DaemonProcess, ours_command

SIZE = 32 << 20


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_kill_during_create_leaves_at_most_leaks(scratch: Path) -> None:
    image = scratch / "img.qcow2"
    assert _run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", str(image),
                str(SIZE)).returncode == 0  # fmt: skip
    assert _run("qemu-io", "-c", f"write -P 0x5a 0 {SIZE}", str(image)).returncode == 0
    before = image.stat().st_size
    args = [
        "--blockdev", f"driver=file,filename={image},node-name=f0",
        "--blockdev", "driver=qcow2,file=f0,node-name=q0",
    ]  # fmt: skip
    daemon = DaemonProcess(ours_command(), args, scratch / "d").start()
    grew = False
    try:
        assert daemon.wait_ready(20), daemon.stderr
        client = daemon.connect_qmp()
        client.negotiate()
        client.send_json(
            {
                "execute": "blockdev-snapshot-internal-sync",
                "arguments": {"device": "q0", "name": "s1"},
            }
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # observation of the file, not synchronisation
            if image.stat().st_size >= before + 2 * 4096:
                grew = True
                break
            time.sleep(0.0005)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait_exit(10)
        client.close()
    finally:
        daemon.stop()
    assert grew, "the create never wrote its L1 copy"
    check = _run("qemu-img", "check", str(image))
    assert check.returncode in (0, 3), check.stdout + check.stderr
    assert "ERROR" not in check.stdout + check.stderr
    listing = _run("qemu-img", "snapshot", "-l", str(image)).stdout
    images: list[tuple[str, list[str]]] = [("active", [])]
    if "s1" in listing:
        images.append(("s1", ["-l", "snapshot.name=s1"]))
    for name, opts in images:
        raw = scratch / f"{name}.raw"
        assert _run("qemu-img", "convert", *opts, "-O", "raw", str(image),
                    str(raw)).returncode == 0  # fmt: skip
        with open(raw, "rb") as f:
            while chunk := f.read(1 << 20):
                assert chunk == b"\x5a" * len(chunk), name
