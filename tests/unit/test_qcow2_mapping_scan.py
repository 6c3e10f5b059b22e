"""qcow2 extent scans and refcount counting, against their per-entry definitions.

Unit ring: no I/O. The fast scan of standard L2 entries (one struct call, integer tests) must
give exactly the extent, or the Corruption, that the unit-by-unit scan gives; the refcount
counter used by the metadata-preallocation check must agree with `refcount_get`.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.alloc import Corruption
from storage_daemon.blockdev.drivers.qcow2.mapping import MAX_EXTENT_UNITS, Extent, Mapper
from storage_daemon.blockdev.drivers.qcow2.status import count_nonzero

BITS = 16  # 64 KiB clusters
CS = 1 << BITS
ENTRIES = 24  # a short table is enough to exercise every boundary


def mapper(has_data_file: bool) -> Mapper:
    hdr = SimpleNamespace(extended_l2=False, l2_entries=ENTRIES, compression_type=0)
    meta: Any = SimpleNamespace(hdr=hdr, cluster_bits=BITS, cluster_size=CS)
    return Mapper(meta, ENTRIES * CS, None, has_data_file)  # type: ignore[arg-type]


@st.composite
def tables(draw: st.DrawFn) -> list[int]:
    """L2 entries: unallocated, zero (plain and allocated), normal runs that are contiguous
    on the host or not, compressed, flags mixed in, now and then an unaligned offset."""
    values: list[int] = []
    host = 10 * CS
    for _ in range(ENTRIES):
        kind = draw(st.sampled_from(["unalloc", "zero", "zalloc", "next", "jump", "comp", "bad"]))
        copied = fmt.OFLAG_COPIED if draw(st.booleans()) else 0
        if kind == "unalloc":
            value = copied if draw(st.integers(0, 9)) == 0 else 0
        elif kind == "zero":
            value = fmt.OFLAG_ZERO
        elif kind == "zalloc":
            value = fmt.OFLAG_ZERO | (draw(st.integers(1, 1000)) * CS) | copied
        elif kind == "next":
            host += CS
            value = host | copied
        elif kind == "jump":
            host = draw(st.integers(1, 1000)) * CS
            value = host | copied
        elif kind == "comp":
            value = fmt.OFLAG_COMPRESSED | (draw(st.integers(1, 1 << 20)) << 9)
        else:
            value = draw(st.integers(1, 1000)) * CS + 512
        values.append(value)
    return values


def scan(m: Mapper, table: bytearray, pos: int, length: int, fast: bool) -> Extent | str:
    try:
        if fast:
            return m._scan_standard(table, 0, 5 * CS, pos, length)
        return m._scan_units(table, 0, 5 * CS, pos, length)
    except Corruption as err:
        return f"corruption: {err.msg}"


@settings(max_examples=200, deadline=None)
@given(tables(), st.integers(0, ENTRIES * CS - 1), st.integers(1, ENTRIES * CS), st.booleans())
def test_fast_scan_equals_unit_scan(
    values: list[int], pos: int, length: int, has_data_file: bool
) -> None:
    table = bytearray(struct.pack(f">{ENTRIES}Q", *values))
    length = min(length, ENTRIES * CS - pos)  # callers clip to the table
    m = mapper(has_data_file)
    assert scan(m, table, pos, length, True) == scan(m, table, pos, length, False)


@pytest.mark.parametrize("kind", ["compressed", "unallocated", "zero", "normal"])
def test_the_entry_ending_a_run_is_checked_for_alignment(kind: str) -> None:
    """A misaligned entry right after a run is corruption, whatever the run's kind."""
    first = {
        "compressed": fmt.OFLAG_COMPRESSED | (7 << 9),
        "unallocated": 0,
        "zero": fmt.OFLAG_ZERO,
        "normal": 3 * CS,
    }[kind]
    table = bytearray(struct.pack(f">{ENTRIES}Q", first, 9 * CS + 512, *[0] * (ENTRIES - 2)))
    for fast in (True, False):
        assert str(scan(mapper(False), table, 0, 2 * CS, fast)).startswith("corruption")


def test_fast_scan_stops_after_max_units() -> None:
    m = mapper(False)
    count = MAX_EXTENT_UNITS + 10
    hdr = SimpleNamespace(extended_l2=False, l2_entries=count, compression_type=0)
    m.l2_entries = hdr.l2_entries
    table = bytearray(count * 8)  # all unallocated
    ext = m._scan_standard(table, 0, CS, 0, count * CS)
    assert ext.length == MAX_EXTENT_UNITS * CS
    assert ext == m._scan_units(table, 0, CS, 0, count * CS)


@pytest.mark.parametrize("order", range(7))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_count_nonzero_matches_refcount_get(order: int, data: st.DataObject) -> None:
    size = 64
    block = bytearray(
        data.draw(
            st.lists(st.sampled_from([0, 0, 0, 1, 2, 0x80, 0xFF]), min_size=size, max_size=size)
        )
    )
    per_block = size * 8 >> order
    entries = data.draw(st.integers(0, per_block))
    expected = sum(fmt.refcount_get(block, i, order) != 0 for i in range(entries))
    assert count_nonzero(block, entries, order) == expected
