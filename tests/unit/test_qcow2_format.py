"""qcow2 codecs: header checks with QEMU's exact texts (compared live with `qemu-img info`),
refcount packing for every width, and a fuzzer: any header gives a clean error or a header."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.blockdev.drivers.qcow2 import format as fmt

HAVE_QEMU = shutil.which("qemu-img") is not None


def make_image(path: Path, *opts: str, backing: Path | None = None) -> bytes:
    cmd = ["qemu-img", "create", "-f", "qcow2"]
    if opts:
        cmd += ["-o", ",".join(opts)]
    if backing is not None:
        cmd += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*cmd, str(path), "1M"], check=True, capture_output=True)
    return path.read_bytes()


def patch(data: bytes, *changes: tuple[int, str, int]) -> bytes:
    buf = bytearray(data)
    for offset, code, value in changes:
        struct.pack_into(code, buf, offset, value)
    return bytes(buf)


def ours(data: bytes) -> str:
    hdr = fmt.parse_fixed_header(data)
    cluster0 = data[: hdr.cluster_size].ljust(hdr.cluster_size, b"\0")
    try:
        hdr = fmt.parse_header(cluster0)
        fmt.parse_extensions(cluster0, hdr)
    except fmt.FormatError as err:
        return str(err)
    return ""


def qemu(path: Path) -> str:
    out = subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", str(path)], capture_output=True, text=True
    )
    if out.returncode == 0:
        return ""
    prefix = f"qemu-img: Could not open '{path}': "
    first = out.stderr.splitlines()[0]
    assert first.startswith(prefix), first
    return first[len(prefix) :]


HOSTILE: list[tuple[str, tuple[tuple[int, str, int], ...]]] = [
    ("version4", ((4, ">I", 4),)),
    ("version1", ((4, ">I", 1),)),
    ("cluster_bits8", ((20, ">I", 8),)),
    ("cluster_bits22", ((20, ">I", 22),)),
    ("cluster_bits_max", ((20, ">I", 0xFFFFFFFF),)),
    ("unknown_incompat", ((72, ">Q", 1 << 5),)),
    ("unknown_incompat_many", ((72, ">Q", (1 << 5) | (1 << 40)),)),
    ("refcount_order7", ((96, ">I", 7),)),
    ("header_short", ((100, ">I", 100),)),
    ("header_long", ((100, ">I", 70000),)),
    ("backing_offset", ((8, ">Q", 70000),)),
    ("backing_offset_end", ((8, ">Q", 65530), (16, ">I", 10))),
    ("no_reftable", ((56, ">I", 0),)),
    ("reftable_big", ((56, ">I", 200),)),
    ("reftable_unaligned", ((48, ">Q", 12345),)),
    ("reftable_overflow", ((48, ">Q", (1 << 63) - 65536),)),
    ("l1_unaligned", ((40, ">Q", 12345),)),
    ("l1_too_large", ((36, ">I", (1 << 22) + 1),)),
    ("l1_too_small", ((36, ">I", 0),)),
    ("too_big", ((24, ">Q", 1 << 62),)),
    ("snapshots_many", ((60, ">I", 65537),)),
    ("snapshots_unaligned", ((60, ">I", 1), (64, ">Q", 123))),
    ("crypt3", ((32, ">I", 3),)),
    ("compression_type2", ((104, ">B", 2),)),
    ("compression_bit_missing", ((104, ">B", 1),)),
    ("compression_bit_extra", ((72, ">Q", 8),)),
    ("order_backing_vs_compression", ((72, ">Q", 8), (8, ">Q", 70000))),
    ("order_crypt_vs_reftable", ((32, ">I", 3), (56, ">I", 0))),
    ("order_l1_offset_vs_small", ((40, ">Q", 3), (36, ">I", 0))),
    ("order_snapshots_vs_l1", ((36, ">I", 0), (60, ">I", 70000))),
    ("order_big_vs_offset", ((24, ">Q", 1 << 62), (40, ">Q", 3))),
]


@pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img")
@pytest.mark.parametrize(("name", "changes"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_header_messages_match_qemu(
    tmp_path: Path, name: str, changes: tuple[tuple[int, str, int], ...]
) -> None:
    good = make_image(tmp_path / "good.qcow2")
    bad = patch(good, *changes)
    path = tmp_path / f"{name}.qcow2"
    path.write_bytes(bad)
    expected = qemu(path)
    assert expected, "qemu-img accepted the image"
    try:
        got = ours(bad)
    except fmt.FormatError as err:
        got = str(err)
    assert got == expected


@pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img")
@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("backing_name_long", ((16, ">I", 2000),)),
        ("ext_too_large", ((116, ">I", 0xFFFF),)),
        ("backing_format_long", ((116, ">I", 300),)),
        ("named_feature", ((72, ">Q", 1 << 5),)),
    ],
)
def test_hostile_extensions_match_qemu(
    tmp_path: Path, name: str, changes: tuple[tuple[int, str, int], ...]
) -> None:
    base = tmp_path / "base.qcow2"
    make_image(base)
    good = make_image(tmp_path / "top.qcow2", backing=base)
    bad = patch(good, *changes)
    path = tmp_path / f"{name}.qcow2"
    path.write_bytes(bad)
    assert ours(bad) == qemu(path)


def _bitmaps_ext_offset(data: bytes) -> int:
    offset = 112
    while struct.unpack_from(">I", data, offset)[0] != fmt.EXT_BITMAPS:
        offset += 8 + ((struct.unpack_from(">I", data, offset + 4)[0] + 7) & ~7)
    return offset


@pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img")
@pytest.mark.parametrize(
    ("name", "ext_changes", "autoclear"),
    [
        ("reserved", ((12, ">I", 3),), 1),
        ("length32", ((4, ">I", 32),), 1),
        ("length8_no_autoclear", ((4, ">I", 8),), 0),  # the length is checked first
        ("length24_no_autoclear", (), 0),  # accepted: the bitmaps are merely inconsistent
    ],
)
def test_bitmaps_extension_checks_match_qemu(
    tmp_path: Path, name: str, ext_changes: tuple[tuple[int, str, int], ...], autoclear: int
) -> None:
    path = tmp_path / f"{name}.qcow2"
    make_image(path)
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "b1"], check=True)
    good = path.read_bytes()
    ext = _bitmaps_ext_offset(good)
    bad = patch(good, *((ext + at, code, value) for at, code, value in ext_changes))
    path.write_bytes(patch(bad, (88, ">Q", autoclear)))
    assert ours(path.read_bytes()) == qemu(path)


def test_backing_name_ends_at_a_nul(tmp_path: Path) -> None:
    """qsd reads the name as a C string: a NUL counted in backing_file_size ends it."""
    base = tmp_path / "base.qcow2"
    make_image(base)
    data = make_image(tmp_path / "top.qcow2", backing=base)
    hdr = fmt.parse_fixed_header(data)
    data = patch(data, (16, ">I", hdr.backing_file_size + 1))
    cluster0 = data[: hdr.cluster_size]
    hdr = fmt.parse_header(cluster0)
    fmt.parse_extensions(cluster0, hdr)
    assert hdr.backing_file == str(base)


def test_not_qcow2() -> None:
    with pytest.raises(fmt.FormatError, match=r"^Image is not in qcow2 format$"):
        fmt.parse_fixed_header(bytes(512))


def test_subcluster_size_checked() -> None:
    hdr = fmt.Header(3, 0, 0, 13, 1 << 20, 0, 1, 3 << 13, 1 << 13, 1, 0, 0)
    hdr.incompatible = fmt.INCOMPAT_EXTL2
    hdr.header_length = 112
    data = fmt.header_field_bytes(hdr).ljust(1 << 13, b"\0")
    with pytest.raises(fmt.FormatError, match=r"^Unsupported subcluster size: 256$"):
        fmt.parse_header(data)


@pytest.mark.parametrize("order", range(7))
def test_refcount_packing_roundtrip(order: int) -> None:
    block = bytearray(512)
    entries = len(block) * 8 >> order
    top = fmt.refcount_max(order)
    values = [(i * 2654435761) & top for i in range(entries)]
    for i, v in enumerate(values):
        fmt.refcount_set(block, i, order, v)
    assert [fmt.refcount_get(block, i, order) for i in range(entries)] == values
    first_zero = next((i for i, v in enumerate(values) if v == 0), -1)
    assert fmt.first_free(block, 0, order) == first_zero


def test_compressed_span() -> None:
    bits = 16
    shift = 62 - (bits - 8)
    raw = fmt.OFLAG_COMPRESSED | (3 << shift) | 0x12345
    offset, span = fmt.compressed_span(raw, bits)
    assert offset == 0x12345
    assert span == 4 * 512 - (0x12345 & 511)


_BASE = fmt.header_field_bytes(
    fmt.Header(3, 0, 0, 16, 1 << 20, 0, 1, 3 << 16, 1 << 16, 1, 0, 0, header_length=112)
).ljust(1 << 16, b"\0")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), min_size=1, max_size=12),
)
def test_fuzzed_headers_fail_cleanly(changes: list[tuple[int, int]]) -> None:
    data = bytearray(_BASE)
    for pos, value in changes:
        data[pos] = value
    try:
        hdr = fmt.parse_fixed_header(bytes(data))
        cluster0 = bytes(data[: hdr.cluster_size]).ljust(hdr.cluster_size, b"\0")
        hdr = fmt.parse_header(cluster0)
        fmt.parse_extensions(cluster0, hdr)
    except fmt.FormatError:
        return
    # Accepted headers stay within QEMU's table limits.
    assert hdr.l1_size * 8 <= fmt.MAX_L1_SIZE
    assert hdr.refcount_table_clusters * hdr.cluster_size <= fmt.MAX_REFTABLE_SIZE
    assert hdr.nb_snapshots <= fmt.MAX_SNAPSHOTS
    assert 9 <= hdr.cluster_bits <= 21
