"""Block job benchmark: ours against qemu-storage-daemon on the same images, interleaved.

Run by hand: `.venv/bin/python bench/job_bench.py [--size-mib 1024] [--runs 3]
[--workloads mirror,latency,stream,backup]`. Per run and daemon (the two alternate who goes
first): **mirror**, blockdev-mirror sync=full of a raw source filled with data into an empty
sparse raw target, timed from the command to BLOCK_JOB_READY, then cancelled; **latency**, the
same mirror while nbdcopy reads the exported source at full speed, sending query-jobs in a loop
and recording its latency (p50/p99); **stream**, block-stream of a raw base full of random data
into an empty qcow2 overlay (`qemu-img create -f qcow2 -b base -F raw`), timed from the command
to the job's `concluded`; **backup**, blockdev-backup sync=full of the random raw image to an
empty sparse raw target, timed the same way. Throughput in MiB/s and the daemon's CPU seconds
(all threads, from /proc/PID/stat) per job; medians over runs and ratios ours/qsd. The load
average is printed with the results. Every daemon and nbdcopy started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.daemon import DaemonProcess, RawQmp  # noqa: E402

COMMANDS: dict[str, list[str]] = {
    "qsd": ["/usr/bin/qemu-storage-daemon"],
    "ours": [sys.executable, "-m", "storage_daemon"],
}
WORKLOADS = ("mirror", "latency", "stream", "backup")
MIB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=600)


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def make_images(d: Path, size: int) -> tuple[Path, Path, Path]:
    """The pattern-filled mirror source, the random base, and the path of the target."""
    src, rnd, tgt = d / "src.raw", d / "random.raw", d / "tgt.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(src), str(size))
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {size}", str(src))
    with rnd.open("wb") as out:
        for _ in range(0, size, 16 * MIB):
            out.write(os.urandom(16 * MIB))
        out.truncate(size)
    return src, rnd, tgt


def start(side: str, d: Path, args: list[str]) -> DaemonProcess:
    proc = DaemonProcess(COMMANDS[side], args, d).start()
    if not proc.wait_ready(30):
        proc.stop()
        raise RuntimeError(f"{side} did not start: {proc.stderr}")
    return proc


def mirror_args(d: Path, src: Path, tgt: Path) -> list[str]:
    return [
        "--blockdev", f"driver=file,node-name=src-file,filename={src}",
        "--blockdev", "driver=raw,node-name=src,file=src-file",
        "--blockdev", f"driver=file,node-name=tgt-file,filename={tgt}",
        "--blockdev", "driver=raw,node-name=tgt,file=tgt-file",
        "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
        "--export", "type=nbd,id=e0,node-name=src",
    ]  # fmt: skip


def wait_status(qmp: RawQmp, status: str) -> None:
    while True:
        event = qmp.wait_event("JOB_STATUS_CHANGE", timeout=600)
        if event["data"]["status"] == status:
            return


def cancel(qmp: RawQmp, job: str) -> None:
    qmp.cmd("job-cancel", {"id": job})
    wait_status(qmp, "null")


def timed_job(
    side: str, d: Path, args: list[str], command: str, cmd_args: dict[str, Any], until: str
) -> tuple[float, float]:
    """Seconds from the command to the `until` event (BLOCK_JOB_READY or a JOB_STATUS_CHANGE
    status), and the daemon's CPU seconds meanwhile; the job is then cancelled or dismissed.

    The page cache is written back first (not timed): qsd leaves its targets' data dirty,
    and an ext4 fdatasync of the next daemon would write that back too (data=ordered)."""
    os.sync()
    proc = start(side, d, args)
    try:
        with proc.connect_qmp(timeout=600) as qmp:
            qmp.negotiate()
            cpu0 = cpu_seconds(proc.pid)
            began = time.monotonic()
            reply = qmp.cmd(command, cmd_args)
            if "error" in reply:
                raise RuntimeError(f"{side} {command}: {reply['error']}")
            if until == "BLOCK_JOB_READY":
                qmp.wait_event(until, timeout=600)
            else:
                wait_status(qmp, until)
            elapsed = time.monotonic() - began
            cpu = cpu_seconds(proc.pid) - cpu0
            if until == "BLOCK_JOB_READY":
                cancel(qmp, cmd_args["job-id"])
    finally:
        proc.stop()
    return elapsed, cpu


def mirror(side: str, d: Path, src: Path, tgt: Path, size: int) -> tuple[float, float]:
    run("qemu-img", "create", "-q", "-f", "raw", str(tgt), str(size))
    return timed_job(
        side, d, mirror_args(d, src, tgt), "blockdev-mirror",
        {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"}, "BLOCK_JOB_READY",
    )  # fmt: skip


def stream(side: str, d: Path, base: Path, tgt: Path, size: int) -> tuple[float, float]:
    ovl = tgt.with_suffix(".qcow2")
    ovl.unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(ovl))
    args = [
        "--blockdev", f"driver=file,node-name=base-file,filename={base}",
        "--blockdev", "driver=raw,node-name=base,file=base-file",
        "--blockdev", f"driver=file,node-name=ovl-file,filename={ovl}",
        "--blockdev", "driver=qcow2,node-name=ovl,file=ovl-file,backing=base",
    ]  # fmt: skip
    try:
        return timed_job(
            side, d, args, "block-stream", {"job-id": "s0", "device": "ovl"}, "concluded"
        )
    finally:
        ovl.unlink(missing_ok=True)


def backup(side: str, d: Path, src: Path, tgt: Path, size: int) -> tuple[float, float]:
    run("qemu-img", "create", "-q", "-f", "raw", str(tgt), str(size))
    args = [
        "--blockdev", f"driver=file,node-name=src-file,filename={src}",
        "--blockdev", "driver=raw,node-name=src,file=src-file",
        "--blockdev", f"driver=file,node-name=tgt-file,filename={tgt}",
        "--blockdev", "driver=raw,node-name=tgt,file=tgt-file",
    ]  # fmt: skip
    return timed_job(
        side, d, args, "blockdev-backup",
        {"job-id": "b0", "device": "src", "target": "tgt", "sync": "full"}, "concluded",
    )  # fmt: skip


def latency(side: str, d: Path, src: Path, tgt: Path, size: int) -> list[float]:
    run("qemu-img", "create", "-q", "-f", "raw", str(tgt), str(size))
    os.sync()
    proc = start(side, d, mirror_args(d, src, tgt))
    reader: subprocess.Popen[bytes] | None = None
    samples: list[float] = []
    try:
        with proc.connect_qmp(timeout=600) as qmp:
            qmp.negotiate()
            reader = subprocess.Popen(
                ["nbdcopy", f"nbd+unix:///src?socket={d}/nbd.sock", "null:"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            qmp.cmd("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt",
                                        "sync": "full"})  # fmt: skip
            while True:
                t0 = time.monotonic()
                jobs = qmp.cmd("query-jobs")["return"]
                samples.append((time.monotonic() - t0) * 1000)
                if not jobs or jobs[0]["status"] != "running":
                    break
            cancel(qmp, "m0")
    finally:
        if reader is not None:
            reader.kill()
            reader.wait()
        proc.stop()
    return samples


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


Timed = Callable[[str, Path, Path, Path, int], tuple[float, float]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--dir", default=None, help="where the images go (default: /tmp)")
    opts = parser.parse_args()
    workloads = [w for w in opts.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    size = opts.size_mib * MIB
    results: dict[str, dict[str, list[float]]] = {side: {} for side in COMMANDS}
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="job-bench-", dir=opts.dir))
    try:
        src, rnd, tgt = make_images(root, size)
        timed: dict[str, tuple[Timed, Path]] = {
            "mirror": (mirror, src),
            "stream": (stream, rnd),
            "backup": (backup, rnd),
        }
        for i in range(opts.runs):
            order = list(COMMANDS) if i % 2 == 0 else list(reversed(COMMANDS))
            for workload in workloads:
                for side in order:  # interleaved, alternating who goes first
                    d = root / side
                    d.mkdir(exist_ok=True)
                    res = results[side]
                    if workload == "latency":
                        lat = latency(side, d, src, tgt, size)
                        res.setdefault("latency_p50_ms", []).append(percentile(lat, 50))
                        res.setdefault("latency_p99_ms", []).append(percentile(lat, 99))
                        continue
                    func, image = timed[workload]
                    elapsed, cpu = func(side, d, image, tgt, size)
                    res.setdefault(f"{workload}_mib_s", []).append(size / elapsed / MIB)
                    res.setdefault(f"{workload}_cpu_s", []).append(cpu)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary: dict[str, Any] = {
        side: {key: round(statistics.median(vals), 2) for key, vals in data.items()}
        for side, data in results.items()
    }
    ratios: dict[str, float] = {}
    for key, value in summary["ours"].items():
        ref = summary["qsd"].get(key)
        if ref:
            ratios[key] = round(value / ref, 2)
    print(
        json.dumps(
            {
                "size_mib": opts.size_mib,
                "runs": opts.runs,
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                **summary,
                "ratio_ours_qsd": ratios,
                "each_run": {
                    side: {key: [round(v, 2) for v in vals] for key, vals in data.items()}
                    for side, data in results.items()
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
