"""NBD data-path benchmark: ours against qemu-storage-daemon, same arguments, interleaved, medians.

Run by hand (`.venv/bin/python bench/nbd_bench.py [--quick] [--targets qsd,ours]`); see
bench/README.md. Every daemon started here is stopped by PID in a `finally`, also on Ctrl-C, and
every fio/nbdcopy run has a hard time bound. Both daemons get exactly the same command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_COMMANDS: dict[str, list[str]] = {
    "qsd": ["/usr/bin/qemu-storage-daemon"],
    "ours": [sys.executable, "-m", "storage_daemon"],
}
MIB = 1024 * 1024
NBDCOPY_REQUEST_SIZE = 256 * 1024  # nbdcopy's own default, passed explicitly to count I/Os
STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class DaemonError(RuntimeError):
    """The daemon exited at startup or during a run; the message carries its stderr."""


class ToolError(RuntimeError):
    """fio or nbdcopy failed or overran its time bound."""


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    title: str
    tool: str  # "fio" or "nbdcopy"
    rw: str = ""  # fio --rw, or "out" (export -> null:) / "in" (file -> export) for nbdcopy
    bs: int = 0
    iodepth: int = 0
    target_metric: str = ""  # metric the issue sets a goal for ("" = none)
    target_ratio: float = 0.0


WORKLOADS: tuple[Workload, ...] = (
    Workload("seq-read", "seq read 1M QD8", "fio", "read", MIB, 8, "mib_s", 1.0),
    Workload("seq-write", "seq write 1M QD8", "fio", "write", MIB, 8, "mib_s", 1.0),
    Workload("rand-read", "rand read 4K QD16", "fio", "randread", 4096, 16, "iops", 0.6),
    Workload("rand-write", "rand write 4K QD16", "fio", "randwrite", 4096, 16, "iops", 0.6),
    Workload("rand-read-qd1", "rand read 4K QD1", "fio", "randread", 4096, 1),
    Workload("nbdcopy-out", "nbdcopy export->null:", "nbdcopy", "out", target_metric="mib_s", target_ratio=1.0),
    Workload("nbdcopy-in", "nbdcopy file->export", "nbdcopy", "in", target_metric="mib_s", target_ratio=1.0),
)  # fmt: skip
WORKLOADS_BY_NAME = {w.name: w for w in WORKLOADS}

# metric key, column header, format, True when higher is better
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("mib_s", "MiB/s", "{:9.1f}", True),
    ("iops", "IOPS", "{:9.0f}", True),
    ("clat_mean_us", "mean us", "{:9.1f}", False),
    ("clat_p99_us", "p99 us", "{:9.1f}", False),
    ("cpu_us_per_io", "CPU us/IO", "{:9.2f}", False),
)


@dataclasses.dataclass
class Sample:
    """One workload run against one daemon; None where the tool does not measure it."""

    mib_s: float
    iops: float
    clat_mean_us: float | None
    clat_p99_us: float | None
    cpu_us_per_io: float
    ios: int
    seconds: float
    daemon_cpu_s: float
    client_cpu_s: float | None


# --- daemon handling ------------------------------------------------------------------------


def daemon_args(
    image: Path, sock: Path, cache_direct: str | None, fmt_name: str = "raw", fmt_opts: str = ""
) -> list[str]:
    file_opts = f"driver=file,node-name=file0,filename={image}"
    if cache_direct is not None:
        file_opts += f",cache.direct={cache_direct}"
    top = f"driver={fmt_name},node-name=disk0,file=file0"
    if fmt_opts:
        top += f",{fmt_opts}"
    return [
        "--blockdev", file_opts,
        "--blockdev", top,
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on",
    ]  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads) from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon:
    """A started daemon; `stop()` is idempotent and always ends the process by PID."""

    def __init__(
        self, target: str, command: list[str], args: list[str], sock: Path, scratch: Path
    ) -> None:
        self.target = target
        self.sock = sock
        self.stderr_path = scratch / f"{target}.stderr"
        # Both daemons write their PID here once start-up is over (ours preloads its
        # modules in a thread after the NBD socket already listens: a workload started
        # meanwhile would measure ~0.2 s of start-up work too). One path for both, so the
        # command lines stay identical; the daemons never run at the same time.
        self.pidfile = scratch / "daemon.pid"
        self.pidfile.unlink(missing_ok=True)
        if self.sock.exists():
            self.sock.unlink()
        with self.stderr_path.open("wb") as err:
            # A new session: Ctrl-C in the terminal reaches only us, and we stop it by PID.
            self.proc = subprocess.Popen(
                [*command, *args, "--pidfile", str(self.pidfile)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=REPO,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def stderr_text(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            return "(no stderr)"
        return text or "(empty stderr)"

    def failure(self, what: str) -> DaemonError:
        return DaemonError(
            f"{self.target} daemon (pid {self.pid}) {what}, exit status "
            f"{self.proc.returncode}; its stderr:\n{self.stderr_text()}"
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise self.failure("exited at startup")
            try:
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(str(self.sock))
                if self.pidfile.read_text().strip() == str(self.pid):
                    return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"{self.target} daemon (pid {self.pid}) did not listen on {self.sock} (and "
                    f"write its pidfile) "
                    f"within {STARTUP_TIMEOUT_S:.0f} s; its stderr:\n{self.stderr_text()}"
                )
            time.sleep(0.01)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise self.failure("died during the run")

    def cpu(self) -> float:
        self.check_alive()
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        if self.sock.exists():
            self.sock.unlink()


@contextlib.contextmanager
def running_daemon(
    target: str, command: list[str], args: list[str], sock: Path, scratch: Path
) -> Iterator[Daemon]:
    daemon = Daemon(target, command, args, sock, scratch)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


# --- workloads ------------------------------------------------------------------------------


def nbd_uri(sock: Path) -> str:
    return f"nbd+unix:///disk0?socket={sock}"


def run_tool(argv: list[str], timeout: float, daemon: Daemon) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:  # run() has already killed the tool
        daemon.check_alive()
        raise ToolError(f"{argv[0]} overran its {timeout:.0f} s bound: {shlex.join(argv)}")
    if done.returncode != 0:
        daemon.check_alive()  # a dead daemon is the better explanation
        raise ToolError(
            f"{argv[0]} failed with status {done.returncode}: {shlex.join(argv)}\n"
            f"{done.stderr.strip()}\n{done.stdout.strip()[-2000:]}"
        )
    return done.stdout


def parse_fio(output: str, rw: str) -> dict[str, Any]:
    """The read or write section of fio's single job, from --output-format=json."""
    # fio may print notes before the JSON document; it starts at the first "{" line.
    start = output.find("\n{") + 1 if not output.startswith("{") else 0
    doc = json.loads(output[start:])
    job = doc["jobs"][0]
    if job.get("error"):
        raise ToolError(f"fio job error {job['error']}")
    section: dict[str, Any] = job["write" if "write" in rw else "read"]
    section["_usr_cpu"] = job.get("usr_cpu", 0.0)
    section["_sys_cpu"] = job.get("sys_cpu", 0.0)
    return section


