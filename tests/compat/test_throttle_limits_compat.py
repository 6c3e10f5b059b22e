"""Live throttle-group limit changes with requests queued, on the reference qsd and on ours.

Test ring (compat). An NBD client's read waits in a throttle group for a timer ~6 s away; the
limits change by `qom-set` (lifted, or lowered). In qsd the armed timer keeps its deadline:
the queued read, and one sent after the change, wait for it; the new limits time only what
comes after. Observed as order with margins of seconds, not as durations. Both sides run at
once; every daemon and client process is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Compat, diff_text
from tests.integration.daemon import DaemonProcess

pytestmark = pytest.mark.compat

SYSTEM_PYTHON = "/usr/bin/python3"
# 1 KiB/s of reads: after the first read (8 KiB, let through: the buckets are empty) the next
# one waits (8192 - 102.4) / 1024 = 7.9 s. Export f0 (unthrottled) is for a warm-up read, so
# that a first request slow to complete cannot eat the margins.
ARGS = [
    "--object",
    "throttle-group,id=tg0,x-bps-read=1024",
    "--blockdev",
    "driver=file,node-name=f0,filename=$D/img.raw",
    "--blockdev",
    "driver=throttle,node-name=th,throttle-group=tg0,file=f0",
    "--nbd-server",
    "addr.type=unix,addr.path=$D/nbd.sock",
    "--export",
    "type=nbd,id=e,node-name=th,name=th",
    "--export",
    "type=nbd,id=e0,node-name=f0,name=f0",
]
STILL_QUEUED = 1.5  # seconds after the change (the old deadline is ~7.9 s after R1)
RELEASED = 20.0  # seconds: the old deadline, with a wide margin

# Run by the system python (libnbd's bindings). A warm-up read on f0; then sends R1 (8 KiB) and R2 (4 KiB) at once;
# "first" once R1 is done (R2 then waits in the group); on a line from stdin (the limits have
# changed) sends R3 (4 KiB); then prints each of R2, R3 as it completes.
NBD_READER = """
import sys
import nbd
warm = nbd.NBD()
warm.connect_uri(sys.argv[1].replace("/th?", "/f0?"))
warm.pread(65536, 0)
warm.shutdown()
h = nbd.NBD()
h.connect_uri(sys.argv[1])
first = h.aio_pread(nbd.Buffer(8192), 0)
pending = {"R2": h.aio_pread(nbd.Buffer(4096), 0)}
while not h.aio_command_completed(first):
    h.poll(-1)
print("first", flush=True)
sys.stdin.readline()
pending["R3"] = h.aio_pread(nbd.Buffer(4096), 0)
while pending:
    h.poll(-1)
    for name, cookie in list(pending.items()):
        if h.aio_command_completed(cookie):
            print(name, flush=True)
            del pending[name]
h.shutdown()
"""


def _image(d: Path) -> None:
    # Data, not a hole: a sparse read would be answered from block status, unthrottled.
    (d / "img.raw").write_bytes(b"\1" * (1 << 20))


def _libnbd_missing() -> bool:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30)
    return probe.returncode != 0


class Reader:
    """The NBD reader process, its output read line by line with timeouts."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stdin is not None
        self.proc = proc
        self._fd = proc.stdout.fileno()
        self._buffer = b""

    def line(self, timeout: float) -> str | None:
        """The next line, or None if none comes within `timeout` seconds (or at EOF)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                return None
            chunk = os.read(self._fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def go_on(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()


@contextlib.contextmanager
def _reader(daemon: DaemonProcess) -> Iterator[Reader]:
    """The reader on the export; yields once R1 is done. Killed by PID."""
    url = f"nbd+unix:///th?socket={daemon.workdir}/nbd.sock"
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", NBD_READER, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
    )
    try:
        reader = Reader(proc)
        assert reader.line(20) == "first", "the first read never completed"
        yield reader
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def _side(compat: Compat, daemon: DaemonProcess, limits: dict[str, int]) -> dict[str, Any]:
    client = compat.connect(daemon)
    client.timeout = 30
    client.negotiate()
    out: dict[str, Any] = {}
    with _reader(daemon) as reader:
        args = {"path": "/objects/tg0", "property": "limits", "value": limits}
        out["qom-set"] = client.cmd("qom-set", args)
        reader.go_on()
        early = reader.line(STILL_QUEUED)
        out["completed within a second and a half"] = early
        first = early if early is not None else reader.line(RELEASED)
        # Lifted, the other read follows at once; lowered (64 B/s), it waits near a minute.
        after = reader.line(3.0)
        out["completed by the old deadline"] = sorted(x for x in (first, after) if x)
    out["limits"] = client.cmd("qom-get", {"path": "/objects/tg0", "property": "x-bps-read"})
    return out


@pytest.mark.parametrize("bps_read", [0, 1_000_000, 64])
def test_queued_reads_wait_for_the_armed_timer(compat: Compat, bps_read: int) -> None:
    if _libnbd_missing():
        pytest.skip("libnbd's python bindings are not installed")
    pair = compat.daemons(ARGS, setup=_image)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            side: pool.submit(_side, compat, daemon, {"bps-read": bps_read})
            for side, daemon in pair.items()
        }
        records = {side: future.result() for side, future in futures.items()}
    ref, ours = records["reference"], records["ours"]
    assert ref == ours, diff_text([ref], [ours])
    # What qsd shows: nothing goes before the old deadline, whatever the new limits; lifted,
    # the read sent after the change goes with the queued one; lowered, it stays queued.
    assert ref["completed within a second and a half"] is None
    assert ref["completed by the old deadline"] == (["R2"] if bps_read == 64 else ["R2", "R3"])
    assert ref["limits"] == {"return": bps_read}
