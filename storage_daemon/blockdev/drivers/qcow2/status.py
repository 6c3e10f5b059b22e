"""qcow2 block status and reads answered at once: cluster kinds as allocation states, and
the host file consulted for images with metadata preallocation (QEMU's recursive status).

Domain ring. `preallocated` counts referenced host clusters against what the file really
holds (QEMU's heuristic: more than 10/9 of the allocated clusters, and 2 more); only such
images ask their file, so that referenced clusters over its holes read as zeroes. Invariant:
nothing here changes metadata; the `_now` functions never wait, and answer None (having
done nothing) whenever an answer would need I/O.
"""

from __future__ import annotations

import asyncio
from array import array
from typing import TYPE_CHECKING

from storage_daemon.blockdev import io
from storage_daemon.blockdev.driver import BlockStatus
from storage_daemon.blockdev.drivers.blkdebug import debug_event
from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.alloc import Corruption
from storage_daemon.blockdev.drivers.qcow2.format import ClusterType
from storage_daemon.blockdev.drivers.qcow2.mapping import Extent, Mapper

if TYPE_CHECKING:
    from storage_daemon.blockdev.child import BdrvChild
    from storage_daemon.blockdev.drivers.qcow2.alloc import Metadata
    from storage_daemon.blockdev.io import Buffer

# (data, zero) per cluster kind; unallocated kinds are neither (the I/O path then asks the
# backing chain, or reports zeroes without one).
_FLAGS: dict[ClusterType, tuple[bool, bool]] = {
    ClusterType.NORMAL: (True, False),
    ClusterType.COMPRESSED: (True, False),
    ClusterType.ZERO_PLAIN: (False, True),
    ClusterType.ZERO_ALLOC: (False, True),
    ClusterType.UNALLOCATED: (False, False),
    ClusterType.UNALLOCATED_ALLOC: (False, False),
}
_ARRAY_CODES = {4: "H", 5: "I", 6: "Q"}
# For refcounts narrower than a byte: how many nonzero entries each byte value holds.
_NONZERO_IN_BYTE = {
    order: bytes(
        sum(1 for i in range(8 >> order) if (b >> (i << order)) & ((1 << (1 << order)) - 1))
        for b in range(256)
    )
    for order in range(3)
}


_UNALLOCATED: dict[int, BlockStatus] = {}


async def block_status(mapper: Mapper, prealloc: bool, offset: int, length: int) -> BlockStatus:
    """The qcow2 node's own answer (Corruption propagates)."""
    ext = await mapper.extent(offset, length)
    if prealloc and ext.kind == ClusterType.NORMAL:
        return await status_in_file(mapper.data, ext)
    return status_of(ext)


def block_status_now(
    mapper: Mapper, prealloc: bool, offset: int, length: int
) -> BlockStatus | None:
    """`block_status` from cached tables (and the file's cached extent), else None."""
    count = mapper.unallocated_now(offset, length)
    if count:
        return unallocated_status(count)
    try:
        ext = mapper.extent_now(offset, length)
    except Corruption:
        return None  # the awaited path reports it
    if ext is None:
        return None
    if prealloc and ext.kind == ClusterType.NORMAL:
        return status_in_file_now(mapper.data, ext)
    return status_of(ext)


def read_now(mapper: Mapper, offset: int, length: int) -> Buffer | None:
    """A read of one contiguous host run mapped by cached tables, done at once by the
    layers below (see `io.pread_now`), else None (nothing read)."""
    try:
        ext = mapper.extent_now(offset, length)
    except Corruption:
        return None
    if ext is None or ext.length != length or ext.kind != ClusterType.NORMAL:
        return None
    data = io.pread_now(mapper.data, ext.host, length)
    if data is not None:
        debug_event(mapper.meta.file, "read_aio")
    return data


def status_of(ext: Extent) -> BlockStatus:
    """The allocation state of an extent, without looking at the host file."""
    data, zero = _FLAGS[ext.kind]
    if data or zero:
        return BlockStatus(length=ext.length, data=data, zero=zero)
    return unallocated_status(ext.length)