def run_fio(w: Workload, daemon: Daemon, runtime: int, one_pass: bool = False) -> Sample:
    """`one_pass`: one pass over the image (bounded by `runtime`) instead of looping for
    `runtime` seconds, so that on an empty image every write lands on fresh clusters."""
    argv = [
        "fio", f"--name={w.name}", "--ioengine=nbd", f"--uri={nbd_uri(daemon.sock)}",
        f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth}", "--numjobs=1",
        f"--runtime={runtime}", "--output-format=json",
    ]  # fmt: skip
    if not one_pass:
        argv.append("--time_based")
    before = daemon.cpu()
    start = time.monotonic()
    output = run_tool(argv, timeout=runtime + 60, daemon=daemon)
    seconds = time.monotonic() - start
    daemon_cpu = daemon.cpu() - before
    sec = parse_fio(output, w.rw)
    ios = int(sec["total_ios"])
    clat = sec["clat_ns"]
    p99 = clat.get("percentile", {}).get("99.000000")
    runtime_s = float(sec["runtime"]) / 1000 or seconds
    return Sample(
        mib_s=float(sec["bw_bytes"]) / MIB,
        iops=float(sec["iops"]),
        clat_mean_us=float(clat["mean"]) / 1000,
        clat_p99_us=None if p99 is None else float(p99) / 1000,
        cpu_us_per_io=daemon_cpu / ios * 1e6 if ios else float("nan"),
        ios=ios,
        seconds=seconds,
        daemon_cpu_s=daemon_cpu,
        # fio reports its CPU use as a percentage of the job's runtime
        client_cpu_s=(float(sec["_usr_cpu"]) + float(sec["_sys_cpu"])) / 100 * runtime_s,
    )


