"""blockdev-backup while a real NBD client (qemu-io) writes to the exported source.

Integration ring: our daemon runs as a subprocess exporting the source over NBD; a rate limit
keeps the backup going while qemu-io overwrites ranges all over the image. The target must
equal the source as it was when the backup started, the source what the client wrote, both
checked with qemu-img after the daemon stopped. Every daemon is stopped by PID.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess, RawQmp, ours_command

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-io", "qemu-img")), reason="qemu tools missing"
)

MiB = 1 << 20
# Writes all over the 8 MiB image: inside and across 64 KiB clusters, zeroes. (No discard:
# the filter node, like qsd's, has discard=ignore, so a discard would be dropped there.)
WRITES = [
    "write -P 0x51 0 4k",
    "write -P 0x52 1020k 8k",
    "write -P 0x53 3M 1M",
    "write -z 5M 192k",
    "write -P 0x54 6143k 2k",
    "write -P 0x55 8188k 4k",
    "write -P 0x56 3584k 4k",  # a second write into a range copied before the first
]


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


@contextmanager
def daemon(workdir: Path, args: Sequence[str]) -> Iterator[tuple[DaemonProcess, RawQmp]]:
    proc = DaemonProcess(ours_command(), args, workdir).start()
    try:
        if not proc.wait_ready(20):
            raise AssertionError(f"daemon exited {proc.returncode}: {proc.stderr}")
        qmp = proc.connect_qmp(timeout=20)
        try:
            qmp.negotiate()
            yield proc, qmp
        finally:
            qmp.close()
    finally:
        proc.stop()


def test_backup_under_nbd_writes(tmp_path: Path) -> None:
    d = tmp_path
    run("qemu-img", "create", "-f", "qcow2", f"{d}/src.qcow2", "8M")
    run("qemu-io", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x22 2M 4M",
        "-c", "write -P 0x33 7M 1M", f"{d}/src.qcow2")  # fmt: skip
    run("qemu-img", "create", "-f", "qcow2", f"{d}/tgt.qcow2", "8M")
    run("qemu-img", "convert", "-O", "raw", f"{d}/src.qcow2", f"{d}/at-start.raw")
    shutil.copy(d / "at-start.raw", d / "written.raw")
    sock = d / "nbd.sock"
    args = [
        "--blockdev",
        f"driver=qcow2,node-name=src,discard=unmap,file.driver=file,file.filename={d}/src.qcow2",
        "--blockdev",
        f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={d}/tgt.qcow2",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=e0,node-name=src,name=src,writable=on",
    ]
    with daemon(d / "run", args) as (_proc, qmp):
        reply = qmp.cmd(
            "blockdev-backup",
            {"job-id": "b0", "device": "src", "target": "tgt", "sync": "full",
             "speed": 1, "filter-node-name": "cbw"},
        )  # fmt: skip
        assert reply == {"return": {}}
        # The export now goes through the filter.
        exports = qmp.cmd("query-block-exports")["return"]
        assert exports[0]["node-name"] == "cbw"
        commands = [arg for write in WRITES for arg in ("-c", write)]
        run("qemu-io", "-f", "raw", *commands, f"nbd+unix:///src?socket={sock}")
        job = qmp.cmd("query-block-jobs")["return"][0]
        assert job["status"] == "running" and job["offset"] < job["len"] == 8 * MiB
        assert qmp.cmd("block-job-set-speed", {"device": "b0", "speed": 0}) == {"return": {}}
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert done["data"]["offset"] == done["data"]["len"] == 8 * MiB
        assert "error" not in done["data"]
        # Back on the source, and writes after the job do not reach the target.
        assert qmp.cmd("query-block-exports")["return"][0]["node-name"] == "src"
        run("qemu-io", "-f", "raw", "-c", "write -P 0x57 4M 64k", f"nbd+unix:///src?socket={sock}")
        nodes = {n["node-name"] for n in qmp.cmd("query-named-block-nodes")["return"]}
        assert "cbw" not in nodes
    run("qemu-io", "-f", "raw", *[a for w in [*WRITES, "write -P 0x57 4M 64k"]
                                   for a in ("-c", w)], f"{d}/written.raw")  # fmt: skip
    run("qemu-img", "check", f"{d}/tgt.qcow2")
    run("qemu-img", "check", f"{d}/src.qcow2")
    run("qemu-img", "compare", "-F", "raw", f"{d}/tgt.qcow2", f"{d}/at-start.raw")
    run("qemu-img", "compare", "-F", "raw", f"{d}/src.qcow2", f"{d}/written.raw")


def test_fleecing_view_over_nbd(tmp_path: Path) -> None:
    """copy-before-write + snapshot-access, no job: a reader sees the point-in-time image
    while a writer changes the source."""
    d = tmp_path
    run("qemu-img", "create", "-f", "qcow2", f"{d}/src.qcow2", "8M")
    run("qemu-io", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x22 2M 4M", f"{d}/src.qcow2")
    run("qemu-img", "create", "-f", "qcow2", f"{d}/tmp.qcow2", "8M")
    run("qemu-img", "convert", "-O", "raw", f"{d}/src.qcow2", f"{d}/at-start.raw")
    sock = d / "nbd.sock"
    args = [
        "--blockdev",
        f"driver=qcow2,node-name=src,file.driver=file,file.filename={d}/src.qcow2",
        "--blockdev",
        f"driver=qcow2,node-name=tmp,file.driver=file,file.filename={d}/tmp.qcow2",
        "--blockdev",
        "driver=copy-before-write,node-name=cbw,file=src,target=tmp",
        "--blockdev",
        "driver=snapshot-access,node-name=acc,file=cbw,discard=unmap",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=w,node-name=cbw,name=w,writable=on",
        "--export",
        "type=nbd,id=r,node-name=acc,name=r,writable=on",  # writable: for discards
    ]
    view = f"nbd+unix:///r?socket={sock}"
    with daemon(d / "run", args) as (_proc, qmp):
        commands = [arg for write in WRITES for arg in ("-c", write)]
        run("qemu-io", "-f", "raw", *commands, f"nbd+unix:///w?socket={sock}")
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", view, f"{d}/at-start.raw")
        # The writer's data is on the source all the same.
        out = run(
            "qemu-io", "-f", "raw", "-c", "read -P 0x53 3M 512k", f"nbd+unix:///w?socket={sock}"
        )
        assert "read 524288/524288" in out
        # A range the reader discards is no longer readable through the view.
        run("qemu-io", "-f", "raw", "-c", "discard 0 64k", view)
        failed = subprocess.run(
            ["qemu-io", "-f", "raw", "-r", "-c", "read 0 64k", view],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        # EACCES inside; the NBD servers (qsd and ours) send it as EINVAL.
        assert failed.returncode != 0 and "read failed" in failed.stdout + failed.stderr
        assert qmp.cmd("block-export-del", {"id": "r"}) == {"return": {}}
