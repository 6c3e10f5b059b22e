"""Persistent dirty bitmaps in a qcow2 image (the bitmaps header extension), as qsd keeps them.

Domain ring over the driver's metadata (format: QEMU's docs/interop/qcow2.txt, "Bitmaps").
`driver.stored` mirrors the directory on disk, in its order. At open every stored bitmap
becomes a persistent bitmap of the node: a consistent one with its bits and its `auto` flag
as recording, one flagged `in_use` (not saved properly: a crash, or a program that wrote the
image while it was open) as inconsistent, empty and only removable; on a read-only node the
loaded ones are read-only. A read-write open flags every stored bitmap `in_use` on disk before
the first write, so that a crash leaves them marked as stale rather than silently outdated.
Closing (or a reopen to read-only) stores the node's persistent bitmaps: bitmap data, tables
and a new directory are written and synced before the header names them, and the old ones
are freed after, so a crash leaks clusters and never corrupts. Removing a stored bitmap
rewrites the directory at once, as qsd does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage_daemon.blockdev.bitmaps import registry
from storage_daemon.blockdev.bitmaps.core import Bits
from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.alloc import (
    FREE_ALWAYS,
    FREE_OTHER,
    OL_BITMAP_DIRECTORY,
    Metadata,
)
from storage_daemon.errors import QmpError, strerror

if TYPE_CHECKING:
    from storage_daemon.blockdev.drivers.qcow2.driver import Qcow2Driver

IN_USE = 1 << 0
AUTO = 1 << 1
EXTRA_DATA_COMPATIBLE = 1 << 2
KNOWN_FLAGS = IN_USE | AUTO | EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * 65535
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000  # bitmap data bytes QEMU agrees to hold in memory
MIN_CLUSTER_SIZE = 512
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE

_ENTRY = struct.Struct(">QIIBBHI")
_EXT = struct.Struct(">IIQQ")


@dataclass
class StoredBitmap:
    """One bitmap directory entry."""

    name: str
    table_offset: int
    table_size: int  # entries
    flags: int
    granularity_bits: int
    extra_data: bytes = b""
    type: int = TYPE_DIRTY_TRACKING


class BitmapFormatError(Exception):
    """A bitmap directory or table qsd would not load; `str()` is the reason."""


def entry_size(name_size: int, extra_size: int) -> int:
    return (_ENTRY.size + extra_size + name_size + 7) & ~7


def parse_directory(buf: bytes | bytearray, count: int) -> list[StoredBitmap]:
    """The entries of a directory, each checked as qsd checks it while reading (qsd's texts):
    the entries must fill the directory exactly and number `count`."""
    entries: list[StoredBitmap] = []
    pos = 0
    while pos < len(buf):
        if pos + _ENTRY.size > len(buf):
            raise BitmapFormatError("Broken bitmap directory")
        offset, table_size, flags, kind, gbits, name_size, extra_size = _ENTRY.unpack_from(buf, pos)
        end = pos + entry_size(name_size, extra_size)
        if end > len(buf):
            raise BitmapFormatError("Broken bitmap directory")
        start = pos + _ENTRY.size
        extra = bytes(buf[start : start + extra_size])
        raw_name = bytes(buf[start + extra_size : start + extra_size + name_size])
        entry = StoredBitmap(
            raw_name.decode("utf-8", "replace"), offset, table_size, flags, gbits, extra, kind
        )
        if extra_size and not flags & EXTRA_DATA_COMPATIBLE:
            raise BitmapFormatError("Bitmap extra data is not supported")
        if not _satisfies_constraints(entry):
            raise BitmapFormatError(f"Bitmap '{entry.name}' doesn't satisfy the constraints")
        entries.append(entry)
        pos = end
    if len(entries) < count:
        raise BitmapFormatError("Less bitmaps found than specified in header extension")
    if len(entries) > count:
        raise BitmapFormatError("More bitmaps found than specified in header extension")
    return entries


def pack_directory(entries: list[StoredBitmap]) -> bytes:
    out = bytearray()
    for e in entries:
        name = e.name.encode()
        out += _ENTRY.pack(
            e.table_offset,
            e.table_size,
            e.flags,
            e.type,
            e.granularity_bits,
            len(name),
            len(e.extra_data),
        )
        out += e.extra_data + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def table_entries(length: int, granularity: int, cluster_size: int) -> int:
    """Bitmap table entries for a bitmap over `length` bytes."""
    granules = -(-length // granularity)
    data_bytes = -(-granules // 8)
    return -(-data_bytes // cluster_size)


def _satisfies_constraints(e: StoredBitmap) -> bool:
    """qsd's checks of a directory entry: table placement and size (bounded: 512 MiB of
    bitmap data at most, at the smallest cluster size), granularity, flags, type, name."""
    return (
        e.table_size <= MAX_TABLE_SIZE
        and e.table_size * MIN_CLUSTER_SIZE <= MAX_PHYS_SIZE
        and e.table_offset % MIN_CLUSTER_SIZE == 0
        and MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
        and not e.flags & ~KNOWN_FLAGS
        and e.type == TYPE_DIRTY_TRACKING
        and len(e.name.encode()) <= MAX_NAME_SIZE
    )


def _check_placement(e: StoredBitmap, cluster_size: int) -> None:
    """What depends on the image's cluster size (checked with the directory, qsd's text)."""
    if e.table_offset % cluster_size or e.table_size * cluster_size > MAX_PHYS_SIZE:
        raise BitmapFormatError(f"Bitmap '{e.name}' doesn't satisfy the constraints")


def _extension(hdr: fmt.Header) -> fmt.Extension | None:
    for ext in hdr.extensions:
        if ext.type == fmt.EXT_BITMAPS:
            return ext
    return None


def image_info(entries: list[StoredBitmap]) -> list[dict[str, object]]:
    """The `bitmaps` member of qcow2's format-specific image info: the directory on disk."""
    return [
        {
            "flags": [flag for bit, flag in ((IN_USE, "in-use"), (AUTO, "auto")) if e.flags & bit],
            "name": e.name,
            "granularity": 1 << e.granularity_bits,
        }
        for e in entries
    ]


