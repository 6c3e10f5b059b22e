"""qcow2 images of every flavour served over NBD by our daemon and by qsd 7.2, side by side.

Integration ring: images are made by qemu-img/qemu-io (cluster sizes 512..2M, refcount widths,
v2/v3, extended L2, zlib/zstd compression, lazy refcounts, a depth-3 backing chain, internal
snapshots). One daemon per side exports all of them (one process each keeps this fast). Reads:
`nbdinfo --map` and `--map=qemu:allocation-depth` must equal qsd's, the data must equal the
image file (`qemu-img compare`). Writes: the same qemu-io commands on both sides, then each
image must pass `qemu-img check` and equal the image qsd produced. Daemons stopped by PID.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.daemon import REFERENCE_BINARY, ours_command, reference_command
from tests.integration.test_nbd_clients import daemon, run, uri

TOOLS = ("nbdinfo", "qemu-io", "qemu-img", REFERENCE_BINARY)
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS), reason="NBD client tools not installed"
)

MiB = 1 << 20
SIZE = 8 * MiB

# name -> (qemu-img create options, qemu-img convert -c compression type or None)
FLAVOURS: dict[str, tuple[str, str | None]] = {
    "v3": ("compat=1.1", None),
    "c512rb1": ("cluster_size=512,refcount_bits=1", None),
    "c2m": ("cluster_size=2M", None),
    "v2": ("compat=0.10", None),
    "extl2": ("extended_l2=on,cluster_size=64k", None),
    "zlib": ("compression_type=zlib", "zlib"),
    "zstd": ("compression_type=zstd", "zstd"),
    "lazy": ("lazy_refcounts=on", None),
    "rb64": ("refcount_bits=64,cluster_size=4k", None),
    "chain": ("", None),  # top of base <- mid <- top
    "snap": ("", None),  # internal snapshot, then more writes
}

SEED_WRITES = [
    "write -P 0x11 0 192k",
    "write -P 0x22 1000 5000",
    "write -z 256k 64k",
    "write -P 0x33 3M 1M",
    "write -P 0x44 7M 12k",
]

# Guest writes over NBD: aligned, unaligned across clusters/subclusters, zeroes, discards.
NBD_WRITES = [
    "write -P 0xa1 0 4k",
    "write -P 0xb2 1000 70000",
    "write -z 200k 300k",
    "discard 1M 512k",
    "write -P 0xc3 2047k 4k",
    "write -z -u 3M 128k",
    "write -P 0xd4 3100k 2k",
    "write -P 0xe5 8188k 4k",
    "discard 7M 64k",
]


def qemu_io(image: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(image))


def make_flavour(d: Path, name: str) -> Path:
    opts, compress = FLAVOURS[name]
    image = d / f"{name}.qcow2"
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if name == "chain":
        base, mid = d / "chain-base.qcow2", d / "chain-mid.qcow2"
        run(*create, str(base), str(SIZE))
        qemu_io(base, "write -P 0x01 0 2M", "write -P 0x02 5M 1M")
        run(*create, "-b", base.name, "-F", "qcow2", str(mid))
        qemu_io(mid, "write -P 0x03 1M 2M", "write -z 5M 64k")
        run(*create, "-b", mid.name, "-F", "qcow2", str(image))
        qemu_io(image, "write -P 0x04 1536k 1M", "discard 2M 64k")
        return image
    if compress is not None:
        raw = d / f"{name}.raw"
        run("qemu-img", "create", "-q", "-f", "raw", str(raw), str(SIZE))
        qemu_io(raw, *SEED_WRITES, fmt="raw")
        run("qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o", opts, str(raw), str(image))
        raw.unlink()
        return image
    run(*create, *(["-o", opts] if opts else []), str(image), str(SIZE))
    qemu_io(image, *SEED_WRITES)
    if name == "snap":
        run("qemu-img", "snapshot", "-c", "s1", str(image))
        qemu_io(image, "write -P 0x55 0 64k", "write -P 0x66 4M 128k")
    return image


def export_args(d: Path, sock: Path) -> list[str]:
    args = ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
    for name in FLAVOURS:
        image = d / f"{name}.qcow2"
        args += [
            "--blockdev",
            f"driver=qcow2,node-name={name},file.driver=file,file.filename={image}",
            "--export",
            f"type=nbd,id=e-{name},node-name={name},name={name},writable=on,allocation-depth=on",
        ]
    return args


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qcow2-flavours")
    for name in FLAVOURS:
        make_flavour(d, name)
    return d


@pytest.fixture
def pair(template: Path, tmp_path: Path) -> Iterator[dict[str, tuple[Path, Path]]]:
    """side -> (image dir, NBD socket): each daemon serves its own copy of every image."""
    out: dict[str, tuple[Path, Path]] = {}
    with ExitStack() as stack:
        for side, command in (("ours", ours_command()), ("reference", reference_command())):
            d = tmp_path / side
            shutil.copytree(template, d)
            sock = d / "nbd.sock"
            stack.enter_context(daemon(command, d, export_args(d, sock)))
            out[side] = (d, sock)
        yield out


def nbdinfo_map(sock: Path, name: str, context: str | None = None) -> str:
    flag = "--map" if context is None else f"--map={context}"
    return run("nbdinfo", flag, uri(sock, name)).stdout


def compare_nbd_with_file(sock: Path, name: str, image: Path) -> None:
    result = run(
        "qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", uri(sock, name), str(image),
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


def test_reads_match_qsd(pair: dict[str, tuple[Path, Path]]) -> None:
    (ours_dir, ours_sock), (_, ref_sock) = pair["ours"], pair["reference"]
    for name in FLAVOURS:
        assert nbdinfo_map(ours_sock, name) == nbdinfo_map(ref_sock, name), name
        depth = "qemu:allocation-depth"
        assert nbdinfo_map(ours_sock, name, depth) == nbdinfo_map(ref_sock, name, depth), name
        compare_nbd_with_file(ours_sock, name, ours_dir / f"{name}.qcow2")


def test_writes_match_qsd(pair: dict[str, tuple[Path, Path]]) -> None:
    for _side, (_d, sock) in pair.items():
        for name in FLAVOURS:
            args = ["qemu-io", "-f", "raw"]
            for c in NBD_WRITES:
                args += ["-c", c]
            run(*args, uri(sock, name))
    (ours_dir, ours_sock), (ref_dir, ref_sock) = pair["ours"], pair["reference"]
    for name in FLAVOURS:
        assert nbdinfo_map(ours_sock, name) == nbdinfo_map(ref_sock, name), name
        compare_nbd_with_file(ours_sock, name, ref_dir / f"{name}.qcow2")
    for name in FLAVOURS:
        image = ours_dir / f"{name}.qcow2"
        check = run("qemu-img", "check", "-U", str(image), check=False)
        assert check.returncode == 0, f"{name}: {check.stdout}{check.stderr}"
        result = run(
            "qemu-img", "compare", "-U", str(image), str(ref_dir / f"{name}.qcow2"),
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
