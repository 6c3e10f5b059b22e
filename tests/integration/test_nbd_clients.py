"""Real NBD clients against our daemon (a subprocess), compared with qsd 7.2 on the same image.

Integration ring: nbdinfo, qemu-io, qemu-img, nbdcopy and fio talk to `python -m
storage_daemon` exactly as they talk to qemu-storage-daemon; where a test says so, the same
commands run against the reference on an identical image and the outputs (normalised socket
paths) or the resulting images must be equal. Every daemon is stopped by PID.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.integration.daemon import (
    REFERENCE_BINARY,
    DaemonProcess,
    ours_command,
    reference_command,
)

TOOLS = ("nbdinfo", "nbdcopy", "qemu-io", "qemu-img", "fio", REFERENCE_BINARY)
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS), reason="NBD client tools not installed"
)

MiB = 1 << 20
SIZE = 64 * MiB


def make_image(path: Path, size: int = SIZE) -> Path:
    """Sparse raw image with data at 0-1 MiB, 5 MiB+4 KiB and 32-33 MiB (as in the research);
    the same bytes every time, so two sides can start from identical images."""
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(rng.randbytes(MiB))
        f.seek(5 * MiB)
        f.write(b"\x5a" * 4096)
        f.seek(32 * MiB)
        f.write(rng.randbytes(MiB))
    return path


def export_args(image: Path, sock: Path, *extra: str, writable: bool = True) -> list[str]:
    return [
        "--blockdev",
        f"driver=file,node-name=file0,filename={image}",
        "--blockdev",
        "driver=raw,node-name=disk0,file=file0",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        f"type=nbd,id=exp0,node-name=disk0,name=disk0,writable={'on' if writable else 'off'}",
        *extra,
    ]


@contextmanager
def daemon(command: Sequence[str], workdir: Path, args: Sequence[str]) -> Iterator[DaemonProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = DaemonProcess(command, args, workdir, monitor="none").start()
    try:
        if not proc.wait_ready(20):
            raise AssertionError(f"daemon exited {proc.returncode}: {proc.stderr}")
        yield proc
    finally:
        proc.stop()


def uri(sock: Path, name: str = "disk0") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def run(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}): {result.stderr}")
    return result


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, tuple[Path, Path]]]:
    """Ours and the reference, each exporting its own copy of the same image."""
    out: dict[str, tuple[Path, Path]] = {}
    with ExitStack() as stack:
        for side, command in (("ours", ours_command()), ("reference", reference_command())):
            d = tmp_path / side
            d.mkdir()
            image = make_image(d / "disk.img")
            sock = d / "nbd.sock"
            extra = [
                "--export",
                "type=nbd,id=exp1,node-name=disk0,name=depth,description=second,"
                "allocation-depth=on",
            ]
            stack.enter_context(daemon(command, d, export_args(image, sock, *extra)))
            out[side] = (image, sock)
        yield out


def same(pair: dict[str, tuple[Path, Path]], *argv: str) -> str:
    """Run `argv` (with {URI}, {URI2}, {SOCK} placeholders) on both sides; outputs must match."""
    outputs = {}
    for side, (_, sock) in pair.items():
        args = [
            a.replace("{URI}", uri(sock))
            .replace("{URI2}", uri(sock, "depth"))
            .replace("{SOCK}", str(sock))
            for a in argv
        ]
        result = run(*args)
        outputs[side] = result.stdout.replace(str(sock), "SOCK")
    assert outputs["ours"] == outputs["reference"]
    return outputs["ours"]


def test_nbdinfo_matches_reference(pair: dict[str, tuple[Path, Path]]) -> None:
    info = json.loads(same(pair, "nbdinfo", "--json", "{URI}"))
    assert info["exports"][0]["export-size"] == SIZE
    listing = json.loads(same(pair, "nbdinfo", "--list", "--json", "{URI}"))
    assert [e["export-name"] for e in listing["exports"]] == ["disk0", "depth"]
    assert json.loads(same(pair, "nbdinfo", "--json", "{URI2}"))["exports"][0]["contexts"] == [
        "base:allocation",
        "qemu:allocation-depth",
    ]
    holes = same(pair, "nbdinfo", "--map", "{URI}")
    assert "hole,zero" in holes and "data" in holes
    same(pair, "nbdinfo", "--map=qemu:allocation-depth", "{URI2}")
    for flag in ("flush", "fua", "trim", "zero", "fast-zero", "cache", "df", "multi-conn"):
        same(pair, "sh", "-c", f"nbdinfo --can {flag} '{{URI}}'; echo $?")


QEMU_IO_SCRIPT = [
    "write -P 0x11 0 64k",
    "write -P 0x22 4095 3",
    "write -P 0x33 1048575 131073",
    "write -z 2M 1M",
    "write -z 65537 511",
    "write -z -u 33M 1M",
    "discard 40M 1M",
    "write -P 0x44 -f 50M 4k",
    "flush",
    "read -P 0x33 1048575 131073",
    "read -P 0 2M 1M",
]


def test_qemu_io_writes_match_reference(pair: dict[str, tuple[Path, Path]]) -> None:
    for _, sock in pair.values():
        args = ["qemu-io", "-f", "raw"]
        for line in QEMU_IO_SCRIPT:
            args += ["-c", line]
        result = run(*args, uri(sock))
        assert "error" not in result.stdout.lower() + result.stderr.lower(), result
    ours, ref = pair["ours"][0], pair["reference"][0]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(ours), str(ref))
    # Reading back through each server gives the same bytes as well.
    same(pair, "qemu-img", "compare", "-f", "raw", "-F", "raw", "{URI}", str(ref))


def test_nbdcopy_round_trip(tmp_path: Path) -> None:
    source = make_image(tmp_path / "src.img")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    sock = tmp_path / "nbd.sock"
    with daemon(ours_command(), tmp_path / "d", export_args(image, sock)):
        run("nbdcopy", "--flush", str(source), uri(sock))
        back = tmp_path / "back.img"
        run("nbdcopy", uri(sock), str(back))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), str(image))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), str(back))


def test_fio_verify_two_connections(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    sock = tmp_path / "nbd.sock"
    with daemon(ours_command(), tmp_path / "d", export_args(image, sock)):
        result = run(
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={uri(sock)}",
            "--rw=randwrite",
            "--bs=4k",
            "--bsrange=512-64k",
            "--size=16M",
            "--numjobs=2",
            "--offset_increment=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",  # no state files left in the working directory
            "--group_reporting",
            "--output-format=json",
            timeout=120,
        )
    report = json.loads(result.stdout[result.stdout.index("{") :])
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 32 * MiB


def _lock_bytes(path: Path) -> list[str]:
    ino = os.stat(path).st_ino
    ranges = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[5].endswith(f":{ino}"):
            ranges.append(f"{fields[1]} {fields[3]} {fields[6]}-{fields[7]}")
    return sorted(ranges)


@pytest.mark.parametrize("writable", [True, False])
def test_locks_match_reference(tmp_path: Path, writable: bool) -> None:
    """Lock bytes and what other QEMU tools see while the image is exported."""
    seen: dict[str, list[object]] = {}
    for side, command in (("ours", ours_command()), ("reference", reference_command())):
        d = tmp_path / side
        d.mkdir()
        image = make_image(d / "disk.img", MiB)
        sock = d / "nbd.sock"
        with daemon(command, d, export_args(image, sock, writable=writable)):
            record: list[object] = [_lock_bytes(image)]
            for argv in (
                ["qemu-img", "info", "--output=json", str(image)],
                ["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", str(image)],
                ["qemu-img", "resize", "-f", "raw", str(image), "2M"],
            ):
                result = run(*argv, check=False)
                record.append((result.returncode, result.stderr.replace(str(image), "IMG")))
            seen[side] = record
    assert seen["ours"] == seen["reference"]
