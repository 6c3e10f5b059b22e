"""Active block-commit while real NBD clients write to the committed layer, on our daemon.

Integration ring. The top of a qcow2 chain (base <- top) is exported over NBD; qemu-io
(deterministic writes, replayed on a raw copy of the chain as the expected result) or fio
(random writes with crc32c verification) write through the export while the job copies,
before and after it is READY. job-complete then moves the export onto the base, which must
hold every byte written (`qemu-img compare`); a soft cancel in READY leaves the export on the
top with the base equal to it. Daemons and clients are stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon import DaemonProcess, RawQmp, ours_command
from tests.integration.jobtools import cmd, needs_tools, qemu_io, run, wait_status

MiB = 1 << 20
SIZE = 16 * MiB
pytestmark = needs_tools


def uri(sock: Path) -> str:
    return f"nbd+unix:///top?socket={sock}"


class Chain:
    def __init__(self, qmp: RawQmp, sock: Path, d: Path) -> None:
        self.qmp = qmp
        self.sock = sock
        self.d = d

    def write(self, *cmds: str) -> None:
        """Write through the export, and the same into the expected image."""
        qemu_io(uri(self.sock), "raw", *cmds)
        qemu_io(str(self.d / "expect.raw"), "raw", *cmds)

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        return cmd(self.qmp, name, args)

    def wait_status(self, status: str) -> None:
        wait_status(self.qmp, status)

    def compare(self, a: str, b: str, fmt_a: str = "qcow2", fmt_b: str = "raw") -> None:
        run("qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, a, b)


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE))
    run("qemu-io", "-c", "write -P 0x5a 0 6M", "-c", "write -P 0x6b 9M 3M", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    run("qemu-io", "-c", "write -P 0x7c 2M 2M", "-c", "write -z 10M 512k", str(top))
    run("qemu-img", "convert", "-O", "raw", str(top), str(tmp_path / "expect.raw"))
    sock = tmp_path / "nbd.sock"
    args = [
        "--blockdev", f"driver=file,node-name=base-file,filename={base}",
        "--blockdev", "driver=qcow2,node-name=base,file=base-file,read-only=on",
        "--blockdev", f"driver=file,node-name=top-file,filename={top}",
        "--blockdev", "driver=qcow2,node-name=top,file=top-file,backing=base",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=top,writable=on",
    ]  # fmt: skip
    proc = DaemonProcess(ours_command(), args, tmp_path).start()
    try:
        assert proc.wait_ready(20), proc.stderr
        with proc.connect_qmp(timeout=60) as qmp:
            qmp.negotiate()
            yield Chain(qmp, sock, tmp_path)
    finally:
        proc.stop()


def test_qemu_io_writes_during_commit_then_pivot(chain: Chain) -> None:
    d = chain.d
    # The first request is 1 MiB; a 1 KiB/s speed then keeps the job copying for good.
    chain.cmd("block-commit", {"job-id": "c0", "device": "top", "speed": 1024})
    chain.write("write -P 0x11 100k 300k", "write -z 5M 1M", "write -P 0x22 15M 1M",
                "write -P 0x23 2560k 8k")  # fmt: skip
    jobs = chain.cmd("query-block-jobs")
    assert jobs[0]["status"] == "running" and jobs[0]["offset"] < jobs[0]["len"]
    chain.cmd("block-job-set-speed", {"device": "c0", "speed": 0})
    chain.wait_status("ready")
    chain.write("write -P 0x33 7M 64k", "write -P 0x44 1000 3000", "write -z 9M 1M")
    chain.cmd("job-complete", {"id": "c0"})
    chain.wait_status("null")
    chain.compare(str(d / "base.qcow2"), str(d / "expect.raw"))
    run("qemu-img", "check", "-U", str(d / "base.qcow2"))
    # The export serves the base now: a new write lands there, the top stays as it was.
    chain.write("write -P 0x55 2M 4k")
    chain.cmd("query-block-jobs")  # a round trip: the write above is done before we look
    chain.compare(str(d / "base.qcow2"), str(d / "expect.raw"))
    out = run("qemu-io", "-r", "-U", "-c", "read -P 0x7c 2M 4k", str(d / "top.qcow2"))
    assert "Pattern verification failed" not in out
    graph = chain.cmd("x-debug-query-block-graph")
    assert not any(n["type"] == "block-job" for n in graph["nodes"])
    assert "mirror_top" not in json.dumps(chain.cmd("query-named-block-nodes"))
    exports = chain.cmd("query-block-exports")
    assert exports[0]["node-name"] == "base"


def test_soft_cancel_in_ready_keeps_the_top(chain: Chain) -> None:
    d = chain.d
    chain.cmd("block-commit", {"job-id": "c0", "device": "top"})
    chain.write("write -P 0x12 1M 64k")
    chain.wait_status("ready")
    chain.write("write -P 0x34 3M 1M", "write -z 100k 4k")
    chain.cmd("block-job-cancel", {"device": "c0"})
    event = chain.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert event["data"]["type"] == "commit"
    chain.wait_status("null")
    assert chain.cmd("query-block-exports")[0]["node-name"] == "top"
    # The base holds everything the top showed when the job ended; the top is unchanged.
    chain.compare(str(d / "top.qcow2"), str(d / "expect.raw"))
    chain.compare(str(d / "base.qcow2"), str(d / "expect.raw"))


def test_fio_verify_across_the_pivot(chain: Chain) -> None:
    """fio writes and verifies through the export while the job copies and pivots, so its
    reads come from the base at the end and must see every write made through the top."""
    d = chain.d
    fio = subprocess.Popen(
        ["fio", "--name=commit", "--ioengine=nbd", f"--uri={uri(chain.sock)}",
         "--rw=randwrite", "--bsrange=512-64k", "--size=12M", "--iodepth=8",
         "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
         "--output-format=json"],
        cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        chain.cmd("block-commit", {"job-id": "c0", "device": "top"})
        chain.wait_status("ready")
        chain.cmd("job-complete", {"id": "c0"})
        chain.wait_status("null")
        out, err = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err
    report = json.loads(out[out.index("{") :])
    assert report["jobs"][0]["error"] == 0
    qemu_io(uri(chain.sock), "raw", "flush")  # qcow2 metadata reaches the file
    run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", uri(chain.sock),
        str(d / "base.qcow2"))  # fmt: skip
