"""Startup time and idle memory: ours against qemu-storage-daemon, interleaved, medians.

Run by hand (`make bench` or `.venv/bin/python bench/startup.py [--runs N]`). Each run starts
the daemon with one null node and a QMP monitor on a unix socket, measures the time until the
QMP greeting arrives and the CPU time the daemon used until then (all threads; less sensitive
to a busy machine than the wall time), then reads VmRSS from /proc once the daemon is idle, and
stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = ["/usr/bin/qemu-storage-daemon"]
OURS = [sys.executable, "-m", "storage_daemon"]


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by every thread of `pid` (nanosecond schedstat counters)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended meanwhile
    return total / 1e9


def measure(command: list[str], scratch: Path) -> tuple[float, float, int]:
    sock_path = scratch / "qmp.sock"
    if sock_path.exists():
        sock_path.unlink()
    args = [
        "--blockdev", "driver=null-co,node-name=n0",
        "--chardev", f"socket,id=m0,path={sock_path},server=on,wait=off",
        "--monitor", "chardev=m0",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen([*command, *args], stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(str(sock_path))
                    client.recv(4096)  # the greeting
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited with {proc.returncode}") from None
                time.sleep(0.001)
        ready = time.perf_counter() - start
        cpu = cpu_seconds(proc.pid)
        time.sleep(0.2)  # let the daemon settle before reading its idle memory
        rss_kib = 0
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
        return ready, cpu, rss_kib
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, int]]] = {"qsd": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="sd-bench-") as tmp:
        scratch = Path(tmp)
        for _ in range(args.runs):  # interleaved, so drift affects both alike
            results["qsd"].append(measure(REFERENCE, scratch))
            results["ours"].append(measure(OURS, scratch))
    summary = {}
    for name, runs in results.items():
        ready_ms = statistics.median(r[0] for r in runs) * 1000
        cpu_ms = statistics.median(r[1] for r in runs) * 1000
        rss_mib = statistics.median(r[2] for r in runs) / 1024
        summary[name] = (ready_ms, rss_mib)
        print(
            f"{name:5s} ready {ready_ms:7.1f} ms   CPU until ready {cpu_ms:7.1f} ms"
            f"   idle RSS {rss_mib:6.1f} MiB"
        )
    print(
        f"ratio ours/qsd: ready {summary['ours'][0] / summary['qsd'][0]:.1f}x, "
        f"RSS {summary['ours'][1] / summary['qsd'][1]:.1f}x  (medians of {args.runs} runs)"
    )


if __name__ == "__main__":
    main()