# --- open ----------------------------------------------------------------------------------


async def load(driver: Qcow2Driver, *, readonly: bool, attach: bool = True) -> None:
    """Read the directory and make every stored bitmap a persistent bitmap of the node
    (read-only ones on a node that may not write the image now; none on an inactive node,
    which only lists the directory, as qsd 10.0 does)."""
    hdr, meta = driver.hdr, driver.meta
    assert hdr is not None and meta is not None
    driver.stored = []
    ext = _extension(hdr)
    if ext is None or not hdr.autoclear & fmt.AUTOCLEAR_BITMAPS:
        return
    count, _reserved, dir_size, dir_offset = _EXT.unpack_from(ext.data)
    try:
        raw = await meta.read(dir_offset, dir_size)
        entries = parse_directory(raw, count)
        for e in entries:
            _check_placement(e, hdr.cluster_size)
        length = -(-hdr.size // registry.SECTOR) * registry.SECTOR
        loaded = []
        for e in entries:
            bits = Bits(length, 1 << e.granularity_bits)
            if not e.flags & IN_USE:
                await _read_bits(driver, e, bits, length)
            loaded.append((e, bits))
    except BitmapFormatError as err:
        raise QmpError(str(err)) from err
    except OSError as err:
        raise QmpError(f"Could not read the bitmap directory: {err.strerror or err}") from err
    meta.set_bitmap_directory(dir_offset, dir_size)
    driver.stored = entries
    for e, bits in loaded if attach else ():
        if registry.find(driver.node, e.name) is not None:
            continue  # added while inactive under a stored name: the one in memory wins
        inconsistent = bool(e.flags & IN_USE)
        registry.attach(
            driver.node,
            registry.DirtyBitmap(
                e.name,
                bits,
                enabled=bool(e.flags & AUTO) and not inconsistent,
                persistent=True,
                readonly=readonly,
                inconsistent=inconsistent,
            ),
        )


async def _read_bits(driver: Qcow2Driver, e: StoredBitmap, bits: Bits, length: int) -> None:
    """The bitmap's table, checked entry by entry, then its data (qsd's texts and order)."""
    hdr, meta = driver.hdr, driver.meta
    assert hdr is not None and meta is not None
    cs = hdr.cluster_size
    table = fmt.unpack_u64s(await meta.read(e.table_offset, e.table_size * 8))
    for value in table:
        if value & TABLE_RESERVED_MASK or (value & TABLE_OFFSET_MASK) % cs:
            raise BitmapFormatError(
                f"Could not read bitmap_table table from image for bitmap '{e.name}': "
                "Invalid argument"
            )
    if e.table_size != table_entries(length, 1 << e.granularity_bits, cs):
        raise BitmapFormatError(f"Could not read bitmap '{e.name}' from image: Invalid argument")
    data = bytearray()
    run_start = run_length = 0  # data clusters next to each other on disk: one read
    for value in table:
        offset = value & TABLE_OFFSET_MASK
        if offset and run_length and offset == run_start + run_length:
            run_length += cs
            continue
        if run_length:
            data += await meta.read(run_start, run_length)
            run_length = 0
        if offset:
            run_start, run_length = offset, cs
        else:
            data += (b"\xff" if value & 1 else b"\0") * cs
    if run_length:
        data += await meta.read(run_start, run_length)
    bits.load_packed(data)


async def mark_in_use(driver: Qcow2Driver) -> None:
    """Before the first write of a read-write open: every stored bitmap is `in_use` on disk
    (the directory rewritten in place, synced), and the loaded ones become writable."""
    for bitmap in registry.bitmaps(driver.node):
        if bitmap.persistent:
            bitmap.readonly = False
    if not driver.stored or all(e.flags & IN_USE for e in driver.stored):
        return
    meta = driver.meta
    assert meta is not None
    flags = [e.flags for e in driver.stored]
    for e in driver.stored:
        e.flags |= IN_USE
    offset, _size = meta.bitmap_directory
    try:
        await meta.write(offset, pack_directory(driver.stored), OL_BITMAP_DIRECTORY)
        await meta.sync()
    except OSError as err:
        for e, before in zip(driver.stored, flags, strict=True):
            e.flags = before
        raise QmpError(f"Can't update bitmap directory: {strerror(err)}") from err


def release(driver: Qcow2Driver, *, loaded_only: bool = False) -> None:
    """The node's persistent bitmaps leave memory (they were stored): an inactivated node
    loads them again from the image when it is activated, as qsd 10.0 does. `loaded_only`:
    only the read-only ones loaded while the node could not write, not those added since."""
    for bitmap in list(registry.bitmaps(driver.node)):
        if bitmap.persistent and (bitmap.readonly or not loaded_only):
            registry.release(driver.node, bitmap)


def set_readonly(driver: Qcow2Driver) -> None:
    """The node turned read-only (its bitmaps were stored): they may no longer change."""
    for bitmap in registry.bitmaps(driver.node):
        if bitmap.persistent:
            bitmap.readonly = True


def check_resize(driver: Qcow2Driver) -> None:
    """qsd refuses to resize an image holding a bitmap it could not load."""
    for bitmap in reversed(registry.bitmaps(driver.node)):  # oldest (directory order) first
        if bitmap.persistent:
            bitmap.check_usable(allow_ro=True)


# --- adding and removing ---------------------------------------------------------------------


def check_can_store(driver: Qcow2Driver, name: str, granularity: int) -> None:
    """block-dirty-bitmap-add persistent=true: what the image must allow (qsd's texts)."""
    hdr = driver.hdr
    assert hdr is not None
    node_name = driver.node.name
    prefix = f"Can't make bitmap '{name}' persistent in '{node_name}': "
    if hdr.version < 3:
        raise QmpError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
    gbits = granularity.bit_length() - 1
    if gbits > MAX_GRANULARITY_BITS:
        raise QmpError(prefix + f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)")
    if gbits < MIN_GRANULARITY_BITS:
        raise QmpError(prefix + f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)")
    if len(name.encode()) > MAX_NAME_SIZE:
        raise QmpError(prefix + f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")
    length = -(-hdr.size // registry.SECTOR) * registry.SECTOR
    if table_entries(length, granularity, hdr.cluster_size) * hdr.cluster_size > MAX_PHYS_SIZE:
        raise QmpError(
            prefix + "Too much space will be occupied by the bitmap. Use larger granularity"
        )
    if not driver.stored:
        return
    if len(driver.stored) >= MAX_BITMAPS:
        raise QmpError(prefix + "Maximum number of persistent bitmaps is already reached")
    meta = driver.meta
    assert meta is not None
    if meta.bitmap_directory[1] + entry_size(len(name.encode()), 0) > MAX_DIRECTORY_SIZE:
        raise QmpError(prefix + "Not enough space in the bitmap directory")


async def remove(driver: Qcow2Driver, name: str) -> None:
    """block-dirty-bitmap-remove of a stored bitmap: out of the directory at once."""
    entry = next((e for e in driver.stored if e.name == name), None)
    if entry is None or not driver.writable:
        return
    meta = driver.meta
    assert meta is not None
    async with driver.metadata_lock:
        freed = await clusters_of(driver, entry)
        await _switch_directory(driver, [e for e in driver.stored if e is not entry])
        for offset, count, kind in freed:
            meta.queue_free(offset, count, kind)
        await meta.writeback()


# --- close ---------------------------------------------------------------------------------


def unstorable(driver: Qcow2Driver) -> bool:
    """A read-only node holds persistent bitmaps it could not write back (added at run
    time; the loaded ones are read-only and stay as they are on disk)."""
    return any(b.persistent and not b.readonly for b in registry.bitmaps(driver.node))


async def store(driver: Qcow2Driver) -> None:
    """Write the node's persistent bitmaps into the image (caller holds the metadata lock):
    directory order first, then the ones added since, newest first."""
    meta = driver.meta
    assert meta is not None
    persistent = [b for b in reversed(registry.bitmaps(driver.node)) if b.persistent]
    if not persistent and not driver.stored:
        return
    old = {e.name: e for e in driver.stored}
    position = {name: i for i, name in enumerate(old)}
    # The directory's own order, then the bitmaps added since, newest first (as qsd).
    stored = sorted(
        persistent,
        key=lambda b: (0, position[b.name]) if b.name in position else (1, -b.seq),
    )
    entries: list[StoredBitmap] = []
    freed: list[tuple[int, int, str]] = []
    for bitmap in stored:
        previous = old.pop(bitmap.name, None)
        if bitmap.inconsistent and previous is not None:
            entries.append(previous)  # never loaded: stays as it is, still in_use
            continue
        entries.append(await _write_bits(driver, bitmap, previous))
        if previous is not None:
            freed += await clusters_of(driver, previous)
    for gone in old.values():
        freed += await clusters_of(driver, gone)
    await _switch_directory(driver, entries)
    for offset, count, kind in freed:
        meta.queue_free(offset, count, kind)
    await meta.writeback()


async def _write_bits(
    driver: Qcow2Driver, bitmap: registry.DirtyBitmap, previous: StoredBitmap | None
) -> StoredBitmap:
    """The bitmap's data clusters (all-zero ones left unallocated) and table, written."""
    hdr, meta = driver.hdr, driver.meta
    assert hdr is not None and meta is not None
    cs = hdr.cluster_size
    data = bitmap.bits.packed()
    chunks = [data[start : start + cs] for start in range(0, len(data), cs)]
    used = [bool(chunk.strip(b"\0")) for chunk in chunks]  # all-zero clusters: no cluster
    table: list[int] = []
    name = bitmap.name
    if any(used):
        # One run for all the data clusters, written at once.
        base = await _alloc(meta, sum(used), name)
        run = b"".join(c + bytes(cs - len(c)) for c, u in zip(chunks, used, strict=True) if u)
        await _write(meta, base, run, name)
        for u in used:
            table.append(base if u else 0)
            base += cs if u else 0
    else:
        table = [0] * len(chunks)
    table_offset = 0
    if table:
        raw = fmt.pack_u64s(table)
        clusters = -(-len(raw) // cs)
        table_offset = await _alloc(meta, clusters, name)
        await _write(meta, table_offset, raw, name)  # only its bytes, as qsd: no padding
    extra = previous.extra_data if previous is not None else b""
    flags = (AUTO if bitmap.enabled else 0) | (
        previous.flags & EXTRA_DATA_COMPATIBLE if previous is not None else 0
    )
    return StoredBitmap(
        bitmap.name,
        table_offset,
        len(table),
        flags,
        bitmap.bits.granularity.bit_length() - 1,
        extra,
    )


async def clusters_of(driver: Qcow2Driver, e: StoredBitmap) -> list[tuple[int, int, str]]:
    """(offset, clusters, how freed) runs a stored bitmap holds: its data clusters (qsd
    discards them when freed, whatever pass-discard-other says) and its table (as other
    metadata)."""
    hdr, meta = driver.hdr, driver.meta
    assert hdr is not None and meta is not None
    if not e.table_size or not e.table_offset:
        return []
    cs = hdr.cluster_size
    runs = [
        (value & TABLE_OFFSET_MASK, 1, FREE_ALWAYS)
        for value in fmt.unpack_u64s(await meta.read(e.table_offset, e.table_size * 8))
        if value & TABLE_OFFSET_MASK
    ]
    runs.append((e.table_offset, -(-(e.table_size * 8) // cs), FREE_OTHER))
    return runs


def _failed(err: OSError, text: str) -> OSError:
    """`err` with qsd's words in front ("Failed to ...: No space left on device")."""
    return OSError(err.errno, f"{text}: {strerror(err)}")


async def _alloc(meta: Metadata, clusters: int, name: str) -> int:
    try:
        return await meta.alloc_clusters(clusters)
    except OSError as err:
        raise _failed(err, f"Failed to allocate clusters for bitmap '{name}'") from err


async def _write(meta: Metadata, offset: int, data: bytes, name: str) -> None:
    try:
        await meta.write(offset, data, None)
    except OSError as err:
        raise _failed(err, f"Failed to write bitmap '{name}' to file") from err


async def _switch_directory(driver: Qcow2Driver, entries: list[StoredBitmap]) -> None:
    """A new directory (or none), stable before the header names it; the old one freed."""
    try:
        await _write_directory(driver, entries)
    except OSError as err:
        raise _failed(err, "Failed to update bitmap extension") from err


async def _write_directory(driver: Qcow2Driver, entries: list[StoredBitmap]) -> None:
    hdr, meta = driver.hdr, driver.meta
    assert hdr is not None and meta is not None
    cs = hdr.cluster_size
    offset = size = 0
    if entries:
        raw = pack_directory(entries)
        clusters = -(-len(raw) // cs)
        offset, size = await meta.alloc_clusters(clusters), len(raw)
        await meta.write(offset, raw, None)
    await meta.write_refblocks()
    await meta.sync()
    exts = [e for e in hdr.extensions if e.type != fmt.EXT_BITMAPS]
    autoclear = hdr.autoclear & ~fmt.AUTOCLEAR_BITMAPS
    if entries:
        exts.append(fmt.Extension(fmt.EXT_BITMAPS, _EXT.pack(len(entries), 0, size, offset)))
        autoclear |= fmt.AUTOCLEAR_BITMAPS
    await driver.rewrite_header(exts, autoclear)
    old_offset, old_size = meta.bitmap_directory
    meta.set_bitmap_directory(offset, size)
    if old_size:
        meta.queue_free(old_offset, -(-old_size // cs), FREE_OTHER)
    driver.stored = entries


__all__ = [
    "StoredBitmap",
    "check_can_store",
    "check_resize",
    "clusters_of",
    "image_info",
    "load",
    "mark_in_use",
    "pack_directory",
    "parse_directory",
    "release",
    "remove",
    "set_readonly",
    "store",
    "unstorable",
]
