"""Throttling and error injection seen by real NBD clients (fio, qemu-io) of our daemon.

Integration ring: the daemon runs as a subprocess exporting a throttle (or blkdebug) node;
fio's nbd engine measures the rate, qemu-io sees injected errors; live qom-set changes limits.
Every daemon is stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess, ours_command

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("fio", "qemu-io")), reason="fio/qemu-io not installed"
)

MiB = 1 << 20


@contextmanager
def daemon(workdir: Path, args: Sequence[str]) -> Iterator[DaemonProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = DaemonProcess(ours_command(), args, workdir).start()
    try:
        if not proc.wait_ready(20):
            raise AssertionError(f"daemon exited {proc.returncode}: {proc.stderr}")
        yield proc
    finally:
        proc.stop()


def throttled_export(sock: Path, bps: int) -> list[str]:
    # read-zeroes=off: a READ of a hole is answered from block status and never read (and so
    # never throttled), by qsd 7.2 and by ours alike; data extents go through the throttle.
    return [
        "--object",
        f"throttle-group,id=tg0,x-bps-read={bps}",
        "--blockdev",
        "driver=null-co,node-name=null0,size=1073741824,read-zeroes=off",
        "--blockdev",
        "driver=throttle,node-name=th,throttle-group=tg0,file=null0",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=e,node-name=th,name=th",
    ]


def test_fio_reader_held_to_group_rate(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    with daemon(tmp_path / "d", throttled_export(sock, MiB)):
        done = subprocess.run(
            [
                "fio",
                "--name=rate",
                "--ioengine=nbd",
                f"--uri=nbd+unix:///th?socket={sock}",
                "--rw=read",
                "--bs=64k",
                "--iodepth=4",
                "--size=512M",
                "--time_based",
                "--runtime=4",
                "--output-format=json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    report = json.loads(done.stdout[done.stdout.index("{") :])
    job = report["jobs"][0]
    assert job["error"] == 0
    rate = job["read"]["io_bytes"] / (job["read"]["runtime"] / 1000)
    # The bucket lets a tenth of a second's worth through at once: allow for it.
    assert 0.9 * MiB <= rate <= 1.1 * MiB + MiB / 10 / 4, rate


def test_live_qom_set_lifts_the_limit(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    with ExitStack() as stack:
        proc = stack.enter_context(daemon(tmp_path / "d", throttled_export(sock, 256 * 1024)))
        qmp = proc.connect_qmp()
        stack.callback(qmp.close)
        qmp.negotiate()
        # 4 MiB at 256 KiB/s would take about 16 s; lifted, well under a second.
        reader = subprocess.Popen(
            ["qemu-io", "-r", "-f", "raw", "-c", "read 0 4M", f"nbd+unix:///th?socket={sock}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            started = time.monotonic()
            reply = qmp.cmd(
                "qom-set", {"path": "/objects/tg0", "property": "limits", "value": {"bps-read": 0}}
            )
            assert reply == {"return": {}}
            out, err = reader.communicate(timeout=10)
            elapsed = time.monotonic() - started
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        assert "read 4194304/4194304 bytes" in out, err
        assert elapsed < 2.0
        reply = qmp.cmd("qom-get", {"path": "/objects/tg0", "property": "x-bps-read"})
        assert reply == {"return": 0}


def test_blkdebug_error_reaches_nbd_client(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    args = [
        "--blockdev",
        # raw over blkdebug: in qsd, raw raises read_aio on its child (blkdebug alone does not).
        json.dumps(
            {
                "driver": "raw",
                "node-name": "bd",
                "file": {
                    "driver": "blkdebug",
                    "image": {"driver": "null-co", "size": MiB, "read-zeroes": False},
                    "inject-error": [{"event": "read_aio", "sector": 8}],
                },
            }
        ),
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=e,node-name=bd,name=bd",
    ]
    with daemon(tmp_path / "d", args):
        done = subprocess.run(
            [
                "qemu-io",
                "-r",
                "-f",
                "raw",
                "-c",
                "read 0 512",
                "-c",
                "read 4096 512",
                f"nbd+unix:///bd?socket={sock}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert "read 512/512 bytes at offset 0" in done.stdout
    assert "read failed: Input/output error" in done.stdout + done.stderr
