"""`Mapper.unallocated_now`, the hole fast path of every NBD read of an empty qcow2 image.

Unit ring: no I/O. Its answer must be exactly the per-cluster definition (0 where an L2 table
maps the range, else the bytes up to the end of the cached L2 slice, at most `length`), also
after a reopen replaced the L2 cache by one of another slice size.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.cache import TableCache
from storage_daemon.blockdev.drivers.qcow2.mapping import Mapper

BITS = 16  # 64 KiB clusters
CS = 1 << BITS
ENTRIES = CS // 8  # standard L2 entries per table
L1_LEN = 6


def mapper(l1: list[int], slice_size: int) -> Mapper:
    hdr = SimpleNamespace(extended_l2=False, l2_entries=ENTRIES, compression_type=0)
    meta: Any = SimpleNamespace(
        hdr=hdr, cluster_bits=BITS, cluster_size=CS, l1=l1, l2_cache=TableCache(16, CS, slice_size)
    )
    return Mapper(meta, L1_LEN * ENTRIES * CS, None, False)  # type: ignore[arg-type]


def expected(l1: list[int], per_table: int, pos: int, length: int) -> int:
    """The definition: cluster by cluster, up to the end of the slice holding `pos`."""
    cluster = pos >> BITS
    l1_index = cluster // ENTRIES
    if l1_index < len(l1) and l1[l1_index] & fmt.L1E_OFFSET_MASK:
        return 0
    span = ENTRIES // per_table
    end_cluster = (cluster // span + 1) * span  # first cluster of the next slice
    return min(length, (end_cluster << BITS) - pos)


l1_entries = st.lists(
    st.sampled_from([0, 0, fmt.OFLAG_COPIED, 5 * CS, 7 * CS | fmt.OFLAG_COPIED]),
    min_size=L1_LEN - 2,  # the L1 table may be shorter than the image: past it is a hole
    max_size=L1_LEN,
)
slice_sizes = st.sampled_from([CS, CS // 2, 4096, 512])


@settings(max_examples=300, deadline=None)
@given(
    l1=l1_entries,
    first=slice_sizes,
    second=slice_sizes,
    pos=st.integers(0, L1_LEN * ENTRIES * CS - 1),
    length=st.integers(1, 64 << 20),
)
def test_matches_the_per_cluster_definition_across_cache_replacement(
    l1: list[int], first: int, second: int, pos: int, length: int
) -> None:
    m = mapper(l1, first)
    assert m.unallocated_now(pos, length) == expected(l1, CS // first, pos, length)
    # A reopen with another l2-cache-entry-size replaces the cache: spans follow it.
    m.meta.l2_cache = TableCache(16, CS, second)
    assert m.unallocated_now(pos, length) == expected(l1, CS // second, pos, length)


def test_allocated_l1_entry_and_slice_edges() -> None:
    m = mapper([0, 9 * CS], 4096)  # 512 entries per slice: 32 MiB of guest per slice
    slice_bytes = (4096 // 8) * CS
    assert m.unallocated_now(0, 1 << 20) == 1 << 20
    assert m.unallocated_now(slice_bytes - 4096, 1 << 20) == 4096  # stops at the slice end
    assert m.unallocated_now(ENTRIES * CS, 1) == 0  # mapped by the second L1 entry
    assert m.unallocated_now(2 * ENTRIES * CS + 5, 10) == 10  # past the L1 table
