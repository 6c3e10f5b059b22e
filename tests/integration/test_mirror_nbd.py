"""blockdev-mirror while real NBD clients write to the mirrored node, on our daemon.

Integration ring. The source is exported over NBD; qemu-io (deterministic writes) or fio
(random writes with crc32c verification) write through the export while the job copies, before
and after it is READY; job-complete then moves the export onto the target. The target must
equal the source (`qemu-img compare`), and reads through the export after the pivot must see
every byte written before it. Daemons and clients are stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess, RawQmp, ours_command
from tests.integration.jobtools import cmd, needs_tools, qemu_io, run, wait_status

MiB = 1 << 20
SIZE = 16 * MiB
pytestmark = needs_tools


def uri(sock: Path) -> str:
    return f"nbd+unix:///src?socket={sock}"


def qemu_io_nbd(sock: Path, *cmds: str) -> None:
    qemu_io(uri(sock), "raw", *cmds)


@pytest.fixture
def mirrored(tmp_path: Path) -> Iterator[tuple[DaemonProcess, RawQmp, Path]]:
    src, tgt = tmp_path / "src.raw", tmp_path / "tgt.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(src), str(SIZE))
    run("qemu-img", "create", "-q", "-f", "raw", str(tgt), str(SIZE))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 6M", "-c", "write -P 0x6b 9M 3M", str(src))
    sock = tmp_path / "nbd.sock"
    args = [
        "--blockdev", f"driver=file,node-name=src-file,filename={src}",
        "--blockdev", "driver=raw,node-name=src,file=src-file",
        "--blockdev", f"driver=file,node-name=tgt-file,filename={tgt}",
        "--blockdev", "driver=raw,node-name=tgt,file=tgt-file",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=src,writable=on",
    ]  # fmt: skip
    proc = DaemonProcess(ours_command(), args, tmp_path).start()
    try:
        assert proc.wait_ready(20), proc.stderr
        with proc.connect_qmp(timeout=60) as qmp:
            qmp.negotiate()
            yield proc, qmp, sock
    finally:
        proc.stop()


def test_qemu_io_writes_during_mirror_then_pivot(
    mirrored: tuple[DaemonProcess, RawQmp, Path], tmp_path: Path
) -> None:
    _, qmp, sock = mirrored
    # A slow start keeps the job copying while the first writes arrive.
    cmd(qmp, "blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt",
                                 "sync": "full", "speed": MiB, "buf-size": 256 * 1024})  # fmt: skip
    qemu_io_nbd(sock, "write -P 0x11 100k 300k", "write -z 5M 1M", "write -P 0x22 15M 1M")
    jobs = cmd(qmp, "query-block-jobs")
    assert jobs[0]["status"] == "running" and jobs[0]["offset"] < jobs[0]["len"]
    cmd(qmp, "block-job-set-speed", {"device": "m0", "speed": 0})
    wait_status(qmp, "ready")
    qemu_io_nbd(sock, "write -P 0x33 7M 64k", "discard 9M 1M", "write -P 0x44 1000 3000")
    cmd(qmp, "job-complete", {"id": "m0"})
    wait_status(qmp, "null")
    # Everything written before the pivot is on both sides.
    run("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw",
        str(tmp_path / "src.raw"), str(tmp_path / "tgt.raw"))  # fmt: skip
    # The export now serves the target: new writes land there only.
    qemu_io_nbd(sock, "write -P 0x55 2M 4k", "read -P 0x33 7M 64k", "read -P 0x44 1000 3000")
    qmp.cmd("query-block-jobs")  # a round trip: the write above is on disk before we look
    out = run("qemu-io", "-f", "raw", "-r", "-U", "-c", "read -P 0x55 2M 4k",
              str(tmp_path / "tgt.raw"))  # fmt: skip
    assert "Pattern verification failed" not in out
    out = run("qemu-io", "-f", "raw", "-r", "-U", "-c", "read -P 0x5a 2M 4k",
              str(tmp_path / "src.raw"))  # fmt: skip
    assert "Pattern verification failed" not in out
    graph = cmd(qmp, "x-debug-query-block-graph")
    assert not any(n["type"] == "block-job" for n in graph["nodes"])
    assert "mirror_top" not in json.dumps(cmd(qmp, "query-named-block-nodes"))


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_fio_verify_across_the_pivot(
    mirrored: tuple[DaemonProcess, RawQmp, Path], tmp_path: Path, mode: str
) -> None:
    """fio writes and then verifies through the export; the pivot happens while it runs, so
    its reads come from the target and must see every write made through the source."""
    _, qmp, sock = mirrored
    fio = subprocess.Popen(
        ["fio", "--name=mirror", "--ioengine=nbd", f"--uri={uri(sock)}", "--rw=randwrite",
         "--bsrange=512-64k", "--size=12M", "--iodepth=8", "--verify=crc32c",
         "--do_verify=1", "--verify_state_save=0", "--output-format=json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        cmd(qmp, "blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt",
                                     "sync": "full", "copy-mode": mode})  # fmt: skip
        wait_status(qmp, "ready")
        cmd(qmp, "job-complete", {"id": "m0"})
        wait_status(qmp, "null")
        out, err = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err
    report = json.loads(out[out.index("{") :])
    assert report["jobs"][0]["error"] == 0
    # After the pivot the export reads the target file: fio's data must be there too.
    run("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", uri(sock), str(tmp_path / "tgt.raw"))
