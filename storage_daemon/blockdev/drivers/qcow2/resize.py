"""block_resize of a qcow2 image: growing the L1 table, dropping mappings when shrinking.

Domain ring; runs under the driver's metadata lock. Invariant (crash safety as in alloc.py):
a grown L1 table is written and synced before the header points at it, and the old table is
freed only afterwards; when shrinking, mappings past the new end are removed (and synced)
before their clusters' refcounts fall, and the header's size changes last. An external data
file follows the new size (grown space of a data-file-raw image is mapped one to one).
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import TYPE_CHECKING

from storage_daemon.blockdev import io
from storage_daemon.blockdev.drivers.blkdebug import debug_event
from storage_daemon.blockdev.drivers.qcow2 import bitmaps
from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.alloc import FREE_OTHER, OL_ACTIVE_L1, OL_ACTIVE_L2
from storage_daemon.blockdev.drivers.qcow2.layout import MAX_IMAGE_LENGTH
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.drivers.qcow2.driver import Qcow2Driver


def check_new_size(driver: Qcow2Driver, size: int) -> None:
    """qsd's refusals, before anything changes."""
    if size > MAX_IMAGE_LENGTH:
        raise QmpError(f"offset({size}) exceeds maximum({MAX_IMAGE_LENGTH})")
    if size % 512:
        raise QmpError("The new size must be a multiple of 512")
    if driver.snapshots:
        raise QmpError("Can't resize an image which has snapshots")
    bitmaps.check_resize(driver)


async def resize(driver: Qcow2Driver, size: int) -> None:
    hdr, meta, mapper, writer = driver.hdr, driver.meta, driver.mapper, driver.writer
    assert hdr is not None and meta is not None and mapper is not None and writer is not None
    old = hdr.size
    if size > old:
        await _grow_l1(driver, size)
        if hdr.autoclear & fmt.AUTOCLEAR_DATA_FILE_RAW and mapper.has_data_file:
            await _map_raw_data(driver, old, size)
    elif size < old:
        await _drop_mappings(driver, size, old)
    data_file = driver._data_file
    if data_file is not None:
        # qsd resizes the external data file with the image, both ways.
        await io.truncate(data_file, size)
    await meta.writeback(() if data_file is None else (data_file,))
    hdr.size = size
    mapper.size = size
    await meta.write_header_field(24, size.to_bytes(8, "big"))


async def _grow_l1(driver: Qcow2Driver, size: int) -> None:
    hdr, meta = driver.hdr, driver.meta
    assert hdr is not None and meta is not None
    need = fmt.l1_entries_needed(size, hdr.cluster_bits, hdr.l2_entry_size)
    if need <= len(meta.l1):
        return
    if need > fmt.MAX_L1_SIZE // 8:
        raise QmpError(f"Failed to grow the L1 table: {os.strerror(errno.EFBIG)}")
    cs = hdr.cluster_size
    clusters = -(-need * 8 // cs)
    debug_event(meta.file, "l1_grow_alloc_table")
    new_offset = await meta.alloc_clusters(clusters)
    await meta.write_refblocks()
    entries = [*meta.l1, *([0] * (need - len(meta.l1)))]
    table = fmt.pack_u64s(entries)
    meta.claim(new_offset, clusters * cs, OL_ACTIVE_L1)
    debug_event(meta.file, "l1_grow_write_table")
    await meta.write(new_offset, table + bytes(clusters * cs - len(table)), OL_ACTIVE_L1)
    await meta.sync()
    old_offset, old_size = hdr.l1_table_offset, hdr.l1_size
    # l1_size and l1_table_offset are adjacent: one 12-byte write switches both.
    debug_event(meta.file, "l1_grow_activate_table")
    await meta.write_header_field(36, need.to_bytes(4, "big") + new_offset.to_bytes(8, "big"))
    hdr.l1_size, hdr.l1_table_offset = need, new_offset
    meta.l1.extend([0] * (need - len(meta.l1)))
    if old_size:
        old_clusters = -(-old_size * 8 // cs)
        meta._unmark(old_offset, old_clusters * cs, OL_ACTIVE_L1)
        meta._mark(new_offset, clusters * cs, OL_ACTIVE_L1)
        meta.queue_free(old_offset, old_clusters, FREE_OTHER)


async def _map_raw_data(driver: Qcow2Driver, old: int, size: int) -> None:
    """data-file-raw: the new clusters map to the same offsets in the data file (qsd's
    metadata preallocation of grown space), so the data file stays a raw image of the disk."""
    hdr, meta, writer = driver.hdr, driver.meta, driver.writer
    assert hdr is not None and meta is not None and writer is not None
    cs, l2e, ext = hdr.cluster_size, hdr.l2_entries, hdr.extended_l2
    bitmap = fmt.ALL_SUBCLUSTERS if ext else 0
    cluster = -(-old // cs)
    last = -(-size // cs)
    while cluster < last:
        l2_offset, table = await writer._l2_for_write(cluster)
        stop = min(last, (cluster // l2e + 1) * l2e)
        for index in range(cluster, stop):
            idx = index % l2e
            if not fmt.l2_get(table, idx, ext).raw:
                fmt.l2_set(table, idx, ext, (index * cs) | fmt.OFLAG_COPIED, bitmap)
        meta.l2_dirty(l2_offset, table)
        cluster = stop
        await asyncio.sleep(0)  # cached tables: yield between them


async def _drop_mappings(driver: Qcow2Driver, size: int, old: int) -> None:
    """Unmap every cluster wholly past `size`; whole L2 tables past it are freed too."""
    hdr, meta, writer = driver.hdr, driver.meta, driver.writer
    assert hdr is not None and meta is not None and writer is not None
    cs, l2e = hdr.cluster_size, hdr.l2_entries
    ext = hdr.extended_l2
    first = -(-size // cs)
    last = -(-old // cs)
    l1_index = first // l2e
    while l1_index * l2e < last and l1_index < len(meta.l1):
        l2_offset = meta.l1[l1_index] & fmt.L1E_OFFSET_MASK
        start = max(first, l1_index * l2e)
        whole = start == l1_index * l2e
        if l2_offset and whole:
            table = await meta.load_l2(l2_offset)
            for idx in range(l2e):
                writer._free_old(fmt.l2_get(table, idx, ext), FREE_OTHER)
            await meta.write_l1_entry(l1_index, 0, "l1_shrink_write_table")
            meta.l2_cache.drop(l2_offset)
            meta._unmark(l2_offset, cs, OL_ACTIVE_L2)
            debug_event(meta.file, "l1_shrink_free_l2_clusters")
            meta.queue_free(l2_offset, 1, FREE_OTHER)
        elif not whole:
            # qsd discards the cut-off clusters of a partly kept table through the table,
            # which it allocates (empty) where there was none: the same image end as its.
            l2_offset, table = await writer._l2_for_write(start)
            for idx in range(start - l1_index * l2e, l2e):
                entry = fmt.l2_get(table, idx, ext)
                if entry.raw or entry.bitmap:
                    writer._free_old(entry, FREE_OTHER)
                    fmt.l2_set(table, idx, ext, 0, 0)
            meta.l2_dirty(l2_offset, table)
        l1_index += 1
