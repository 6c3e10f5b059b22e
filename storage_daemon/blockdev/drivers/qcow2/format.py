"""qcow2 on-disk structures: header, extensions, table entries, refcounts, snapshots.

Pure core: bytes in, values out (and back), no I/O. `parse_header` applies QEMU 7.2's
open-time sanity checks in QEMU's order and raises `FormatError` with QEMU's exact texts, so
a hostile header never makes a caller allocate a table larger than the documented limits.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

MAGIC = b"QFI\xfb"
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFTABLE_SIZE = 8 << 20  # bytes
MAX_L1_SIZE = 32 << 20  # bytes
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE = 64 << 20
MAX_SNAPSHOT_EXTRA = 1024
MAX_BACKING_NAME = 1023
SNAPSHOT_HEADER_SIZE = 40
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
WRITTEN_HEADER_LENGTH = 112

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = 0x3

# Header extension types.
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Table entry bits.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
SUBCLUSTERS = 32
ALL_SUBCLUSTERS = (1 << SUBCLUSTERS) - 1

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")
_SNAP = struct.Struct(">QIHHIIQII")
_U64 = struct.Struct(">Q")


class FormatError(Exception):
    """An image QEMU refuses to open; `str()` is QEMU's message."""


class FormatUnsupported(FormatError):
    """Refused because of a feature (ENOTSUP in QEMU)."""


@dataclass
class Extension:
    type: int
    data: bytes


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    extensions: list[Extension] = field(default_factory=list)
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def reftable_entries(self) -> int:
        return self.refcount_table_clusters * (self.cluster_size // 8)

    @property
    def ext_end(self) -> int:
        return self.backing_file_offset or self.cluster_size


def l1_entries_needed(size: int, cluster_bits: int, l2_entry_size: int) -> int:
    """L1 entries that map `size` guest bytes."""
    shift = cluster_bits + cluster_bits - (3 if l2_entry_size == 8 else 4)
    return (size + (1 << shift) - 1) >> shift


def _valid_table(offset: int, entries: int, entry_len: int, cluster_size: int) -> bool:
    if offset % cluster_size:
        return False
    if entries > INT64_MAX // entry_len:
        return False
    return INT64_MAX - entries * entry_len >= offset


def parse_fixed_header(buf: bytes) -> Header:
    """The fixed header fields, with the checks QEMU makes before it reads anything else."""
    if len(buf) < _V2.size or buf[:4] != MAGIC:
        raise FormatError("Image is not in qcow2 format")
    fields = _V2.unpack_from(buf)
    hdr = Header(*fields[1:])
    if hdr.version < 2 or hdr.version > 3:
        raise FormatUnsupported(f"Unsupported qcow2 version {hdr.version}")
    if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"Unsupported cluster size: 2^{hdr.cluster_bits}")
    if hdr.version == 3:
        if len(buf) < V3_HEADER_LENGTH:
            raise FormatError("Image is not in qcow2 format")
        (
            hdr.incompatible,
            hdr.compatible,
            hdr.autoclear,
            hdr.refcount_order,
            hdr.header_length,
        ) = _V3.unpack_from(buf, _V2.size)
        if hdr.header_length < V3_HEADER_LENGTH:
            raise FormatError("qcow2 header too short")
        if hdr.header_length > hdr.cluster_size:
            raise FormatError("qcow2 header exceeds cluster size")
        if hdr.header_length > V3_HEADER_LENGTH and len(buf) > V3_HEADER_LENGTH:
            hdr.compression_type = buf[V3_HEADER_LENGTH]
    if hdr.backing_file_offset > hdr.cluster_size:
        raise FormatError("Invalid backing file offset")
    return hdr


def _validate_compression(hdr: Header) -> None:
    if hdr.compression_type > 1:
        raise FormatError(f"qcow2: unknown compression type: {hdr.compression_type}")
    if hdr.compression_type == 0 and hdr.incompatible & INCOMPAT_COMPRESSION:
        raise FormatError("qcow2: Compression type incompatible feature bit must not be set")
    if hdr.compression_type != 0 and not hdr.incompatible & INCOMPAT_COMPRESSION:
        raise FormatError("qcow2: Compression type incompatible feature bit must be set")