def unallocated_status(length: int) -> BlockStatus:
    """BlockStatus(length, unallocated), shared per length (BlockStatus is frozen, and a
    new one costs ~1 us): every read of an empty image lands here."""
    status = _UNALLOCATED.get(length)
    if status is None:
        if len(_UNALLOCATED) >= 64:
            _UNALLOCATED.clear()
        status = _UNALLOCATED[length] = BlockStatus(length=length, data=False, zero=False, depth=0)
    return status


async def status_in_file(data_file: BdrvChild, ext: Extent) -> BlockStatus:
    """A data extent of a metadata-preallocated image: zero where its host range is a hole
    (or past the file's end), and cut where the file's own extent ends, as QEMU recurses."""
    eof = data_file.node.driver.getlength()
    if ext.host >= eof:
        return BlockStatus(length=ext.length, data=True, zero=True)
    try:
        below = await io.block_status(data_file, ext.host, ext.length)
    except OSError:
        return BlockStatus(length=ext.length, data=True, zero=False)
    return _merge(ext, below, eof)


def status_in_file_now(data_file: BdrvChild, ext: Extent) -> BlockStatus | None:
    """`status_in_file` when the file answers from memory; None otherwise."""
    eof = data_file.node.driver.getlength()
    if ext.host >= eof:
        return BlockStatus(length=ext.length, data=True, zero=True)
    below = io.block_status_now(data_file, ext.host, ext.length)
    if below is None:
        return None
    return _merge(ext, below, eof)


def _merge(ext: Extent, below: BlockStatus, eof: int) -> BlockStatus:
    if below.length <= 0:
        return BlockStatus(length=ext.length, data=True, zero=False)
    if below.zero and ext.host + below.length >= eof:
        # A hole up to the file's end: everything after it reads as zeroes too.
        return BlockStatus(length=ext.length, data=True, zero=True)
    return BlockStatus(length=min(below.length, ext.length), data=True, zero=below.zero)


async def preallocated(meta: Metadata, file: BdrvChild) -> bool:
    """Does the image reference clearly more clusters than its file holds (an image made
    with preallocation=metadata)? Then block status asks the file about data clusters, and
    those over holes read as zeroes. QEMU decides at the first block status; the driver
    checks a writable image at open instead, because our first allocations leave the
    unwritten part of new clusters as holes where QEMU allocates them (zero-range
    fallocate): after a few writes of ours, QEMU's test would count an ordinary image as
    preallocated, and report the unwritten parts of its fresh clusters as zeroes."""
    from storage_daemon.blockdev.info import allocated_size

    try:
        return await detect_metadata_preallocation(meta, file, await allocated_size(file.node))
    except (OSError, Corruption):
        return False


async def detect_metadata_preallocation(
    meta: Metadata, file: BdrvChild, allocated: int | None
) -> bool:
    """True when the image references clearly more host clusters than its file holds.

    `allocated` is the file's allocated size in bytes (None: unknown, then False). Clusters
    are counted up to the file's end, and only until the threshold is passed.
    """
    if allocated is None or allocated < 0:
        return False
    cs = meta.cluster_size
    real = allocated // cs
    threshold = max(real * 10 // 9, real + 2)
    end_cluster = -(-file.node.driver.getlength() // cs)
    per_block = meta.rb_entries
    count = 0
    for index in range(-(-end_cluster // per_block)):
        if count > threshold:
            break
        entries = min(per_block, end_cluster - index * per_block)
        offset = meta.reftable[index] & fmt.REFT_OFFSET_MASK if index < len(meta.reftable) else 0
        if not offset:
            continue
        block = meta.rb_cache.get(offset)
        if block is None:
            block = await meta.read(offset, cs)
        count += count_nonzero(block, entries, meta.order)
        await asyncio.sleep(0)  # a large image has many blocks: let others run between
    return count > threshold


def count_nonzero(block: bytes | bytearray, entries: int, order: int) -> int:
    """How many of the first `entries` refcounts of a refblock are not zero."""
    if order == 3:
        return entries - block.count(0, 0, entries)
    if order > 3:
        values = array(_ARRAY_CODES[order])
        values.frombytes(bytes(block[: entries << (order - 3)]))
        return entries - values.count(0)
    per_byte = 8 >> order
    whole = entries // per_byte
    total = sum(block[:whole].translate(_NONZERO_IN_BYTE[order]))
    for index in range(whole * per_byte, entries):
        total += fmt.refcount_get(block, index, order) != 0
    return total
