"""The compress filter over qcow2, exported over NBD by qsd 7.2 and by ours, side by side.

Compat ring. Each side serves its own copies of a few qcow2 flavours through a `compress`
node; the same qemu-io commands (aligned, unaligned, incompressible, repeated writes, zero
writes) run against both. Compared: qemu-io's output and status, `qemu-img check` of each image
and the image bytes themselves (single-cluster writes are deterministic in qsd, so ours must
pack and compress exactly as it does), and `qemu-img compare` between the sides. The QMP and
command-line refusals are compared too. Every daemon is stopped by PID.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.compat.harness import Cmd, Compat
from tests.integration.daemon import (
    REFERENCE_BINARY,
    DaemonProcess,
    ours_command,
    reference_command,
    run_cli,
)

TOOLS = ("qemu-io", "qemu-img", REFERENCE_BINARY)
pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS), reason="qemu-io/qemu-img/qsd missing"
    ),
]

KiB = 1024
# name -> (qemu-img create options, cluster size)
FLAVOURS: dict[str, tuple[str, int]] = {
    "zlib": ("compression_type=zlib", 64 * KiB),
    "zstd": ("compression_type=zstd,extended_l2=on", 64 * KiB),
    "small": ("cluster_size=4096,refcount_bits=1", 4 * KiB),
    "v2": ("compat=0.10", 64 * KiB),
}
CLUSTERS = 24


def chunks(d: Path, cs: int) -> list[Path]:
    """Data files: compressible to various sizes (some spill over host clusters) and one
    incompressible; the same seed on both sides."""
    rng = random.Random(cs)
    out = []
    for number, noise in enumerate((0, cs // 2, cs * 9 // 10, cs * 9 // 10, cs, cs // 5)):
        path = d / f"chunk{cs}-{number}"
        path.write_bytes(rng.randbytes(noise) + bytes([number + 1]) * (cs - noise))
        out.append(path)
    return out


def commands(d: Path, cs: int) -> list[str]:
    c = chunks(d, cs)
    return [
        f"write -s {c[0]} 0 {cs}",
        f"write -s {c[1]} {cs} {cs}",
        f"write -s {c[2]} {5 * cs} {cs}",
        f"write -s {c[3]} {3 * cs} {cs}",
        f"write -s {c[4]} {7 * cs} {cs}",  # incompressible: a normal cluster
        f"write -s {c[4]} {7 * cs} {cs}",  # ... overwritten in place
        f"write -s {c[5]} {2 * cs} {cs}",
        f"write -P 0x5a {9 * cs + 100} 300",  # unaligned: read-modify-write of one cluster
        f"write -P 0x5b {cs + 512} 512",  # over a compressed cluster: EIO
        f"write -z {11 * cs} {cs}",
        f"write -P 0x5c {11 * cs} {cs}",  # over a zero cluster: compressed
        f"write -s {c[2]} {13 * cs} {cs}",
        f"read -P 0x5a {9 * cs + 100} 300",
    ]


def normalise(text: str, d: Path) -> list[str]:
    text = text.replace(str(d), "$D")
    return [line for line in text.splitlines() if not re.search(r"ops; |ops/sec", line)]


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[dict[str, tuple[Path, Path]]]:
    """side -> (dir, NBD socket), each daemon serving its own images through compress nodes."""
    out: dict[str, tuple[Path, Path]] = {}
    with ExitStack() as stack:
        for side, command in (("ours", ours_command()), ("reference", reference_command())):
            d = tmp_path / side
            d.mkdir()
            sock = d / "nbd.sock"
            args = ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
            for name, (opts, cs) in FLAVOURS.items():
                image = d / f"{name}.qcow2"
                subprocess.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(image),
                     str(CLUSTERS * cs)],
                    check=True,
                )  # fmt: skip
                args += [
                    "--blockdev", f"driver=file,node-name=f-{name},filename={image}",
                    "--blockdev", f"driver=qcow2,node-name=q-{name},file=f-{name}",
                    "--blockdev", f"driver=compress,node-name={name},file=q-{name}",
                    "--export", f"type=nbd,id=e-{name},node-name={name},name={name},writable=on",
                ]  # fmt: skip
            proc = DaemonProcess(command, args, d, monitor="none").start()
            stack.callback(proc.stop)
            assert proc.wait_ready(20), proc.stderr
            out[side] = (d, sock)
        yield out


def test_compressed_writes_over_nbd_match_qsd(sides: dict[str, tuple[Path, Path]]) -> None:
    seen: dict[str, dict[str, object]] = {}
    for side, (d, sock) in sides.items():
        results: dict[str, object] = {}
        for name, (_opts, cs) in FLAVOURS.items():
            argv = ["qemu-io", "-f", "raw"]
            for cmd in commands(d, cs):
                argv += ["-c", cmd]
            argv.append(f"nbd+unix:///{name}?socket={sock}")
            io_out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            results[name] = (io_out.returncode, normalise(io_out.stdout + io_out.stderr, d))
        seen[side] = results
    for side, (d, _sock) in sides.items():
        for name in FLAVOURS:
            out = subprocess.run(
                ["qemu-img", "check", "-U", str(d / f"{name}.qcow2")],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            seen[side][f"check-{name}"] = (out.returncode, out.stdout, out.stderr)
    assert seen["ours"] == seen["reference"]
    # Both sides' images hold the same guest data and, cluster by cluster, the same bytes.
    ours_dir, ref_dir = sides["ours"][0], sides["reference"][0]
    for name in FLAVOURS:
        ours_img, ref_img = ours_dir / f"{name}.qcow2", ref_dir / f"{name}.qcow2"
        out = subprocess.run(
            ["qemu-img", "compare", "-U", str(ours_img), str(ref_img)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, (name, out.stdout, out.stderr)
        assert ours_img.read_bytes() == ref_img.read_bytes(), name


def make_images(d: Path) -> None:
    with open(d / "a.raw", "wb") as handle:
        handle.truncate(1 << 20)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(d / "q.qcow2"), "1M"], check=True
    )
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(d / "odd.qcow2"), "100k"], check=True
    )


def test_compress_filter_qmp_transcript(compat: Compat) -> None:
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "$D/a.raw"}),
            Cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"}),
            Cmd("blockdev-add", {"driver": "compress", "node-name": "c0", "file": "r"}),
            Cmd(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "q",
                    "file": {"driver": "file", "filename": "$D/q.qcow2"},
                },
            ),
            Cmd("blockdev-add", {"driver": "compress", "node-name": "c1", "file": "q"}),
            Cmd("blockdev-add", {"driver": "compress", "node-name": "c2", "file": "c1"}),
            Cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "$D/n.sock"}}}),
            Cmd(
                "block-export-add", {"type": "nbd", "id": "e1", "node-name": "c1", "writable": True}
            ),
            Cmd("block-export-del", {"id": "e1"}),
            Cmd(
                "blockdev-add",
                {
                    "driver": "compress",
                    "node-name": "c3",
                    "file": {
                        "driver": "qcow2",
                        "file": {"driver": "file", "filename": "$D/odd.qcow2"},
                    },
                },
            ),
            Cmd(
                "block-export-add", {"type": "nbd", "id": "e2", "node-name": "c3", "writable": True}
            ),
            Cmd("block-export-add", {"type": "nbd", "id": "e3", "node-name": "c3"}),
            Cmd("blockdev-del", {"node-name": "c2"}),
            Cmd("blockdev-del", {"node-name": "c1"}),
        ],
        setup=make_images,
    )


def test_writable_export_of_a_partial_cluster_image_is_refused(tmp_path: Path) -> None:
    results = {}
    for side, command in (("ours", ours_command()), ("reference", reference_command())):
        d = tmp_path / side
        d.mkdir()
        make_images(d)
        args = [
            "--blockdev", f"driver=file,filename={d / 'odd.qcow2'},node-name=f",
            "--blockdev", "driver=qcow2,file=f,node-name=q",
            "--blockdev", "driver=compress,file=q,node-name=c",
            "--nbd-server", f"addr.type=unix,addr.path={d / 'n.sock'}",
            "--export", "type=nbd,id=e,node-name=c,writable=on",
        ]  # fmt: skip
        result = run_cli(command, args, d)
        last = result.stderr.strip().splitlines()[-1].split(": ", 1)[1].replace(str(d), "$D")
        results[side] = (result.exit_status, last)
    assert results["ours"] == results["reference"]
    assert os.path.exists(tmp_path / "ours" / "odd.qcow2")