def iter_extensions(cluster0: bytes, hdr: Header) -> Iterator[Extension]:
    """The header extensions in cluster 0, in order; `Header extension too large` is raised
    when the overrunning one is reached (QEMU checks each extension as it reads it)."""
    offset = hdr.header_length
    end = min(hdr.ext_end, len(cluster0))
    while offset < end:
        if offset + _EXT.size > len(cluster0):
            break
        ext_type, ext_len = _EXT.unpack_from(cluster0, offset)
        offset += _EXT.size
        if ext_type == EXT_END:
            break
        if ext_len > end - offset:
            raise FormatError("Header extension too large")
        yield Extension(ext_type, bytes(cluster0[offset : offset + ext_len]))
        offset += (ext_len + 7) & ~7


def feature_names(exts: list[Extension]) -> dict[tuple[int, int], str]:
    """(type, bit) -> name from a feature-name table extension."""
    names: dict[tuple[int, int], str] = {}
    for ext in exts:
        if ext.type != EXT_FEATURE_TABLE:
            continue
        for pos in range(0, len(ext.data) - 47, 48):
            ftype, bit = ext.data[pos], ext.data[pos + 1]
            raw = ext.data[pos + 2 : pos + 48].split(b"\0", 1)[0]
            names[(ftype, bit)] = raw.decode("utf-8", "replace")
    return names


