"""block-export-del with NBD clients connected, on the reference qsd and on ours: mode=safe
refuses; mode=hard disconnects the clients at once, frees the export's name, and leaves the
export listed as shutting down until the requests it had received (here writes held by a
throttle group) have completed; then BLOCK_EXPORT_DELETED, and the writes are on disk.
Test ring (compat); every daemon and client is stopped by PID at teardown.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.compat.harness import Compat, diff_text, normalise_transcript, raw_image
from tests.integration.daemon import DaemonProcess, RawQmp

pytestmark = pytest.mark.compat

ARGS = [
    # The first write passes at once, the second waits about two seconds in the group.
    "--object", "throttle-group,id=tg0,x-bps-write=2048",
    "--blockdev", "driver=file,filename=$D/a.raw,node-name=f0",
    "--blockdev", "driver=raw,file=f0,node-name=r0",
    "--blockdev", "driver=throttle,throttle-group=tg0,file=r0,node-name=thr",
    "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock",
    "--export", "type=nbd,id=e0,node-name=thr,name=r0,writable=on",
]  # fmt: skip

# Two writes in flight, then a read (not throttled) whose reply shows the server has read
# both; then hold the connection until told, and try once more.
CLIENT = """
import sys
h.aio_pwrite(b"\\x11" * 4096, 0)
h.aio_pwrite(b"\\x22" * 4096, 65536)
h.pread(512, 1048576)
print("sent", flush=True)
sys.stdin.readline()
try:
    h.pread(512, 0)
    print("read ok", flush=True)
except nbd.Error as err:
    print("read failed", err.errno, flush=True)
"""


@pytest.fixture
def clients() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def start_client(daemon: DaemonProcess, started: list[subprocess.Popen[str]]) -> str:
    url = f"nbd+unix:///r0?socket={daemon.workdir}/nbd.sock"
    proc = subprocess.Popen(
        ["nbdsh", "-u", url, "-c", CLIENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # nbdsh needs the system Python's nbd module.
        env={"PATH": "/usr/bin:/bin"},
    )
    started.append(proc)
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def finish_client(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate("\n", timeout=30)
    return {"client": out.strip(), "status": proc.returncode}


def on_disk(daemon: DaemonProcess) -> list[int]:
    statuses = []
    for pattern, offset in ((0x11, 0), (0x22, 65536)):
        proc = subprocess.run(
            ["qemu-io", "-f", "raw", "-r", "-U", "-c", f"read -P {pattern} {offset} 4k",
             f"{daemon.workdir}/a.raw"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        statuses.append(int(proc.returncode == 0 and "verification failed" not in proc.stdout))
    return statuses


def test_hard_delete_with_clients(compat: Compat, clients: list[subprocess.Popen[str]]) -> None:
    pair = compat.daemons(ARGS, raw_image("a.raw", 2 << 20))
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client: RawQmp = compat.connect(daemon)
        client.negotiate()
        rec: list[Any] = [{"clients": [start_client(daemon, clients) for _ in range(2)]}]
        rec.append(client.cmd("query-block-exports"))
        rec.append(client.cmd("block-export-del", {"id": "e0"}))
        rec.append(client.cmd("block-export-del", {"id": "e0", "mode": "hard"}))
        # The writes are still held: the export stays, shutting down, under its id only.
        rec.append(client.cmd("query-block-exports"))
        rec.append(client.cmd("block-export-del", {"id": "e0", "mode": "hard"}))
        rec.append(client.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "r0"}))
        export = {"type": "nbd", "id": "e1", "node-name": "r0", "name": "r0"}
        rec.append(client.cmd("block-export-add", export))
        rec.append(client.cmd("query-block-exports"))
        rec.append(client.wait_event("BLOCK_EXPORT_DELETED", 30)["data"])
        rec.append(client.cmd("query-block-exports"))
        rec.append({"on-disk": on_disk(daemon)})
        rec += [finish_client(proc) for proc in clients[-2:]]
        rec.append(client.cmd("block-export-del", {"id": "e1"}))
        rec.append(client.wait_event("BLOCK_EXPORT_DELETED", 30)["data"])
        rec.append({"events": [e["event"] for e in client.events]})
        out[side] = normalise_transcript(rec, daemon.workdir)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))