def run_nbdcopy(
    w: Workload, daemon: Daemon, size: int, source_file: Path, runtime: float, one_pass: bool
) -> Sample:
    """Whole copies, repeated until `runtime` seconds have passed (at least one; exactly one
    when `one_pass`, e.g. a first allocation). One copy of 1 GiB lasts under a second, so a
    single one mostly measured nbdcopy's start (four connections, the extent probes) and the
    scheduler's mood; the repeats are what the fio jobs' `time_based` does."""
    uri = nbd_uri(daemon.sock)
    src, dst = (uri, "null:") if w.rw == "out" else (str(source_file), uri)
    argv = ["nbdcopy", f"--request-size={NBDCOPY_REQUEST_SIZE}", src, dst]
    before = daemon.cpu()
    client_before = os.times()
    start = time.monotonic()
    copies = 0
    while True:
        run_tool(argv, timeout=max(60.0, size / MIB / 10), daemon=daemon)  # >= 10 MiB/s
        copies += 1
        if one_pass or time.monotonic() - start >= runtime:
            break
    seconds = time.monotonic() - start
    client_after = os.times()
    daemon_cpu = daemon.cpu() - before
    ios = -(-size // NBDCOPY_REQUEST_SIZE) * copies
    client_cpu = (client_after.children_user - client_before.children_user) + (
        client_after.children_system - client_before.children_system
    )
    return Sample(
        mib_s=size * copies / MIB / seconds,
        iops=ios / seconds,
        clat_mean_us=None,
        clat_p99_us=None,
        cpu_us_per_io=daemon_cpu / ios * 1e6,
        ios=ios,
        seconds=seconds,
        daemon_cpu_s=daemon_cpu,
        client_cpu_s=client_cpu,
    )


# --- images ---------------------------------------------------------------------------------


def make_filled_file(path: Path, size: int, create_with_qemu_img: bool) -> None:
    """A fully written file of random (never all-zero) data, so no layer can skip holes."""
    if create_with_qemu_img:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "raw", str(path), str(size)],
            check=True,
            timeout=60,
        )
    block = os.urandom(MIB)
    with path.open("r+b" if path.exists() else "wb") as f:
        remaining = size
        while remaining:
            n = min(remaining, MIB)
            f.write(block[:n])
            remaining -= n


def make_qcow2(path: Path, size: int, kind: str, scratch: Path) -> None:
    """A qcow2 image: `allocated` has every cluster written with random data (converted from
    a random raw file, so each guest cluster maps to its own host cluster in order); `sparse`
    is empty, so every write is a first allocation."""
    path.unlink(missing_ok=True)
    if kind == "sparse":
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
            check=True,
            timeout=60,
        )
        return
    raw = scratch / "qcow2-source.raw"
    make_filled_file(raw, size, create_with_qemu_img=False)
    try:
        subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
            check=True,
            timeout=300,
        )
    finally:
        raw.unlink(missing_ok=True)


def make_image(args: argparse.Namespace, path: Path, size: int, scratch: Path) -> None:
    if args.format == "qcow2":
        make_qcow2(path, size, args.qcow2_image, scratch)
    else:
        make_filled_file(path, size, create_with_qemu_img=True)


# --- machine info ---------------------------------------------------------------------------


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def machine_info(commands: dict[str, list[str]]) -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "fio": first_line(["fio", "--version"]),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "qsd": first_line([*commands["qsd"], "--version"]),
        "ours_git_head": first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
    }


# --- reporting ------------------------------------------------------------------------------


def median_of(samples: Sequence[Sample], key: str) -> float | None:
    values = [v for s in samples if (v := getattr(s, key)) is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str) -> str:
    return f"{'-':>9}" if value is None else spec.format(value)


