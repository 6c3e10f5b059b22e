"""The on-disk layout of a new qcow2 image (blockdev-create) and of grown L1 tables.

Pure core: option values in, QEMU's error texts or the bytes to write out; no I/O. A new image
is header, refcount table, refblocks, L1 table, then (preallocated) L2 tables and data
clusters, in that order; with one reftable cluster and one refblock (every image up to several
TiB at 64 KiB clusters) this is exactly qsd 7.2's layout. Invariant: every cluster below
`Layout.end_cluster` has refcount 1 and nothing past it is counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from storage_daemon.blockdev.drivers.qcow2 import format as fmt

DEFAULT_CLUSTER_SIZE = 1 << 16
DEFAULT_REFCOUNT_BITS = 16
MIN_CLUSTER_SIZE = 512
MAX_CLUSTER_SIZE = 2 << 20
MIN_EXTL2_CLUSTER_SIZE = 16384
SECTOR = 512
# QEMU's largest image length: INT64_MAX rounded down to 1 GiB.
MAX_IMAGE_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)
HEADER_LENGTH_V3 = fmt.WRITTEN_HEADER_LENGTH
FEATURE_TABLE_MIN_CLUSTER = 4096

# The feature-name table qsd writes into every v3 header: (type, bit, name).
FEATURE_TABLE: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)


class CreateError(Exception):
    """Options qsd refuses; `str()` is qsd's job error text."""


@dataclass(frozen=True)
class CreateParams:
    size: int
    version: int = 3
    cluster_bits: int = 16
    refcount_order: int = 4
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: int = 0
    backing_file: str | None = None
    backing_fmt: str | None = None
    data_file: str | None = None
    data_file_raw: bool = False
    preallocation: str = "off"

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size


