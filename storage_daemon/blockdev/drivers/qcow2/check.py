"""Repair of a dirty qcow2 image (lazy refcounts left refcounts behind the tables).

Domain ring. Counts every reference the metadata holds (header, tables, data clusters of the
active and snapshot L1 tables, persistent bitmaps, refcount structures), sets each refcount to that count and fixes
the COPIED flags of the active tables, then writes everything back. Invariant: runs before
any allocation on a read-write open, so the allocator never sees an undercounted cluster.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from storage_daemon.blockdev.drivers.qcow2 import bitmaps
from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.alloc import Metadata

if TYPE_CHECKING:
    from storage_daemon.blockdev.drivers.qcow2.driver import Qcow2Driver


def _add(refs: dict[int, int], offset: int, size: int, cluster_bits: int) -> None:
    first = offset >> cluster_bits
    last = (offset + max(size, 1) - 1) >> cluster_bits
    for cluster in range(first, last + 1):
        refs[cluster] = refs.get(cluster, 0) + 1


async def _count_l1(
    meta: Metadata, l1: list[int], refs: dict[int, int], has_data_file: bool
) -> None:
    cb = meta.cluster_bits
    extended = meta.hdr.extended_l2
    entries = meta.hdr.l2_entries
    for l1e in l1:
        l2_offset = l1e & fmt.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        _add(refs, l2_offset, meta.cluster_size, cb)
        table = await meta.load_l2(l2_offset)
        for idx in range(entries):
            entry = fmt.l2_get(table, idx, extended)
            if not entry.raw:
                continue
            if entry.compressed:
                host, span = fmt.compressed_span(entry.raw, cb)
                _add(refs, host, span, cb)
            elif entry.offset and not has_data_file:
                _add(refs, entry.offset, meta.cluster_size, cb)


async def count_references(drv: Qcow2Driver) -> dict[int, int]:
    meta = drv.meta
    hdr = drv.hdr
    assert meta is not None and hdr is not None
    cb = meta.cluster_bits
    refs: dict[int, int] = {}
    _add(refs, 0, meta.cluster_size, cb)
    has_df = drv.mapper is not None and drv.mapper.has_data_file
    if hdr.l1_size:
        _add(refs, hdr.l1_table_offset, hdr.l1_size * 8, cb)
    await _count_l1(meta, meta.l1, refs, has_df)
    table_offset, table_size = drv.snapshot_table_offset()
    if table_size:
        _add(refs, table_offset, table_size, cb)
    file_len = meta.file.node.driver.getlength()
    for snap in drv.snapshots:
        if snap.l1_size:
            _add(refs, snap.l1_table_offset, snap.l1_size * 8, cb)
            l1 = await drv._read_table(meta.file, snap.l1_table_offset, snap.l1_size, file_len)
            await _count_l1(meta, l1, refs, has_df)
    directory_offset, directory_size = meta.bitmap_directory
    if directory_size:
        _add(refs, directory_offset, directory_size, cb)
    for stored in drv.stored:
        for offset, clusters, _kind in await bitmaps.clusters_of(drv, stored):
            _add(refs, offset, clusters << cb, cb)
    _add(refs, hdr.refcount_table_offset, hdr.refcount_table_clusters << cb, cb)
    for entry in meta.reftable:
        if entry & fmt.REFT_OFFSET_MASK:
            _add(refs, entry & fmt.REFT_OFFSET_MASK, meta.cluster_size, cb)
    return refs


async def _counted_clusters(meta: Metadata) -> set[int]:
    """Every cluster with a nonzero refcount on disk."""
    found: set[int] = set()
    for block_index, entry in enumerate(meta.reftable):
        if not entry & fmt.REFT_OFFSET_MASK:
            continue
        base = block_index * meta.rb_entries
        for slot in range(meta.rb_entries):
            if await meta.get_refcount(base + slot):
                found.add(base + slot)
    return found


async def repair(drv: Qcow2Driver) -> None:
    meta = drv.meta
    hdr = drv.hdr
    assert meta is not None and hdr is not None
    for _attempt in range(8):
        refs = await count_references(drv)
        if refs:
            meta.end_cluster = max(meta.end_cluster, max(refs) + 1)
        changed = False
        for cluster in sorted(set(refs) | await _counted_clusters(meta)):
            want = refs.get(cluster, 0)
            if want > meta.rc_max:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            have = await meta.get_refcount(cluster)
            if have != want:
                await meta.update_refcount(cluster, want - have)
                changed = True
        if not changed:
            break
    await _fix_copied(drv)
    await meta.write_refblocks()
    await meta.writeback()
    await meta.sync()


async def _fix_copied(drv: Qcow2Driver) -> None:
    meta = drv.meta
    assert meta is not None
    cb = meta.cluster_bits
    extended = meta.hdr.extended_l2
    has_df = drv.mapper is not None and drv.mapper.has_data_file
    for l1_index, l1e in enumerate(meta.l1):
        l2_offset = l1e & fmt.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        l2_single = await meta.get_refcount(l2_offset >> cb) == 1
        want_l1 = (l1e & ~fmt.OFLAG_COPIED) | (fmt.OFLAG_COPIED if l2_single else 0)
        if want_l1 != l1e:
            await meta.write_l1_entry(l1_index, want_l1)
        table = await meta.load_l2(l2_offset)
        dirty = False
        for idx in range(meta.hdr.l2_entries):
            entry = fmt.l2_get(table, idx, extended)
            if entry.compressed or not entry.offset or has_df:
                continue
            single = await meta.get_refcount(entry.offset >> cb) == 1
            want = (entry.raw & ~fmt.OFLAG_COPIED) | (fmt.OFLAG_COPIED if single else 0)
            if want != entry.raw:
                fmt.l2_set(table, idx, extended, want, entry.bitmap)
                dirty = True
        if dirty:
            meta.l2_dirty(l2_offset, table)