def unsupported_features(mask: int, names: dict[tuple[int, int], str]) -> str:
    parts: list[str] = []
    for (ftype, bit), name in sorted(names.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if ftype == 0 and bit < 64 and mask & (1 << bit):
            parts.append(name)
            mask &= ~(1 << bit)
    if mask:
        parts.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(parts)


def parse_header(cluster0: bytes, *, writable: bool = False) -> Header:
    """Parse and sanity-check the header cluster (at least the first cluster's bytes).

    Checks run in QEMU 7.2's order, so an image with several bad fields gets QEMU's message.
    The table checks bound every table the caller will read by QEMU's limits.
    """
    hdr = parse_fixed_header(cluster0)
    cluster_size = hdr.cluster_size
    _validate_compression(hdr)
    if hdr.incompatible & ~INCOMPAT_KNOWN:
        names = feature_names(_safe_extensions(cluster0, hdr))
        raise FormatUnsupported(
            "Unsupported qcow2 feature(s): "
            + unsupported_features(hdr.incompatible & ~INCOMPAT_KNOWN, names)
        )
    if hdr.incompatible & INCOMPAT_CORRUPT and writable:
        raise FormatError("qcow2: Image is corrupt; cannot be opened read/write")
    if hdr.extended_l2 and cluster_size // SUBCLUSTERS < 512:
        raise FormatError(f"Unsupported subcluster size: {cluster_size // SUBCLUSTERS}")
    if hdr.refcount_order > 6:
        raise FormatError("Reference count entry width too large; may not exceed 64 bits")
    # Refcount table.
    if hdr.refcount_table_clusters == 0:
        raise FormatError("Image does not contain a reference count table")
    if hdr.refcount_table_clusters > MAX_REFTABLE_SIZE // cluster_size:
        raise FormatError("Reference count table too large")
    if not _valid_table(hdr.refcount_table_offset, hdr.reftable_entries, 8, cluster_size):
        raise FormatError("Reference count table offset invalid")
    # Snapshot table.
    if hdr.nb_snapshots > MAX_SNAPSHOTS:
        raise FormatError("Snapshot table too large")
    if not _valid_table(hdr.snapshots_offset, hdr.nb_snapshots, SNAPSHOT_HEADER_SIZE, cluster_size):
        raise FormatError("Snapshot table offset invalid")
    # Active L1 table.
    if hdr.l1_size > MAX_L1_SIZE // 8:
        raise FormatError("Active L1 table too large")
    if not _valid_table(hdr.l1_table_offset, hdr.l1_size, 8, cluster_size):
        raise FormatError("Active L1 table offset invalid")
    needed = l1_entries_needed(hdr.size, hdr.cluster_bits, hdr.l2_entry_size)
    if needed > INT_MAX:
        raise FormatError("Image is too big")
    if hdr.l1_size < needed:
        raise FormatError("L1 table is too small")
    if hdr.crypt_method > 2:
        raise FormatError(f"Unsupported encryption method {hdr.crypt_method}")
    return hdr


def _safe_extensions(cluster0: bytes, hdr: Header) -> list[Extension]:
    exts: list[Extension] = []
    try:
        exts.extend(iter_extensions(cluster0, hdr))
    except FormatError:
        pass
    return exts


def parse_extensions(cluster0: bytes, hdr: Header) -> None:
    """Read the header extensions and the backing file name into `hdr` (QEMU's later step)."""
    hdr.extensions = []
    for ext in iter_extensions(cluster0, hdr):
        hdr.extensions.append(ext)
        if ext.type == EXT_BACKING_FORMAT:
            if len(ext.data) >= 16:
                raise FormatError(
                    f"ERROR: ext_backing_format: len={len(ext.data)} too large (>=16)"
                )
            hdr.backing_format = ext.data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif ext.type == EXT_CRYPTO and hdr.crypt_method != 2:
            raise FormatError("CRYPTO header extension only expected with LUKS encryption method")
        elif ext.type == EXT_BITMAPS:
            if len(ext.data) != 24:  # checked first, with or without the autoclear bit (qsd)
                raise FormatError("bitmaps_ext: Invalid extension length")
            if hdr.autoclear & AUTOCLEAR_BITMAPS:
                _check_bitmaps_ext(ext.data, hdr.cluster_size)
        elif ext.type == EXT_DATA_FILE:
            hdr.data_file = ext.data.split(b"\0", 1)[0].decode("utf-8", "replace")
    hdr.feature_names = feature_names(hdr.extensions)
    if hdr.backing_file_offset:
        length = hdr.backing_file_size
        if length > min(MAX_BACKING_NAME, hdr.cluster_size - hdr.backing_file_offset):
            raise FormatError("Backing file name too long")
        raw = bytes(cluster0[hdr.backing_file_offset : hdr.backing_file_offset + length])
        # A C string to qsd: a NUL inside ends the name there.
        hdr.backing_file = raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _check_bitmaps_ext(data: bytes, cluster_size: int) -> None:
    nb_bitmaps, reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", data)
    if reserved:
        raise FormatError("bitmaps_ext: Reserved field is not zero")
    if nb_bitmaps == 0:
        raise FormatError("found bitmaps extension with zero bitmaps")
    if nb_bitmaps > 65535:
        raise FormatError(
            f"bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU supported "
            "maximum of 65535"
        )
    if dir_size > 1024 * 65535:
        raise FormatError("bitmaps_ext: bitmap directory size is too large")
    if dir_offset % cluster_size:
        raise FormatError("bitmaps_ext: invalid dir_offset")


def header_field_bytes(hdr: Header) -> bytes:
    """The 72 (v2) or 104+ (v3) fixed header bytes for `hdr` (QEMU writes 112 for v3)."""
    out = bytearray(
        _V2.pack(
            MAGIC,
            hdr.version,
            hdr.backing_file_offset,
            hdr.backing_file_size,
            hdr.cluster_bits,
            hdr.size,
            hdr.crypt_method,
            hdr.l1_size,
            hdr.l1_table_offset,
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters,
            hdr.nb_snapshots,
            hdr.snapshots_offset,
        )
    )
    if hdr.version == 3:
        out += _V3.pack(
            hdr.incompatible,
            hdr.compatible,
            hdr.autoclear,
            hdr.refcount_order,
            hdr.header_length,
        )
    return bytes(out)


# --- guest mapping ---------------------------------------------------------------------


class ClusterType(IntEnum):
    UNALLOCATED = 0  # reads from the backing file
    ZERO_PLAIN = 1  # reads zeroes, no host cluster
    ZERO_ALLOC = 2  # reads zeroes, host cluster kept (preallocated)
    NORMAL = 3
    COMPRESSED = 4
    UNALLOCATED_ALLOC = 5  # extended L2: host cluster exists, subcluster not allocated


@dataclass(frozen=True)
class L2Entry:
    """One decoded L2 entry (bitmap 0 for standard entries)."""

    raw: int
    bitmap: int = 0

    @property
    def copied(self) -> bool:
        return bool(self.raw & OFLAG_COPIED)

    @property
    def compressed(self) -> bool:
        return bool(self.raw & OFLAG_COMPRESSED)

    @property
    def offset(self) -> int:
        return self.raw & L2E_OFFSET_MASK


def l2_get(table: bytes | bytearray, index: int, extended: bool) -> L2Entry:
    if extended:
        raw, bitmap = struct.unpack_from(">QQ", table, index * 16)
        return L2Entry(raw, bitmap)
    return L2Entry(_U64.unpack_from(table, index * 8)[0])


def l2_set(table: bytearray, index: int, extended: bool, raw: int, bitmap: int = 0) -> None:
    if extended:
        struct.pack_into(">QQ", table, index * 16, raw, bitmap)
    else:
        _U64.pack_into(table, index * 8, raw)


def cluster_type(entry: L2Entry, extended: bool, has_data_file: bool = False) -> ClusterType:
    """The type of a whole cluster (standard entries), or of its host mapping (extended)."""
    if entry.compressed:
        return ClusterType.COMPRESSED
    offset = entry.offset
    if not extended and entry.raw & OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if offset else ClusterType.ZERO_PLAIN
    if offset or (has_data_file and entry.copied):
        return ClusterType.NORMAL
    return ClusterType.UNALLOCATED


class InvalidEntry(Exception):
    """An L2 entry QEMU treats as corruption."""


def subcluster_type(entry: L2Entry, sc_index: int, has_data_file: bool = False) -> ClusterType:
    """Extended L2: the state of one subcluster; InvalidEntry for contradictory bitmaps."""
    bitmap = entry.bitmap
    alloc = (bitmap >> sc_index) & 1
    zero = (bitmap >> (32 + sc_index)) & 1
    if entry.compressed:  # its bitmap should be 0; qsd ignores it (only check reports it)
        return ClusterType.COMPRESSED
    host = entry.offset or (has_data_file and entry.copied)
    if not host:
        if bitmap & ALL_SUBCLUSTERS:
            raise InvalidEntry("unallocated cluster with allocated subclusters")
        return ClusterType.ZERO_PLAIN if zero else ClusterType.UNALLOCATED
    if alloc and zero:
        raise InvalidEntry("subcluster both allocated and zero")
    if alloc:
        return ClusterType.NORMAL
    if zero:
        return ClusterType.ZERO_ALLOC
    return ClusterType.UNALLOCATED_ALLOC


def compressed_span(raw: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, byte length that may hold the stream) of a compressed entry."""
    shift = 62 - (cluster_bits - 8)
    offset = raw & ((1 << shift) - 1)
    sectors = ((raw >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * 512 - (offset & 511)


# --- refcounts -------------------------------------------------------------------------


def refcount_get(block: bytes | bytearray, index: int, order: int) -> int:
    if order >= 3:
        width = 1 << (order - 3)
        pos = index * width
        return int.from_bytes(block[pos : pos + width], "big")
    bits = 1 << order
    per_byte = 8 >> order
    shift = (index % per_byte) * bits
    return (block[index // per_byte] >> shift) & ((1 << bits) - 1)


def refcount_set(block: bytearray, index: int, order: int, value: int) -> None:
    if order >= 3:
        width = 1 << (order - 3)
        pos = index * width
        block[pos : pos + width] = value.to_bytes(width, "big")
        return
    bits = 1 << order
    per_byte = 8 >> order
    shift = (index % per_byte) * bits
    mask = ((1 << bits) - 1) << shift
    byte = index // per_byte
    block[byte] = (block[byte] & ~mask) | ((value << shift) & mask)


def refcount_max(order: int) -> int:
    return (1 << (1 << order)) - 1


def refblock_entries(cluster_bits: int, order: int) -> int:
    return 1 << (cluster_bits + 3 - order)


def first_free(block: bytes | bytearray, start: int, order: int) -> int:
    """The index of the first zero refcount at or after `start` in a block, or -1."""
    entries = len(block) * 8 >> order
    if order >= 3:
        width = 1 << (order - 3)
        zero = bytes(width)
        pos = start * width
        while pos < len(block):
            hit = block.find(zero, pos)
            if hit < 0:
                return -1
            if hit % width == 0:
                return hit // width
            pos = hit + (width - hit % width)
        return -1
    for index in range(start, entries):
        if not refcount_get(block, index, order):
            return index
    return -1


# --- snapshots -------------------------------------------------------------------------


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None
    extra: bytes

    def info(self) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None and self.icount != (1 << 64) - 1:
            out["icount"] = self.icount
        return out


class NeedMore(Exception):
    """The snapshot table parser needs `need` bytes in total."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


def parse_snapshots(buf: bytes | bytearray, count: int) -> tuple[list[Snapshot], int]:
    """Parse `count` entries from the start of `buf`; (snapshots, table size in bytes).

    Raises NeedMore when `buf` is too short (reads past EOF are zeroes for the caller),
    FormatError with QEMU's texts for oversized entries or tables.
    """
    snaps: list[Snapshot] = []
    pos = 0
    for index in range(count):
        pos = (pos + 7) & ~7
        if pos + SNAPSHOT_HEADER_SIZE > len(buf):
            raise NeedMore(pos + SNAPSHOT_HEADER_SIZE)
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmns, vmsz, extra_len) = _SNAP.unpack_from(
            buf, pos
        )
        pos += SNAPSHOT_HEADER_SIZE
        if extra_len > MAX_SNAPSHOT_EXTRA:
            raise FormatError(f"Too much extra metadata in snapshot table entry {index}")
        end = pos + extra_len + id_len + name_len
        if end > MAX_SNAPSHOT_TABLE:
            raise FormatError("Snapshot table is too big")
        if end > len(buf):
            raise NeedMore(end)
        extra = bytes(buf[pos : pos + extra_len])
        pos += extra_len
        vm_state = vmsz
        disk_size: int | None = None
        icount: int | None = None
        if extra_len >= 8:
            vm_state = _U64.unpack_from(extra, 0)[0]
        if extra_len >= 16:
            disk_size = _U64.unpack_from(extra, 8)[0]
        if extra_len >= 24:
            icount = _U64.unpack_from(extra, 16)[0]
        sid = bytes(buf[pos : pos + id_len]).decode("utf-8", "replace")
        pos += id_len
        name = bytes(buf[pos : pos + name_len]).decode("utf-8", "replace")
        pos += name_len
        snaps.append(
            Snapshot(
                l1_off, l1_size, sid, name, dsec, dnsec, vmns, vm_state, disk_size, icount, extra
            )
        )
    return snaps, pos


