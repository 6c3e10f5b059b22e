"""The qcow2 metadata cache core: sizes derived from the options (qsd's rules), the LRU with
whole tables and slices, and the cache-clean-interval sweep."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.blockdev.drivers.qcow2.cache import (
    CacheSizeError,
    TableCache,
    cache_config,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CS = 64 * KiB


def config(size: int = GiB, cs: int = CS, **opts: int | None) -> tuple[int, int, int, int]:
    args: dict[str, int | None] = {
        "cache_size": None,
        "l2_cache_size": None,
        "l2_cache_entry_size": None,
        "refcount_cache_size": None,
    }
    args.update(opts)
    cfg = cache_config(
        cluster_size=cs,
        virtual_size=size,
        l2_entry_size=8,
        memory_limit=1 << 40,
        **args,
    )
    return cfg.l2_bytes, cfg.l2_slice_size, cfg.l2_entries, cfg.refcount_entries


def test_default_covers_the_image_with_whole_tables() -> None:
    # 1 GiB at 64 KiB clusters: 16384 entries, 128 KiB of L2 tables, all cached.
    assert config() == (128 * KiB, CS, 2, 4)


def test_default_is_capped_at_32_mib_and_then_sliced() -> None:
    # 1 TiB needs 128 MiB of L2 tables: the cache holds 32 MiB of 4 KiB slices.
    assert config(size=1 << 40) == (32 * MiB, 4096, 8192, 4)


def test_small_l2_cache_defaults_to_4k_slices_unless_the_entry_size_is_given() -> None:
    assert config(l2_cache_size=64 * KiB) == (64 * KiB, 4096, 16, 4)
    assert config(l2_cache_size=64 * KiB, l2_cache_entry_size=CS) == (64 * KiB, CS, 2, 4)
    assert config(l2_cache_entry_size=512) == (128 * KiB, 512, 256, 4)
    # Clusters smaller than 4 KiB: the slice is the cluster.
    assert config(cs=1024, l2_cache_size=4096)[1] == 1024


def test_l2_cache_larger_than_the_image_needs_is_cut_down() -> None:
    assert config(l2_cache_size=1 << 40)[0] == 128 * KiB


def test_minimum_entries() -> None:
    assert config(l2_cache_size=1, refcount_cache_size=1) == (1, 4096, 2, 4)


@pytest.mark.parametrize(
    ("opts", "l2", "refcount_entries"),
    [
        # Enough for the whole L2 and the minimum refcount cache: L2 gets what it needs.
        ({"cache_size": 4 * MiB}, 128 * KiB, (4 * MiB - 128 * KiB) // CS),
        # Not enough: the refcount cache keeps its minimum (4 clusters), L2 the rest.
        ({"cache_size": 300 * KiB}, 300 * KiB - 4 * CS, 4),
        ({"cache_size": 100 * KiB}, 0, 4),
        ({"cache_size": MiB, "l2_cache_size": 64 * KiB}, 64 * KiB, (MiB - 64 * KiB) // CS),
        ({"cache_size": MiB, "refcount_cache_size": 512 * KiB}, 512 * KiB, 8),
    ],
)
def test_cache_size_split(opts: dict[str, int], l2: int, refcount_entries: int) -> None:
    got = config(**opts)
    assert got[0] == l2
    assert got[3] == refcount_entries


def test_size_errors() -> None:
    with pytest.raises(CacheSizeError, match=r"^L2 cache size too big$"):
        # 2^31 slices of 512 bytes: a 2^58-byte image with 2 MiB clusters needs that much.
        config(size=1 << 58, cs=2 * MiB, l2_cache_size=1 << 40, l2_cache_entry_size=512)
    with pytest.raises(CacheSizeError, match=r"^Refcount cache size too big$"):
        config(cs=512, refcount_cache_size=512 << 31)
    with pytest.raises(CacheSizeError, match=r"^Could not allocate metadata caches$"):
        cache_config(
            cluster_size=CS,
            virtual_size=GiB,
            l2_entry_size=8,
            cache_size=None,
            l2_cache_size=None,
            l2_cache_entry_size=None,
            refcount_cache_size=2 * GiB,
            memory_limit=GiB,
        )


# --- the LRU ------------------------------------------------------------------------------


def table(fill: int) -> bytearray:
    return bytearray([fill]) * CS


def test_slices_and_whole_tables_never_coexist() -> None:
    cache = TableCache(64, CS, 4096)
    assert cache.per_table == 16 and cache.sliced
    cache.put_slice(CS, 3, bytearray(b"s" * 4096))
    assert cache.units == 1
    found = cache.get_slice(CS, 3)
    assert found is not None and found[1] is False and found[0][:1] == b"s"
    assert cache.get_slice(CS, 4) is None
    cache.put(CS, table(7))
    assert cache.units == 16  # the slice went, the whole table counts 16
    found = cache.get_slice(CS, 3)
    assert found is not None and found[1] is True and found[0][0] == 7
    cache.put_slice(CS, 5, bytearray(4096))  # ignored: the whole table is held
    assert cache.units == 16
    cache.drop(CS)
    assert cache.units == 0 and cache.get_slice(CS, 3) is None


def test_epoch_moves_on_every_change() -> None:
    cache = TableCache(64, CS, 4096)
    e0 = cache.epoch
    cache.put(0, table(0))
    assert cache.epoch == e0  # a clean load changes nothing on disk
    cache.put(0, table(0), dirty=True)
    e1 = cache.epoch
    assert e1 > e0
    cache.mark_dirty(0)
    assert cache.epoch > e1
    e2 = cache.epoch
    cache.drop(0)
    assert cache.epoch > e2


def test_evict_keeps_dirty_tables() -> None:
    cache = TableCache(2)
    cache.put(0, table(0), dirty=True)
    cache.put(CS, table(1))
    cache.put(2 * CS, table(2))
    cache.evict_clean()
    assert 0 in cache and CS not in cache and 2 * CS in cache
    cache.put(3 * CS, table(3), dirty=True)
    cache.evict_clean()
    assert 2 * CS not in cache and not cache.over_capacity()
    cache.put(4 * CS, table(4), dirty=True)
    cache.evict_clean()
    assert cache.over_capacity()  # three dirty tables: the owner must write back
    assert {0, 3 * CS, 4 * CS} == {k for k in (0, 3 * CS, 4 * CS) if k in cache}


def test_clean_unused_drops_what_was_not_used_since_the_last_sweep() -> None:
    cache = TableCache(64, CS, 4096)
    cache.watch_use()
    cache.put(0, table(0))
    cache.put(CS, table(1), dirty=True)
    cache.put_slice(2 * CS, 0, bytearray(4096))
    assert cache.clean_unused() == 0  # everything was used since watching began
    cache.get(0)
    assert cache.clean_unused() == 1  # the slice; the dirty table stays
    assert 0 in cache and CS in cache and cache.get_slice(2 * CS, 0) is None
    cache.mark_clean(CS)
    cache.get(0)
    assert cache.clean_unused() == 1  # CS: clean now and unused
    assert cache.clean_unused() == 1  # 0: unused since the previous sweep
    assert len(cache) == 0 and cache.units == 0


def test_first_sweep_without_watching_only_starts_watching() -> None:
    cache = TableCache(8)
    cache.put(0, table(0))
    assert cache.clean_unused() == 0
    assert cache.clean_unused() == 1


OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put_dirty", "slice", "get", "clean", "drop", "evict", "sweep"]),
        st.integers(0, 5),
        st.integers(0, 15),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(1, 80))
def test_random_operations_keep_the_invariants(
    ops: list[tuple[str, int, int]], capacity: int
) -> None:
    cache = TableCache(capacity, CS, 4096)
    cache.watch_use()
    dirty: set[int] = set()
    for op, t, index in ops:
        offset = t * CS
        if op == "put":
            cache.put(offset, table(t))
        elif op == "put_dirty":
            cache.put(offset, table(t), dirty=True)
            dirty.add(offset)
        elif op == "slice":
            cache.put_slice(offset, index, bytearray(4096))
        elif op == "get":
            cache.get_slice(offset, index)
        elif op == "clean":
            cache.mark_clean(offset)
            dirty.discard(offset)
        elif op == "drop":
            cache.drop(offset)
            dirty.discard(offset)
        elif op == "evict":
            cache.evict_clean()
        else:
            cache.clean_unused()
        keys = list(cache._tables)
        wholes = {k for k in keys if not k & 1}
        slices = [k for k in keys if k & 1]
        assert dirty <= wholes  # dirty tables are never dropped behind the owner's back
        assert cache.units == 16 * len(wholes) + len(slices)
        for key in slices:
            assert (key & ~1) - (key & ~1) % CS not in wholes
