"""Creating and deleting qcow2 internal snapshots (blockdev-snapshot-internal-sync and
blockdev-snapshot-delete-internal-sync).

Domain ring; runs under the driver's metadata lock with no allocating write in flight.
Invariant (as in alloc.py, a crash leaks clusters but never corrupts): on create, every
refcount increase is stable before the L2/L1 entries losing their COPIED flag, and those
before the new snapshot table, which is stable before the header names it; on delete, the
header stops naming the snapshot before any refcount falls, and COPIED flags come back only
once the decreases they rely on are stable.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.alloc import (
    FREE_SNAPSHOT,
    OL_ACTIVE_L1,
    OL_INACTIVE_L1,
    OL_INACTIVE_L2,
    OL_SNAPSHOT_TABLE,
    Metadata,
)

if TYPE_CHECKING:
    from storage_daemon.blockdev.drivers.qcow2.driver import Qcow2Driver

# Yield to the loop after this many L2 tables (each is a cluster's worth of entries).
_TABLES_PER_YIELD = 8


def _parts(driver: Qcow2Driver) -> tuple[fmt.Header, Metadata]:
    hdr, meta = driver.hdr, driver.meta
    assert hdr is not None and meta is not None
    return hdr, meta


def _host_clusters(driver: Qcow2Driver, entry: fmt.L2Entry) -> tuple[int, int]:
    """(first host cluster offset, count) an L2 entry holds references on; count 0: none."""
    if entry.compressed:
        mapper = driver.mapper
        assert mapper is not None
        return mapper.compressed_host_clusters(entry.raw)
    # Normal and preallocated-zero entries (and extended ones, allocated or not).
    return (entry.offset, 1) if entry.offset else (0, 0)


def _l2_offsets(l1: list[int]) -> list[tuple[int, int]]:
    return [(i, e & fmt.L1E_OFFSET_MASK) for i, e in enumerate(l1) if e & fmt.L1E_OFFSET_MASK]


def _walk_l2(driver: Qcow2Driver, table: bytearray, visit: Callable[[int, int], None]) -> None:
    """Call `visit(first host offset, count)` for every reference `table` holds."""
    hdr, _ = _parts(driver)
    ext = hdr.extended_l2
    for idx in range(hdr.l2_entries):
        first, count = _host_clusters(driver, fmt.l2_get(table, idx, ext))
        if count:
            visit(first, count)


def _snapshot_error(action: str, err: OSError) -> OSError:
    return OSError(err.errno, f"{action}: {os.strerror(err.errno or errno.EIO)}")


async def _write_table(driver: Qcow2Driver, snaps: list[fmt.Snapshot]) -> None:
    """Write `snaps` as a new snapshot table, then switch the header to it (one 12-byte
    write: nb_snapshots and snapshots_offset are adjacent); the old table is freed after."""
    hdr, meta = _parts(driver)
    cs = hdr.cluster_size
    data = fmt.pack_snapshots(snaps)
    new_offset = 0
    if snaps:
        clusters = -(-len(data) // cs)
        new_offset = await meta.alloc_clusters(clusters)
        await meta.write_refblocks()
        meta.claim(new_offset, clusters * cs, OL_SNAPSHOT_TABLE)
        await meta.write(new_offset, data + bytes(clusters * cs - len(data)), OL_SNAPSHOT_TABLE)
    await meta.sync()
    old_offset, old_size = driver.snapshot_table_offset()
    old_count = hdr.nb_snapshots
    await meta.write_header_field(60, len(snaps).to_bytes(4, "big") + new_offset.to_bytes(8, "big"))
    hdr.nb_snapshots, hdr.snapshots_offset = len(snaps), new_offset
    driver.snapshots = list(snaps)
    driver._snapshot_table_size = len(data)
    if old_count and old_size:
        old_clusters = -(-(old_offset % cs + old_size) // cs)
        meta._unmark(old_offset, old_size, OL_SNAPSHOT_TABLE)
        meta.queue_free(old_offset, old_clusters, FREE_SNAPSHOT)


def find(driver: Qcow2Driver, sid: str | None, name: str | None) -> fmt.Snapshot | None:
    """QEMU's bdrv_snapshot_find_by_id_and_name: both given must match."""
    for snap in driver.snapshots:
        if (sid is None or snap.id == sid) and (name is None or snap.name == name):
            return snap
    return None