def summarise(
    results: dict[str, dict[str, list[Sample]]], targets: list[str], workloads: list[Workload]
) -> tuple[dict[str, Any], list[str]]:
    """Medians per target and workload, ratios ours/qsd, and the printed table lines."""
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    for t in targets:
        medians[t] = {
            w.name: {m[0]: median_of(results[t][w.name], m[0]) for m in METRICS}
            for w in workloads
            if results[t][w.name]
        }
    ratios: dict[str, dict[str, float | None]] = {}
    verdicts: dict[str, str] = {}
    compare = "qsd" in medians and "ours" in medians
    header = f"{'workload':22s} {'daemon':6s}" + "".join(f" {m[1]:>9s}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for w in workloads:
        shown = [t for t in targets if w.name in medians[t]]
        for i, t in enumerate(shown):
            row = medians[t][w.name]
            cells = "".join(" " + fmt(row[m[0]], m[2]) for m in METRICS)
            lines.append(f"{w.title if i == 0 else '':22s} {t:6s}{cells}")
        if compare and w.name in medians["qsd"] and w.name in medians["ours"]:
            ratio_row: dict[str, float | None] = {}
            for key, *_ in METRICS:
                a, b = medians["ours"][w.name][key], medians["qsd"][w.name][key]
                ratio_row[key] = a / b if a is not None and b else None
            ratios[w.name] = ratio_row
            cells = "".join(
                f" {'-':>9s}" if ratio_row[m[0]] is None else f" {ratio_row[m[0]]:8.2f}x"
                for m in METRICS
            )
            lines.append(f"{'':22s} {'ratio':6s}{cells}")
            if w.target_metric:
                got = ratio_row[w.target_metric]
                ok = got is not None and got >= w.target_ratio
                verdicts[w.name] = (
                    f"{w.title}: {w.target_metric} ours/qsd "
                    f"{'n/a' if got is None else f'{got:.2f}x'} (goal >= {w.target_ratio:.1f}x) "
                    f"{'MET' if ok else 'NOT MET'}"
                )
    lines.append("")
    lines.append(
        "ratios are ours/qsd; MiB/s and IOPS: higher is better; latency and CPU/IO: lower is "
        "better. Latencies are fio's completion latency (clat); nbdcopy has none."
    )
    if verdicts:
        lines.append("issue goals:")
        lines.extend(f"  {v}" for v in verdicts.values())
    return {"medians": medians, "ratios": ratios, "goals": verdicts}, lines


# --- main -----------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="NBD benchmark: ours against qemu-storage-daemon (see bench/README.md)."
    )
    parser.add_argument("--targets", default="qsd,ours", help="comma list of qsd, ours")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument("--dir", default="/dev/shm", help="tmpfs directory for the images")
    parser.add_argument(
        "--workloads",
        default=",".join(w.name for w in WORKLOADS),
        help="comma list of: " + ", ".join(w.name for w in WORKLOADS),
    )
    parser.add_argument(
        "--cache-direct", choices=["on", "off"], default=None, help="add cache.direct=on|off"
    )
    parser.add_argument(
        "--format", choices=["raw", "qcow2"], default="raw", help="format node (default raw)"
    )
    parser.add_argument(
        "--qcow2-image",
        choices=["allocated", "sparse"],
        default="allocated",
        help="qcow2: every cluster written (default), or empty and recreated for every "
        "workload so each daemon's writes allocate",
    )
    parser.add_argument(
        "--format-opts", default="", help="extra options of the format node (a=b,c=d)"
    )
    parser.add_argument("--qsd", default=shlex.join(DEFAULT_COMMANDS["qsd"]), help="qsd command")
    parser.add_argument("--ours", default=shlex.join(DEFAULT_COMMANDS["ours"]), help="our command")
    parser.add_argument("--output", type=Path, default=None, help="result JSON path")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 s jobs, 1 round, 256 MiB image"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runtime, args.repeat, args.size = 2, 1, "256M"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    commands = {"qsd": shlex.split(args.qsd), "ours": shlex.split(args.ours)}
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in commands]
    if unknown or not targets:
        sys.exit(f"unknown targets {unknown}; choose from qsd, ours")
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    if bad := [n for n in names if n not in WORKLOADS_BY_NAME]:
        sys.exit(f"unknown workloads {bad}; choose from {', '.join(WORKLOADS_BY_NAME)}")
    workloads = [WORKLOADS_BY_NAME[n] for n in names]
    for tool in ("fio", "nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    size = parse_size(args.size)
    if size % MIB:
        sys.exit("--size must be a multiple of 1 MiB")

    # SIGTERM ends us like Ctrl-C does, so the finally blocks stop every daemon.
    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)

    results: dict[str, dict[str, list[Sample]]] = {
        t: {w.name: [] for w in workloads} for t in targets
    }
    raw: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    started = datetime.datetime.now().astimezone()
    info = machine_info(commands)  # before the run, so the load average is the idle one
    if info["loadavg_at_start"][0] > 0.5:
        print(
            f"warning: load average {info['loadavg_at_start'][0]:.2f} before the run; "
            "other processes compete for the CPU and the figures will be noisy",
            flush=True,
        )
    scratch = Path(tempfile.mkdtemp(prefix="sd-nbd-bench-", dir=args.dir))
    interrupted = False
    try:
        image = scratch / "disk.img"
        source = scratch / "source.img"
        print(f"preparing {size // MIB} MiB {args.format} image in {scratch} ...", flush=True)
        make_image(args, image, size, scratch)
        if any(w.rw == "in" for w in workloads):
            make_filled_file(source, size, create_with_qemu_img=False)
        sock = scratch / "nbd.sock"
        dargs = daemon_args(image, sock, args.cache_direct, args.format, args.format_opts)
        print("daemon arguments: " + shlex.join(dargs), flush=True)
        # A sparse qcow2 image is recreated before every workload, so that each daemon's
        # writes are first allocations; otherwise one daemon run serves every workload.
        fresh = args.format == "qcow2" and args.qcow2_image == "sparse"
        batches = [[w] for w in workloads] if fresh else [workloads]
        for rnd in range(1, args.repeat + 1):
            for t in targets:  # interleaved, so drift affects both alike
                if t in failures:
                    continue
                try:
                    for batch in batches:
                        if fresh:
                            make_image(args, image, size, scratch)
                        with running_daemon(t, commands[t], dargs, sock, scratch) as daemon:
                            for w in batch:
                                if w.tool == "fio":
                                    # Writes: one pass, each a first allocation; reads of
                                    # the holes: time-based (one pass takes ~0.1 s).
                                    one_pass = fresh and "write" in w.rw
                                    s = run_fio(w, daemon, args.runtime, one_pass=one_pass)
                                else:
                                    one_pass = fresh and w.rw == "in"
                                    s = run_nbdcopy(w, daemon, size, source, args.runtime, one_pass)
                                results[t][w.name].append(s)
                                raw.append({"round": rnd, "target": t, "workload": w.name,
                                            **dataclasses.asdict(s)})  # fmt: skip
                                print(
                                    f"round {rnd} {t:5s} {w.title:22s} {s.mib_s:9.1f} MiB/s "
                                    f"{s.iops:9.0f} IOPS {s.cpu_us_per_io:7.2f} CPU us/IO",
                                    flush=True,
                                )
                except (DaemonError, ToolError) as exc:
                    failures[t] = str(exc)
                    print(f"\n*** {t} FAILED, skipped from now on:\n{exc}\n", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: daemons stopped, partial results follow", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    measured = [t for t in targets if any(results[t].values())]
    summary, lines = summarise(results, measured, workloads)
    print()
    print(
        f"medians of {args.repeat} round(s), {args.runtime} s per fio job, "
        f"{size // MIB} MiB {args.format}"
        f"{f' ({args.qcow2_image})' if args.format == 'qcow2' else ''} image on {args.dir}"
    )
    print("\n".join(lines))
    for t, msg in failures.items():
        print(f"\n{t} FAILED: {msg}")

    doc = {
        "benchmark": "nbd_bench",
        "started": started.isoformat(timespec="seconds"),
        "machine": info,
        "config": {
            "targets": targets,
            "commands": commands,
            "daemon_args": daemon_args(
                Path("IMG"), Path("SOCK"), args.cache_direct, args.format, args.format_opts
            ),
            "format": args.format,
            "qcow2_image": args.qcow2_image if args.format == "qcow2" else None,
            "repeat": args.repeat,
            "runtime_s": args.runtime,
            "size_bytes": size,
            "dir": args.dir,
            "quick": args.quick,
            "workloads": [dataclasses.asdict(w) for w in workloads],
            "nbdcopy_request_size": NBDCOPY_REQUEST_SIZE,
        },
        "samples": raw,
        **summary,
        "failures": failures,
        "interrupted": interrupted,
    }
    out = args.output
    if out is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"nbd-{started:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults written to {out}")
    if interrupted:
        return 130
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