ICOUNT_NONE = (1 << 64) - 1
SNAPSHOT_EXTRA_SIZE = 24  # vm_state_size_large, disk_size, icount: what QEMU writes


def new_snapshot(
    name: str, l1_table_offset: int, l1_size: int, disk_size: int, realtime_ns: int, sid: str
) -> Snapshot:
    """An entry as qsd writes one: the date (to the microsecond) also as the VM clock (qsd
    has no guest, its virtual clock is the real one), no VM state, no icount."""
    usec = realtime_ns // 1000
    date_sec, date_nsec = divmod(usec, 1_000_000)
    date_nsec *= 1000
    extra = _U64.pack(0) + _U64.pack(disk_size) + _U64.pack(ICOUNT_NONE)
    return Snapshot(
        l1_table_offset,
        l1_size,
        sid,
        name,
        date_sec,
        date_nsec,
        date_sec * 1_000_000_000 + date_nsec,
        0,
        disk_size,
        ICOUNT_NONE,
        extra,
    )


def next_snapshot_id(snaps: list[Snapshot]) -> str:
    """QEMU's rule: one past the largest numeric id (non-numeric ids count as 0)."""
    top = 0
    for snap in snaps:
        if snap.id.isdigit():
            top = max(top, int(snap.id))
    return str(top + 1)


def pack_snapshots(snaps: list[Snapshot]) -> bytes:
    """The snapshot table: each entry starts 8-byte aligned (`parse_snapshots` reversed)."""
    out = bytearray()
    for snap in snaps:
        out.extend(bytes(-len(out) % 8))
        sid, name = snap.id.encode(), snap.name.encode()
        vm_state_small = snap.vm_state_size if snap.vm_state_size < (1 << 32) else 0
        out += _SNAP.pack(
            snap.l1_table_offset,
            snap.l1_size,
            len(sid),
            len(name),
            snap.date_sec,
            snap.date_nsec,
            snap.vm_clock_nsec,
            vm_state_small,
            len(snap.extra),
        )
        out += snap.extra + sid + name
    return bytes(out)


# --- tables ----------------------------------------------------------------------------


def unpack_u64s(buf: bytes | bytearray | memoryview) -> list[int]:
    count = len(buf) // 8
    return list(struct.unpack(f">{count}Q", bytes(buf[: count * 8])))


def pack_u64s(values: list[int]) -> bytes:
    return struct.pack(f">{len(values)}Q", *values)