def check_supported(driver: Qcow2Driver) -> None:
    mapper = driver.mapper
    assert mapper is not None
    if mapper.has_data_file:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))


async def create(driver: Qcow2Driver, name: str, realtime_ns: int) -> fmt.Snapshot:
    """Take a snapshot of the active L1 table under `name`; the new entry."""
    check_supported(driver)
    _, meta = _parts(driver)
    l1 = list(meta.l1)
    # From here no guest write starts in place (Writer.write_in_place checks the L1 flag);
    # those already in flight end before any cluster becomes shared.
    meta.l1[:] = [e & ~fmt.OFLAG_COPIED for e in l1]
    counting: list[bool] = []
    try:
        await meta.wait_no_inflight()
        return await _create(driver, name, realtime_ns, l1, counting)
    except BaseException:
        if not counting:
            meta.l1[:] = l1  # nothing counted yet: the flags are still true
        raise


async def _create(
    driver: Qcow2Driver, name: str, realtime_ns: int, l1: list[int], counting: list[bool]
) -> fmt.Snapshot:
    hdr, meta = _parts(driver)
    mapper = driver.mapper
    assert mapper is not None
    edges = (mapper.data,) if mapper.has_data_file else ()
    await meta.writeback(edges)
    await meta.sync()
    cs = hdr.cluster_size
    l1_size = len(l1)
    l1_bytes = l1_size * 8
    # The snapshot's copy of L1 (COPIED flags are only meaningful in active tables).
    snap_l1_offset = 0
    if l1_size:
        clusters = -(-l1_bytes // cs)
        snap_l1_offset = await meta.alloc_clusters(clusters)
        meta.claim(snap_l1_offset, l1_bytes, OL_INACTIVE_L1)
        copy = fmt.pack_u64s([e & ~fmt.OFLAG_COPIED for e in l1])
        await meta.write(snap_l1_offset, copy + bytes(clusters * cs - l1_bytes), OL_INACTIVE_L1)
    # One more reference on every L2 table and cluster the active L1 reaches.
    bumps: list[tuple[int, int]] = []
    for number, (_, l2_offset) in enumerate(_l2_offsets(l1)):
        bumps.append((l2_offset, 1))
        table = await meta.load_l2(l2_offset)
        _walk_l2(driver, table, lambda first, count: bumps.append((first, count)))
        if number % _TABLES_PER_YIELD == _TABLES_PER_YIELD - 1:
            await asyncio.sleep(0)
    counting.append(True)
    counted = 0  # clusters whose count went up, in the order of `bumps`
    try:
        for number, (first, count) in enumerate(bumps):
            for cluster in range(first >> hdr.cluster_bits, (first >> hdr.cluster_bits) + count):
                await meta.update_refcount(cluster, 1)
                counted += 1
            if number % 1024 == 1023:
                await meta.write_refblocks()  # bounded dirty set in the refblock cache
                await asyncio.sleep(0)  # cached refblocks: counting alone never suspends
    except OSError:
        # A refcount at its maximum (EINVAL, as qsd) or a failed refblock read: nothing
        # names the snapshot yet, so the increases and its L1 copy are simply taken back.
        await _uncount(meta, bumps, counted, snap_l1_offset, l1_bytes)
        counting.clear()  # the COPIED flags hold again
        raise
    await meta.write_refblocks()
    await meta.sync()
    # Everything is shared now: no active entry may be written in place any more.
    await _set_copied_flags(driver, l1, lambda _refcount: False)
    track_inactive = OL_INACTIVE_L2 in meta.overlap_checks
    snap = fmt.new_snapshot(
        name, snap_l1_offset, l1_size, hdr.size, realtime_ns, fmt.next_snapshot_id(driver.snapshots)
    )
    await _write_table(driver, [*driver.snapshots, snap])
    meta.snapshot_l1s.append((snap_l1_offset, l1_size))
    if track_inactive:
        meta.inactive_l2.update(offset for _, offset in _l2_offsets(l1))
    await meta.writeback(edges)
    return snap


async def _uncount(
    meta: Metadata, bumps: list[tuple[int, int]], counted: int, l1_offset: int, l1_bytes: int
) -> None:
    """Undo a failed snapshot's counting: the first `counted` increases of `bumps`, then
    its unnamed L1 copy. Lowering the counts at once is safe (a crash leaks at most): no
    table on disk relies on them."""
    for number, (first, count) in enumerate(bumps):
        if counted <= 0:
            break
        start = first >> meta.cluster_bits
        for cluster in range(start, start + min(count, counted)):
            await meta.update_refcount(cluster, -1)
        counted -= count
        if number % 1024 == 1023:
            await asyncio.sleep(0)
    if l1_bytes:
        meta._unmark(l1_offset, l1_bytes, OL_INACTIVE_L1)
        first = l1_offset >> meta.cluster_bits
        for cluster in range(first, first + -(-l1_bytes // meta.cluster_size)):
            await meta.update_refcount(cluster, -1)


async def _set_copied_flags(
    driver: Qcow2Driver, l1: list[int], copied: Callable[[int], bool]
) -> None:
    """Set or clear COPIED in the active L1 and L2 entries as `copied(refcount)` says; the
    L2 tables go out through the cache (refblocks first), the L1 table last."""
    hdr, meta = _parts(driver)
    ext = hdr.extended_l2
    cb = hdr.cluster_bits
    new_l1 = list(meta.l1)
    for number, (l1_index, l2_offset) in enumerate(_l2_offsets(l1)):
        table = await meta.load_l2(l2_offset)
        changed = False
        for idx in range(hdr.l2_entries):
            entry = fmt.l2_get(table, idx, ext)
            if entry.compressed or not entry.offset:
                continue
            want = copied(await meta.get_refcount(entry.offset >> cb))
            if want != entry.copied:
                raw = entry.raw | fmt.OFLAG_COPIED if want else entry.raw & ~fmt.OFLAG_COPIED
                fmt.l2_set(table, idx, ext, raw, entry.bitmap)
                changed = True
        if changed:
            meta.l2_dirty(l2_offset, table)
            await meta.trim()
        want_l2 = copied(await meta.get_refcount(l2_offset >> cb))
        l1e = new_l1[l1_index]
        new_l1[l1_index] = l1e | fmt.OFLAG_COPIED if want_l2 else l1e & ~fmt.OFLAG_COPIED
        if number % _TABLES_PER_YIELD == _TABLES_PER_YIELD - 1:
            await asyncio.sleep(0)
    await meta.writeback()
    await meta.sync()
    meta.l1[:] = new_l1
    await meta.write(hdr.l1_table_offset, fmt.pack_u64s(new_l1), OL_ACTIVE_L1)
    await meta.sync()


async def delete(driver: Qcow2Driver, snap: fmt.Snapshot) -> None:
    """Drop `snap` from the table, then its references; freed clusters are discarded as
    pass-discard-snapshot says; the active tables regain COPIED where they are alone."""
    check_supported(driver)
    hdr, meta = _parts(driver)
    await meta.writeback()
    cs = hdr.cluster_size
    cb = hdr.cluster_bits
    try:
        await _write_table(driver, [s for s in driver.snapshots if s is not snap])
    except OSError as err:
        raise _snapshot_error("Failed to remove snapshot from snapshot list", err) from err
    if (snap.l1_table_offset, snap.l1_size) in meta.snapshot_l1s:
        meta.snapshot_l1s.remove((snap.l1_table_offset, snap.l1_size))
    l1: list[int] = []
    if snap.l1_size:
        raw = await meta.read(snap.l1_table_offset, snap.l1_size * 8)
        l1 = fmt.unpack_u64s(raw)
    for number, (_, l2_offset) in enumerate(_l2_offsets(l1)):
        cached = meta.l2_cache.get(l2_offset)
        table = cached if cached is not None else await meta.read(l2_offset, cs)
        _walk_l2(driver, table, lambda first, count: meta.queue_free(first, count, FREE_SNAPSHOT))
        meta.queue_free(l2_offset, 1, FREE_SNAPSHOT)
        if number % _TABLES_PER_YIELD == _TABLES_PER_YIELD - 1:
            await asyncio.sleep(0)
    if snap.l1_size:
        meta.queue_free(snap.l1_table_offset, -(-snap.l1_size * 8 // cs), FREE_SNAPSHOT)
    await meta.writeback()
    await meta.sync()
    if OL_INACTIVE_L2 in meta.overlap_checks:
        for _, l2_offset in _l2_offsets(l1):
            if await meta.get_refcount(l2_offset >> cb) == 0:
                meta.inactive_l2.discard(l2_offset)
    await _set_copied_flags(driver, meta.l1, lambda refcount: refcount == 1)


__all__ = ["check_supported", "create", "delete", "find"]