def validate(
    *,
    size: int,
    version: str | None,
    cluster_size: int | None,
    refcount_bits: int | None,
    lazy_refcounts: bool | None,
    extended_l2: bool | None,
    compression_type: str | None,
    backing_file: str | None,
    backing_fmt: str | None,
    has_data_file: bool,
    data_file_raw: bool | None,
    preallocation: str | None,
) -> CreateParams:
    """qsd's checks of blockdev-create qcow2 options, in qsd's order, with its texts."""
    if size % SECTOR:
        raise CreateError("Image size must be a multiple of 512 bytes")
    v = 2 if version == "v2" else 3
    ext_l2 = bool(extended_l2)
    if ext_l2 and v < 3:
        raise CreateError(
            "Extended L2 entries are only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    cs = DEFAULT_CLUSTER_SIZE if cluster_size is None else cluster_size
    if cs < MIN_CLUSTER_SIZE or cs > MAX_CLUSTER_SIZE or cs & (cs - 1):
        raise CreateError("Cluster size must be a power of two between 512 and 2048k")
    if ext_l2 and cs < MIN_EXTL2_CLUSTER_SIZE:
        raise CreateError(
            "Extended L2 entries are only supported with cluster sizes of at least "
            f"{MIN_EXTL2_CLUSTER_SIZE} bytes"
        )
    if lazy_refcounts and v < 3:
        raise CreateError(
            "Lazy refcounts only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    rb = DEFAULT_REFCOUNT_BITS if refcount_bits is None else refcount_bits
    if rb <= 0 or rb > 64 or rb & (rb - 1):
        raise CreateError("Refcount width must be a power of two and may not exceed 64 bits")
    if v < 3 and rb != 16:
        raise CreateError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use version=v3 or greater)"
        )
    if has_data_file and v < 3:
        raise CreateError(
            "External data files are only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    raw = bool(data_file_raw)
    if raw and not has_data_file:
        raise CreateError("data-file-raw requires data-file")
    if raw and backing_file:
        raise CreateError("Backing file and data-file-raw cannot be used at the same time")
    if backing_fmt and not backing_file:
        raise CreateError("Backing format cannot be used without backing file")
    ctype = 1 if compression_type == "zstd" else 0
    if ctype and v < 3:
        raise CreateError(
            "Non-zlib compression type is only supported with compatibility level 1.1 and "
            "above (use version=v3 or greater)"
        )
    prealloc = preallocation or "off"
    if backing_file and prealloc != "off" and not ext_l2:
        raise CreateError(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
        )
    if raw and prealloc == "off":
        prealloc = "metadata"  # the data file must read as the guest disk from the start
    return CreateParams(
        size=size,
        version=v,
        cluster_bits=cs.bit_length() - 1,
        refcount_order=rb.bit_length() - 1,
        lazy_refcounts=bool(lazy_refcounts),
        extended_l2=ext_l2,
        compression_type=ctype,
        backing_file=backing_file or None,
        backing_fmt=backing_fmt,
        data_file=None,
        data_file_raw=raw,
        preallocation=prealloc,
    )


def check_length(size: int, cluster_bits: int, l2_entry_size: int) -> None:
    """qsd's limits on the virtual size (its 'Could not resize image' texts)."""
    if size > MAX_IMAGE_LENGTH:
        raise CreateError(
            f"Could not resize image: offset({size}) exceeds maximum({MAX_IMAGE_LENGTH})"
        )
    if fmt.l1_entries_needed(size, cluster_bits, l2_entry_size) > fmt.MAX_L1_SIZE // 8:
        raise CreateError("Could not resize image: Failed to grow the L1 table: File too large")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Layout:
    """Cluster indexes of every structure of a new image."""

    params: CreateParams
    l1_size: int
    reftable_cluster: int
    reftable_clusters: int
    refblock_cluster: int
    refblocks: int
    l1_cluster: int
    l1_clusters: int
    l2_cluster: int
    l2_tables: int
    data_cluster: int
    data_clusters: int

    @property
    def end_cluster(self) -> int:
        return self.data_cluster + self.data_clusters

    @property
    def l1_offset(self) -> int:
        return self.l1_cluster << self.params.cluster_bits if self.l1_size else 0

    @property
    def file_length(self) -> int:
        """The image file's length: the end of the L1 table's bytes, or of preallocation."""
        p = self.params
        if self.data_clusters:
            return self.end_cluster << p.cluster_bits
        if self.l2_tables:
            return (self.l2_cluster + self.l2_tables) << p.cluster_bits
        if self.l1_size:
            return (self.l1_cluster << p.cluster_bits) + self.l1_size * 8
        return self.l1_cluster << p.cluster_bits


def plan(p: CreateParams, size: int | None = None) -> Layout:
    """Place every structure for virtual size `size` (default `p.size`)."""
    size = p.size if size is None else size
    cs = p.cluster_size
    guest_clusters = _ceil(size, cs)
    l1_size = fmt.l1_entries_needed(size, p.cluster_bits, p.l2_entry_size)
    l1_clusters = _ceil(l1_size * 8, cs)
    prealloc = p.preallocation != "off"
    l2_tables = _ceil(guest_clusters, p.l2_entries) if prealloc else 0
    data_clusters = guest_clusters if prealloc and p.data_file is None else 0
    rb_entries = fmt.refblock_entries(p.cluster_bits, p.refcount_order)
    fixed = 1 + l1_clusters + l2_tables + data_clusters
    refblocks, rt_clusters = 1, 1
    while True:
        total = fixed + refblocks + rt_clusters
        need_rb = _ceil(total, rb_entries)
        need_rt = max(1, _ceil(need_rb * 8, cs))
        if need_rb <= refblocks and need_rt <= rt_clusters:
            break
        refblocks, rt_clusters = max(refblocks, need_rb), max(rt_clusters, need_rt)
    if rt_clusters > fmt.MAX_REFTABLE_SIZE // cs:
        raise CreateError("Could not resize image: File too large")
    refblock_cluster = 1 + rt_clusters
    l1_cluster = refblock_cluster + refblocks
    l2_cluster = l1_cluster + l1_clusters
    return Layout(
        params=p,
        l1_size=l1_size,
        reftable_cluster=1,
        reftable_clusters=rt_clusters,
        refblock_cluster=refblock_cluster,
        refblocks=refblocks,
        l1_cluster=l1_cluster,
        l1_clusters=l1_clusters,
        l2_cluster=l2_cluster,
        l2_tables=l2_tables,
        data_cluster=l2_cluster + l2_tables,
        data_clusters=data_clusters,
    )


def _extension(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data + bytes(-len(data) % 8)


def header_cluster(lay: Layout) -> bytes:
    """Cluster 0: fixed header, extensions (backing format, data file, feature names), end
    marker, then the backing file name; as qsd writes them."""
    p = lay.params
    incompatible = 0
    if p.data_file is not None:
        incompatible |= fmt.INCOMPAT_DATA_FILE
    if p.compression_type:
        incompatible |= fmt.INCOMPAT_COMPRESSION
    if p.extended_l2:
        incompatible |= fmt.INCOMPAT_EXTL2
    hdr = fmt.Header(
        version=p.version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=p.cluster_bits,
        size=p.size,
        crypt_method=0,
        l1_size=lay.l1_size,
        l1_table_offset=lay.l1_offset,
        refcount_table_offset=lay.reftable_cluster << p.cluster_bits,
        refcount_table_clusters=lay.reftable_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible=incompatible,
        compatible=fmt.COMPAT_LAZY_REFCOUNTS if p.lazy_refcounts else 0,
        autoclear=fmt.AUTOCLEAR_DATA_FILE_RAW if p.data_file_raw else 0,
        refcount_order=p.refcount_order,
        header_length=HEADER_LENGTH_V3 if p.version == 3 else fmt.V2_HEADER_LENGTH,
    )
    body = bytearray()
    if p.backing_file and p.backing_fmt:
        body += _extension(fmt.EXT_BACKING_FORMAT, p.backing_fmt.encode())
    if p.data_file is not None:
        body += _extension(fmt.EXT_DATA_FILE, p.data_file.encode())
    # qsd 7.2 writes the feature names only with clusters larger than 4 KiB (measured).
    if p.version == 3 and p.cluster_size > FEATURE_TABLE_MIN_CLUSTER:
        table = bytearray()
        for ftype, bit, name in FEATURE_TABLE:
            table += bytes((ftype, bit)) + name.encode().ljust(46, b"\0")
        body += _extension(fmt.EXT_FEATURE_TABLE, bytes(table))
    body += bytes(8)
    start = hdr.header_length
    raw_name = p.backing_file.encode() if p.backing_file else b""
    if raw_name:
        if (
            len(raw_name) > fmt.MAX_BACKING_NAME
            or start + len(body) + len(raw_name) > p.cluster_size
        ):
            raise CreateError(
                f"Could not assign backing file '{p.backing_file}' with format "
                f"'{p.backing_fmt or '(null)'}': Invalid argument"
            )
        hdr.backing_file_offset = start + len(body)
        hdr.backing_file_size = len(raw_name)
    if start + len(body) > p.cluster_size:
        raise CreateError("Could not update qcow2 header: File too large")
    out = bytearray(p.cluster_size)
    fixed = fmt.header_field_bytes(hdr)
    out[: len(fixed)] = fixed
    if p.version == 3:
        out[fmt.V3_HEADER_LENGTH] = p.compression_type
    out[start : start + len(body)] = body
    if raw_name:
        out[hdr.backing_file_offset : hdr.backing_file_offset + len(raw_name)] = raw_name
    return bytes(out)


def reftable_bytes(lay: Layout) -> bytes:
    p = lay.params
    entries = [(lay.refblock_cluster + i) << p.cluster_bits for i in range(lay.refblocks)]
    table = bytearray(lay.reftable_clusters << p.cluster_bits)
    table[: len(entries) * 8] = fmt.pack_u64s(entries)
    return bytes(table)


def refblocks(lay: Layout) -> Iterator[tuple[int, bytes]]:
    """(cluster index, bytes) of each refblock: refcount 1 for clusters [0, end_cluster)."""
    p = lay.params
    per_block = fmt.refblock_entries(p.cluster_bits, p.refcount_order)
    width_bits = 1 << p.refcount_order
    one = _one_run(width_bits)
    for i in range(lay.refblocks):
        used = max(0, min(per_block, lay.end_cluster - i * per_block))
        block = bytearray(p.cluster_size)
        full_bytes = used * width_bits // 8
        block[:full_bytes] = (one * _ceil(full_bytes, len(one)))[:full_bytes]
        for index in range(full_bytes * 8 // width_bits, used):  # a partial byte (< 8 bits)
            fmt.refcount_set(block, index, p.refcount_order, 1)
        yield lay.refblock_cluster + i, bytes(block)


def _one_run(width_bits: int) -> bytes:
    """The bytes of consecutive refcounts of 1 (one byte's worth for narrow widths)."""
    if width_bits >= 8:
        return (1).to_bytes(width_bits // 8, "big")
    value = 0
    for slot in range(8 // width_bits):
        value |= 1 << (slot * width_bits)
    return bytes((value,))


def l1_bytes(lay: Layout) -> bytes:
    p = lay.params
    if not lay.l2_tables:
        return bytes(lay.l1_size * 8)
    entries = [
        ((lay.l2_cluster + i) << p.cluster_bits) | fmt.OFLAG_COPIED if i < lay.l2_tables else 0
        for i in range(lay.l1_size)
    ]
    return fmt.pack_u64s(entries)


def l2_table(lay: Layout, index: int, bitmap: int) -> bytes:
    """Preallocated L2 table `index`: each guest cluster mapped (data cluster, or the same
    offset in the external data file), COPIED."""
    p = lay.params
    cs_bits = p.cluster_bits
    guest_clusters = _ceil(p.size, p.cluster_size)
    first = index * p.l2_entries
    count = max(0, min(p.l2_entries, guest_clusters - first))
    values: list[int] = []
    for n in range(first, first + count):
        # With an external data file, guest offset == host offset.
        host = n << cs_bits if p.data_file is not None else (lay.data_cluster + n) << cs_bits
        values.append(host | fmt.OFLAG_COPIED)
        if p.extended_l2:
            values.append(bitmap)
    table = bytearray(p.cluster_size)
    table[: len(values) * 8] = fmt.pack_u64s(values)
    return bytes(table)


def image_writes(layout: Layout) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of every structure of a new image, the header last; the file must be
    `layout.file_length` bytes long (a sparse file) before they are written."""
    cb = layout.params.cluster_bits
    yield layout.reftable_cluster << cb, reftable_bytes(layout)
    for cluster, block in refblocks(layout):
        yield cluster << cb, block
    if layout.l1_size:
        yield layout.l1_cluster << cb, l1_bytes(layout)
    bitmap = 0 if layout.params.backing_file else (1 << 32) - 1
    for index in range(layout.l2_tables):
        yield (layout.l2_cluster + index) << cb, l2_table(layout, index, bitmap)
    yield 0, header_cluster(layout)
