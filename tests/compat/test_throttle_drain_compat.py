"""Throttling around drains and stream on the reference qsd and on ours, side by side.

Test ring (compat). A transaction drains every node: the writes an NBD client has queued in a
throttle group go at once (the limits would hold them for many seconds), while a
`block-stream` whose device is a throttle filter copies through that group's limits. What is
observed is order (still running before, finished right after) with margins of many seconds,
not durations. Every daemon and client process is stopped by PID.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Compat, diff_text
from tests.integration.daemon import DaemonProcess, RawQmp

pytestmark = pytest.mark.compat

KiB = 1024
MiB = 1024 * KiB
WRITES = 16  # 4 KiB each at 4 KiB/s: the limits let the last one go after ~14 s
SOON = 6.0  # seconds: "at once" (the limits would need 13 s more)
SYSTEM_PYTHON = "/usr/bin/python3"


def _qemu_img(*argv: str) -> None:
    subprocess.run(["qemu-img", *argv], check=True, capture_output=True, timeout=30)


def _throttled_export(d: Path) -> None:
    _qemu_img("create", "-f", "qcow2", str(d / "img.qcow2"), "16M")


EXPORT_ARGS = [
    "--object",
    "throttle-group,id=tg0,x-bps-write=4096",
    "--blockdev",
    "driver=file,node-name=f0,filename=$D/img.qcow2",
    "--blockdev",
    "driver=qcow2,node-name=q0,file=f0",
    "--blockdev",
    "driver=throttle,node-name=th,throttle-group=tg0,file=q0",
    "--nbd-server",
    "addr.type=unix,addr.path=$D/nbd.sock",
    "--export",
    "type=nbd,id=e,node-name=th,name=th,writable=on",
]


# Run by the system python (libnbd's bindings): WRITES aio writes of 4 KiB (64 KiB in all: the
# socket holds every request at once), "first" once the first is done (the others are then
# queued in the throttle group), "done" after the rest.
NBD_WRITER = f"""
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
buf = nbd.Buffer.from_bytearray(bytearray(b"\\1" * 4096))
cookies = [h.aio_pwrite(buf, i * 4096) for i in range({WRITES})]
while not h.aio_command_completed(cookies[0]):
    h.poll(-1)
print("first", flush=True)
while h.aio_in_flight():
    h.poll(-1)
print("done", flush=True)
h.shutdown()
"""


def _libnbd_missing() -> bool:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30)
    return probe.returncode != 0


@contextlib.contextmanager
def _queued_writes(d: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The NBD writer on the export; yields once its first write is done. Killed by PID."""
    url = f"nbd+unix:///th?socket={d}/nbd.sock"
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", NBD_WRITER, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the first write never completed"
        line = proc.stdout.readline()
        assert line == b"first\n", line + proc.stdout.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _transaction_side(daemon: DaemonProcess, client: RawQmp, actions: list[Any]) -> dict[str, Any]:
    d = daemon.workdir
    with _queued_writes(d) as io:
        pending = io.poll() is None
        reply = client.cmd("transaction", {"actions": actions})
        try:
            status: int | str = io.wait(timeout=SOON)
        except subprocess.TimeoutExpired:
            status = "still throttled"
    return {"pending before": pending, "transaction": reply, "writer soon after": status}


def _compare(records: dict[str, Any]) -> None:
    ref, ours = records["reference"], records["ours"]
    assert ref == ours, diff_text([ref], [ours])


@pytest.mark.parametrize("kind", ["empty", "snapshot"])
def test_transaction_releases_queued_throttled_writes(compat: Compat, kind: str) -> None:
    if _libnbd_missing():
        pytest.skip("libnbd's python bindings are not installed")
    pair = compat.daemons(EXPORT_ARGS, setup=_throttled_export)
    records: dict[str, Any] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.timeout = 30
        client.negotiate()
        actions: list[Any] = []
        if kind == "snapshot":
            snap = {"node-name": "q0", "snapshot-file": f"{daemon.workdir}/snap.qcow2"}
            snap |= {"snapshot-node-name": "s0", "format": "qcow2"}
            actions = [{"type": "blockdev-snapshot-sync", "data": snap}]
        records[side] = _transaction_side(daemon, client, actions)
    _compare(records)
    assert records["reference"] == {
        "pending before": True,
        "transaction": {"return": {}},
        "writer soon after": 0,
    }


# --- block-stream through the device's throttle filter -------------------------------------


def _chain(d: Path) -> None:
    _qemu_img("create", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    subprocess.run(
        ["qemu-io", "-c", "write -P 7 0 1M", str(d / "base.qcow2")],
        check=True,
        capture_output=True,
        timeout=30,
    )
    base = str(d / "base.qcow2")
    _qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", str(d / "top.qcow2"))


def _stream_args(limit: str) -> list[str]:
    return [
        "--object",
        f"throttle-group,id=tg0,{limit}=4096",
        "--blockdev",
        "driver=qcow2,node-name=top,file.driver=file,file.filename=$D/top.qcow2",
        "--blockdev",
        "driver=throttle,node-name=th,throttle-group=tg0,file=top",
    ]


def _stream_side(client: RawQmp, device: str) -> list[Any]:
    """Start the stream; watch query-block-jobs for a second (at 4 KiB/s the second copy of
    512 KiB waits two minutes for the limit, an unthrottled stream of 1 MiB ends in
    milliseconds); an empty transaction, whose drain lets the waiting copy go; the job's
    completion."""
    out: list[Any] = [client.cmd("block-stream", {"job-id": "j", "device": device})]
    deadline = time.monotonic() + 1.0
    held = True
    while held and time.monotonic() < deadline:
        jobs = client.cmd("query-block-jobs")["return"]
        held = bool(jobs) and jobs[0]["status"] == "running" and jobs[0]["offset"] < jobs[0]["len"]
    out.append({"held by the limit for a second": held})
    out.append(client.cmd("transaction", {"actions": []}))
    event = client.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
    out.append(event["data"])
    return out


@pytest.mark.parametrize(
    ("device", "limit"),
    [("th", "x-bps-read"), ("th", "x-bps-write"), ("top", "x-bps-total")],
)
def test_stream_copies_through_device_throttle(compat: Compat, device: str, limit: str) -> None:
    pair = compat.daemons(_stream_args(limit), setup=_chain)
    records: dict[str, Any] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.timeout = 30
        client.negotiate()
        records[side] = _stream_side(client, device)
    _compare(records)
    # A device that is the throttle filter: both the reads and the copy-up writes wait; a
    # device below it (the filter then sits above the job's copy-on-read filter): neither.
    assert records["reference"][1] == {"held by the limit for a second": device == "th"}
