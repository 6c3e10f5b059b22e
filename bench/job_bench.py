"""Mirror job benchmark: ours against qemu-storage-daemon on the same images, interleaved.

Run by hand: `.venv/bin/python bench/job_bench.py [--size-mib 1024] [--runs 3]`. For each run
and each daemon: a raw source of `size` filled with data and an empty sparse raw target;
blockdev-mirror sync=full is timed from the command to BLOCK_JOB_READY (throughput), then the
job is cancelled. A second pass mirrors again while nbdcopy reads the exported source at full
speed, sending query-jobs in a loop and recording its latency (p50/p99). Medians over runs.
Every daemon and nbdcopy started here is stopped by PID in a `finally`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.daemon import DaemonProcess, RawQmp  # noqa: E402

COMMANDS: dict[str, list[str]] = {
    "qsd": ["/usr/bin/qemu-storage-daemon"],
    "ours": [sys.executable, "-m", "storage_daemon"],
}
MIB = 1 << 20


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=600)


def make_images(d: Path, size: int) -> tuple[Path, Path]:
    src, tgt = d / "src.raw", d / "tgt.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(src), str(size))
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {size}", str(src))
    run("qemu-img", "create", "-q", "-f", "raw", str(tgt), str(size))
    return src, tgt


def start(side: str, d: Path, src: Path, tgt: Path) -> DaemonProcess:
    args = [
        "--blockdev", f"driver=file,node-name=src-file,filename={src}",
        "--blockdev", "driver=raw,node-name=src,file=src-file",
        "--blockdev", f"driver=file,node-name=tgt-file,filename={tgt}",
        "--blockdev", "driver=raw,node-name=tgt,file=tgt-file",
        "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
        "--export", "type=nbd,id=e0,node-name=src",
    ]  # fmt: skip
    proc = DaemonProcess(COMMANDS[side], args, d).start()
    if not proc.wait_ready(30):
        proc.stop()
        raise RuntimeError(f"{side} did not start: {proc.stderr}")
    return proc


def wait_status(qmp: RawQmp, status: str) -> None:
    while True:
        event = qmp.wait_event("JOB_STATUS_CHANGE", timeout=600)
        if event["data"]["status"] == status:
            return


def cancel(qmp: RawQmp) -> None:
    qmp.cmd("job-cancel", {"id": "m0"})
    wait_status(qmp, "null")


def throughput(side: str, d: Path, src: Path, tgt: Path, size: int) -> float:
    proc = start(side, d, src, tgt)
    try:
        with proc.connect_qmp(timeout=600) as qmp:
            qmp.negotiate()
            began = time.monotonic()
            qmp.cmd("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt",
                                        "sync": "full"})  # fmt: skip
            qmp.wait_event("BLOCK_JOB_READY", timeout=600)
            elapsed = time.monotonic() - began
            cancel(qmp)
    finally:
        proc.stop()
    return size / elapsed / MIB


def latency(side: str, d: Path, src: Path, tgt: Path) -> list[float]:
    proc = start(side, d, src, tgt)
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
            cancel(qmp)
    finally:
        if reader is not None:
            reader.kill()
            reader.wait()
        proc.stop()
    return samples


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    size = opts.size_mib * MIB
    results: dict[str, dict[str, list[float]]] = {
        side: {"mib_s": [], "p50_ms": [], "p99_ms": []} for side in COMMANDS
    }
    root = Path(tempfile.mkdtemp(prefix="job-bench-"))
    try:
        src, tgt = make_images(root, size)
        for i in range(opts.runs):
            order = list(COMMANDS) if i % 2 == 0 else list(reversed(COMMANDS))
            for side in order:  # interleaved, alternating who goes first
                d = root / side
                d.mkdir(exist_ok=True)
                run("qemu-img", "create", "-q", "-f", "raw", str(tgt), str(size))
                results[side]["mib_s"].append(throughput(side, d, src, tgt, size))
                run("qemu-img", "create", "-q", "-f", "raw", str(tgt), str(size))
                lat = latency(side, d, src, tgt)
                results[side]["p50_ms"].append(percentile(lat, 50))
                results[side]["p99_ms"].append(percentile(lat, 99))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary: dict[str, Any] = {
        side: {key: round(statistics.median(vals), 2) for key, vals in data.items()}
        for side, data in results.items()
    }
    summary["ratio_mib_s"] = round(summary["ours"]["mib_s"] / summary["qsd"]["mib_s"], 2)
    print(json.dumps({"size_mib": opts.size_mib, "runs": opts.runs, **summary}, indent=2))


if __name__ == "__main__":
    main()
