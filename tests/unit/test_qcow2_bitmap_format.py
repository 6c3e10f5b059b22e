"""Unit tests of the qcow2 bitmap directory codec and of the packed on-disk form of the bits.

Pure-core tests (no I/O): parse_directory / pack_directory (with qsd's texts for broken
directories and entries, measured on qsd 7.2), table_entries and _check_placement of
drivers/qcow2/bitmaps.py, Bits.packed / load_packed of bitmaps/core.py. Expected bytes are
built here from the format description (docs/interop/qcow2.txt), never from the code under test.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.blockdev.bitmaps.core import Bits
from storage_daemon.blockdev.drivers.qcow2.bitmaps import (
    AUTO,
    EXTRA_DATA_COMPATIBLE,
    IN_USE,
    BitmapFormatError,
    StoredBitmap,
    _check_placement,
    entry_size,
    pack_directory,
    parse_directory,
    table_entries,
)

CS = 65536
LENGTH = 16 << 20

# --- directory ---------------------------------------------------------------------------------


def raw_entry(
    name: bytes,
    *,
    offset: int = 0x30000,
    table_size: int = 1,
    flags: int = AUTO,
    kind: int = 1,
    gbits: int = 16,
    extra: bytes = b"",
) -> bytes:
    """One directory entry laid out by hand: the fixed 24 bytes, extra data, name, padding."""
    fixed = (
        offset.to_bytes(8, "big")
        + table_size.to_bytes(4, "big")
        + flags.to_bytes(4, "big")
        + bytes([kind, gbits])
        + len(name).to_bytes(2, "big")
        + len(extra).to_bytes(4, "big")
    )
    body = fixed + extra + name
    return body + bytes(-len(body) % 8)


def test_entry_layout_matches_the_format() -> None:
    entry = StoredBitmap("b0", 0x50000, 3, IN_USE | AUTO, 16)
    raw = pack_directory([entry])
    assert raw == raw_entry(b"b0", offset=0x50000, table_size=3, flags=IN_USE | AUTO)
    assert len(raw) == 32  # 24 + 2, padded to 8
    assert raw[24:26] == b"b0" and raw[26:] == bytes(6)


@pytest.mark.parametrize("name_len", [1, 6, 7, 8, 9, 15, 16, 17, 255, 1023])
@pytest.mark.parametrize("extra_len", [0, 1, 8, 13])
def test_entry_size_and_padding(name_len: int, extra_len: int) -> None:
    name = "n" * name_len
    extra = bytes(range(extra_len))
    flags = EXTRA_DATA_COMPATIBLE if extra else 0
    entry = StoredBitmap(name, 0x10000, 2, flags, 9, extra)
    raw = pack_directory([entry])
    assert len(raw) % 8 == 0
    assert len(raw) == entry_size(name_len, extra_len)
    assert len(raw) - (24 + extra_len + name_len) in range(8)
    assert raw == raw_entry(
        name.encode(), offset=0x10000, table_size=2, flags=flags, gbits=9, extra=extra
    )
    assert parse_directory(raw, 1) == [entry]


names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
    min_size=1,
    max_size=40,
)
# Entries qsd accepts: extra data only with extra_data_compatible, tables of at most 512 MiB
# of bitmap data at 512-byte clusters.
plain = st.builds(
    StoredBitmap,
    name=names,
    table_offset=st.integers(0, (1 << 56) - 1).map(lambda v: v & ~0xFFFF),
    table_size=st.integers(0, 0x20000000 // 512),
    flags=st.sampled_from([0, IN_USE, AUTO, IN_USE | AUTO]),
    granularity_bits=st.integers(9, 31),
    extra_data=st.just(b""),
    type=st.just(1),
)
with_extra = st.builds(
    StoredBitmap,
    name=names,
    table_offset=st.just(0x10000),
    table_size=st.just(1),
    flags=st.just(AUTO | EXTRA_DATA_COMPATIBLE),
    granularity_bits=st.integers(9, 31),
    extra_data=st.binary(max_size=20),
    type=st.just(1),
)
entries = plain | with_extra


@given(st.lists(entries, max_size=12))
def test_directory_round_trip(items: list[StoredBitmap]) -> None:
    raw = pack_directory(items)
    assert len(raw) == sum(entry_size(len(e.name.encode()), len(e.extra_data)) for e in items)
    assert parse_directory(raw, len(items)) == items
    # Entries follow each other, each starting 8-aligned with its table offset.
    pos = 0
    for e in items:
        assert struct.unpack_from(">Q", raw, pos)[0] == e.table_offset
        pos += entry_size(len(e.name.encode()), len(e.extra_data))


def test_parse_rejects_broken_directories_with_qsds_texts() -> None:
    one = raw_entry(b"abc")
    two = one + raw_entry(b"defghijkl")
    assert [e.name for e in parse_directory(two, 2)] == ["abc", "defghijkl"]
    with pytest.raises(BitmapFormatError, match=r"^Less bitmaps found than specified"):
        parse_directory(one, 2)  # header says two entries, one present
    with pytest.raises(BitmapFormatError, match=r"^More bitmaps found than specified"):
        parse_directory(two, 1)
    with pytest.raises(BitmapFormatError, match=r"^Broken bitmap directory$"):
        parse_directory(one[:20], 1)  # not even the fixed part
    with pytest.raises(BitmapFormatError, match=r"^Broken bitmap directory$"):
        parse_directory(two[:-8], 2)  # the second name runs past the end
    with pytest.raises(BitmapFormatError, match=r"^Broken bitmap directory$"):
        parse_directory(one + bytes(8), 1)  # 8 bytes left: no room for an entry
    assert parse_directory(b"", 0) == []


@pytest.mark.parametrize(
    "fields",
    [
        {"gbits": 8},
        {"gbits": 32},
        {"kind": 0},
        {"kind": 2},
        {"flags": AUTO | 1 << 3},
        {"flags": 1 << 31},
        {"offset": 0x30100},  # not even 512-aligned
        {"table_size": 0x8000001},
        {"table_size": 0x20000000 // 512 + 1},  # more than 512 MiB of bitmap data
    ],
)
def test_an_entry_outside_the_constraints_is_refused(fields: dict[str, int]) -> None:
    raw = raw_entry(b"b0", **fields)  # type: ignore[arg-type]
    with pytest.raises(BitmapFormatError, match=r"^Bitmap 'b0' doesn't satisfy the constraints$"):
        parse_directory(raw, 1)


def test_an_all_zero_entry_is_refused_by_name() -> None:
    """A directory past the end of the file reads as zeroes: an empty name, granularity 0."""
    with pytest.raises(BitmapFormatError, match=r"^Bitmap '' doesn't satisfy the constraints$"):
        parse_directory(bytes(24), 1)


def test_extra_data_needs_the_compatible_flag() -> None:
    with pytest.raises(BitmapFormatError, match=r"^Bitmap extra data is not supported$"):
        parse_directory(raw_entry(b"b0", extra=b"12345678"), 1)
    (e,) = parse_directory(raw_entry(b"b0", flags=EXTRA_DATA_COMPATIBLE, extra=b"x"), 1)
    assert e.extra_data == b"x"


def test_names_up_to_1023_bytes() -> None:
    assert parse_directory(raw_entry(b"n" * 1023), 1)[0].name == "n" * 1023
    with pytest.raises(BitmapFormatError, match="doesn't satisfy the constraints"):
        parse_directory(raw_entry("\u00e9".encode() * 512), 1)  # 1024 bytes of UTF-8


# --- table size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "granularity", "cluster", "expected"),
    [
        (0, 65536, 65536, 0),
        (512, 65536, 65536, 1),
        (16 << 20, 65536, 65536, 1),  # 256 granules -> 32 bytes
        # 8 * 65536 granules of 512 bytes -> exactly one 64 KiB cluster of bits
        (8 * 65536 * 512, 512, 65536, 1),
        (8 * 65536 * 512 + 512, 512, 65536, 2),  # one granule more: a second cluster
        (8 * 65536 * 512 + 1, 512, 65536, 2),  # a short last granule counts
        ((4 << 30) + 1536, 512, 1024, 1025),  # 8388611 granules -> 1048577 bytes
        (1 << 40, 1 << 31, 512, 1),
    ],
)
def test_table_entries(length: int, granularity: int, cluster: int, expected: int) -> None:
    assert table_entries(length, granularity, cluster) == expected


@given(st.integers(0, 1 << 42), st.integers(9, 31), st.sampled_from([512, 4096, 65536, 1 << 21]))
def test_table_entries_cover_every_granule(length: int, gbits: int, cluster: int) -> None:
    n = table_entries(length, 1 << gbits, cluster)
    granules = -(-length >> gbits)
    assert n * cluster * 8 >= granules  # enough bits
    assert n == 0 or (n - 1) * cluster * 8 < granules  # not a whole cluster too many


# --- packed bits -------------------------------------------------------------------------------


def packed_oracle(size: int, dirty: set[int]) -> bytes:
    """Granule i at bit i % 8 (least significant first) of byte i // 8."""
    out = bytearray(-(-size // 8))
    for i in dirty:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


@st.composite
def granule_sets(draw: st.DrawFn) -> tuple[int, int, set[int]]:
    gbits = draw(st.integers(0, 4))
    size = draw(st.integers(0, 300))
    # Any byte length whose granule count is `size` (the last granule may be short).
    length = draw(st.integers(((size - 1) << gbits) + 1, size << gbits)) if size else 0
    dirty = draw(st.sets(st.integers(0, size - 1))) if size else set()
    return length, 1 << gbits, dirty


@given(granule_sets())
def test_packed_layout(case: tuple[int, int, set[int]]) -> None:
    length, granularity, dirty = case
    bits = Bits(length, granularity)
    for i in dirty:
        bits.set(i * granularity, 1)
    assert bits.packed() == packed_oracle(bits.size, dirty)


@given(granule_sets(), st.binary(min_size=0, max_size=8))
def test_load_packed_round_trip_ignores_bits_past_size(
    case: tuple[int, int, set[int]], tail: bytes
) -> None:
    length, granularity, dirty = case
    bits = Bits(length, granularity)
    raw = bytearray(packed_oracle(bits.size, dirty))
    if raw and bits.size % 8:
        raw[-1] |= 0xFF << (bits.size % 8) & 0xFF  # garbage in the unused high bits
    other = Bits(length, granularity)
    other.set(0, length)  # everything dirty first: the load must replace it, not merge
    other.load_packed(bytes(raw) + tail)  # and bytes past the end (cluster padding)
    assert {i for i in range(other.size) if other.is_dirty(i)} == dirty
    assert other.packed() == packed_oracle(bits.size, dirty)
    assert other.count == len(dirty) * granularity


def test_packed_of_a_length_not_multiple_of_8_granules() -> None:
    bits = Bits(11 * 512 - 100, 512)  # 11 granules, the last one short
    assert bits.size == 11
    bits.set(10 * 512, 1)
    bits.set(0, 512)
    assert bits.packed() == bytes([0x01, 0x04])
    loaded = Bits(bits.length, 512)
    loaded.load_packed(b"\x01\xfc")  # bits 11..15 set in the image: ignored
    assert loaded.dirty_runs() == [(0, 512), (10 * 512, 412)]


def test_load_packed_of_an_empty_bitmap() -> None:
    bits = Bits(0, 512)
    bits.load_packed(b"\xff" * 8)
    assert bits.size == 0 and bits.packed() == b""


# --- entry checks ------------------------------------------------------------------------------


def good(**changes: object) -> StoredBitmap:
    e = StoredBitmap("b0", 0x30000, table_entries(LENGTH, 65536, CS), AUTO, 16)
    for key, value in changes.items():
        setattr(e, key, value)
    return e


def test_placement_depends_on_the_cluster_size() -> None:
    _check_placement(good(), CS)
    _check_placement(good(table_offset=0x200, table_size=1), 512)
    with pytest.raises(BitmapFormatError, match=r"^Bitmap 'b0' doesn't satisfy the constraints$"):
        _check_placement(good(table_offset=0x30200), CS)  # 512-aligned, not 64 KiB-aligned
    # In use (never read at open), but its table is read when it is removed: bounded.
    with pytest.raises(BitmapFormatError, match="doesn't satisfy the constraints"):
        _check_placement(good(flags=IN_USE, table_size=0x20000000 // CS + 1), CS)


# --- fuzzing -----------------------------------------------------------------------------------


@given(st.binary(max_size=512), st.integers(0, 70000))
def test_any_directory_bytes_give_entries_or_a_clean_error(raw: bytes, count: int) -> None:
    """A hostile image's directory: entries that satisfy every constraint, or qsd's error."""
    try:
        found = parse_directory(raw, count)
    except BitmapFormatError:
        return
    assert len(found) == count
    # What was accepted survives a store unchanged (padding bytes aside).
    assert parse_directory(pack_directory(found), count) == found
    assert len(pack_directory(found)) == len(raw)


@given(st.lists(entries, min_size=1, max_size=6), st.data())
def test_a_mutated_directory_gives_entries_or_a_clean_error(
    items: list[StoredBitmap], data: st.DataObject
) -> None:
    raw = bytearray(pack_directory(items))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] = data.draw(st.integers(0, 255))
    try:
        found = parse_directory(bytes(raw), len(items))
    except BitmapFormatError:
        return
    assert parse_directory(pack_directory(found), len(items)) == found
