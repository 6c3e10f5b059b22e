"""Startup time and idle memory: ours against qemu-storage-daemon, interleaved, medians.

Run by hand (`make bench` or `.venv/bin/python bench/startup.py [--runs N]`). Each run starts
the daemon with one null node and a QMP monitor on a unix socket, measures the time until the
QMP greeting arrives and the CPU time the daemon used until then (all threads; less sensitive
to a busy machine than the wall time), then the time until the first command is answered
(greeting, `qmp_capabilities`, `query-version`: work moved to after the greeting shows here),
then reads VmRSS from /proc once the daemon is idle, and stops it.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REFERENCE = ["/usr/bin/qemu-storage-daemon"]
# qsd 7.2 sometimes never reads a client that connected while it was still starting (it sent
# the greeting, then ignores the socket): such a run times out and is measured again.
REPLY_TIMEOUT = 5.0
ATTEMPTS = 3
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


class Sample(NamedTuple):
    ready: float  # seconds from exec to the QMP greeting
    cpu: float  # CPU seconds the daemon used until then
    reply: float  # seconds from exec to the answer of the first command (query-version)
    reply_cpu: float  # CPU seconds until then
    rss_kib: int  # idle resident memory


def _read_message(client: socket.socket, buffered: bytearray, key: str) -> dict[str, object]:
    """The next QMP message with member `key` ("QMP": a greeting; "return" or "error": a
    reply), skipping events and, when waiting for a reply, a repeated greeting: qsd 7.2
    greets twice a client that connected while it was still starting."""
    while True:
        while b"\n" not in buffered:
            chunk = client.recv(65536)
            if not chunk:
                raise RuntimeError("monitor closed")
            buffered += chunk
        line, _, rest = bytes(buffered).partition(b"\n")
        buffered[:] = rest
        message = json.loads(line)
        if key in message or "error" in message:
            return dict(message)


def measure(command: list[str], scratch: Path) -> Sample:
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
    client = socket.socket(socket.AF_UNIX)
    try:
        while True:
            client.close()
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(REPLY_TIMEOUT)
            try:
                client.connect(str(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited with {proc.returncode}") from None
                time.sleep(0.001)
        buffered = bytearray()
        greeting = _read_message(client, buffered, "QMP")
        ready = time.perf_counter() - start
        cpu = cpu_seconds(proc.pid)
        assert "QMP" in greeting, greeting
        client.sendall(b'{"execute": "qmp_capabilities"}\n')
        caps = _read_message(client, buffered, "return")
        assert "return" in caps, caps
        client.sendall(b'{"execute": "query-version"}\n')
        version = _read_message(client, buffered, "return")
        reply = time.perf_counter() - start
        reply_cpu = cpu_seconds(proc.pid)
        assert "return" in version, version
        client.close()
        time.sleep(0.2)  # let the daemon settle before reading its idle memory
        rss_kib = 0
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
        return Sample(ready, cpu, reply, reply_cpu, rss_kib)
    finally:
        client.close()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="one more daemon to measure in the same rounds, e.g. an older checkout: "
        "'base=env PYTHONPATH=/tmp/base .venv/bin/python -m storage_daemon'",
    )
    args = parser.parse_args()
    commands = {"qsd": REFERENCE, "ours": OURS}
    for extra in args.also:
        name, _, command = extra.partition("=")
        commands[name] = shlex.split(command)
    # Measure the package byte-compiled, as `make` leaves it: with PYTHONDONTWRITEBYTECODE set
    # (as here), a stale .pyc (any edit since the last compile) would be compiled at each start.
    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "storage_daemon"), quiet=2)
    results: dict[str, list[Sample]] = {name: [] for name in commands}
    with tempfile.TemporaryDirectory(prefix="sd-bench-") as tmp:
        scratch = Path(tmp)
        for _ in range(args.runs):  # interleaved, so drift affects all alike
            for name, command in commands.items():
                for attempt in range(ATTEMPTS):
                    try:
                        results[name].append(measure(command, scratch))
                        break
                    except TimeoutError:
                        print(f"{name}: no reply within {REPLY_TIMEOUT} s, measuring again")
                        if attempt == ATTEMPTS - 1:
                            raise
    summary = {}
    for name, runs in results.items():
        ready_ms = statistics.median(r.ready for r in runs) * 1000
        cpu_ms = statistics.median(r.cpu for r in runs) * 1000
        reply_ms = statistics.median(r.reply for r in runs) * 1000
        reply_cpu_ms = statistics.median(r.reply_cpu for r in runs) * 1000
        rss_mib = statistics.median(r.rss_kib for r in runs) / 1024
        summary[name] = (ready_ms, reply_ms, rss_mib)
        print(
            f"{name:6s} ready {ready_ms:7.1f} ms (CPU {cpu_ms:6.1f} ms)   first reply"
            f" {reply_ms:7.1f} ms (CPU {reply_cpu_ms:6.1f} ms)   idle RSS {rss_mib:5.1f} MiB"
        )
    ours, qsd = summary["ours"], summary["qsd"]
    print(
        f"ratio ours/qsd: ready {ours[0] / qsd[0]:.1f}x, first reply {ours[1] / qsd[1]:.1f}x,"
        f" RSS {ours[2] / qsd[2]:.1f}x  (medians of {args.runs} runs)"
    )


if __name__ == "__main__":
    main()
