"""Guest offset -> host mapping of a qcow2 image, and reading guest data through it.

Domain ring. `Mapper.extent` answers "what backs the bytes from here on" from the L1/L2
tables (cached); `Mapper.read` assembles guest data from host clusters, zero clusters,
compressed clusters and the backing chain. Invariant: readers never modify metadata and never
start a write-back; heavy CPU work (decompression of large clusters) runs off the event loop;
the one-entry cache of decompressed data never keeps what a read fetched before the last
`forget_compressed` (a generation counter). blkdebug events are raised on the file edge.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import zlib
from io import BytesIO
from typing import NamedTuple

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.drivers.blkdebug import debug_event
from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.alloc import Corruption, Metadata
from storage_daemon.blockdev.drivers.qcow2.format import ClusterType

# At most this many clusters are examined for one extent (bounds the time of one call).
MAX_EXTENT_UNITS = 8192
_OFFLOAD_BYTES = 64 * 1024

try:  # optional: zstd-compressed images need the `zstandard` package
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None  # type: ignore[assignment]


class Extent(NamedTuple):
    """A run of guest bytes with one cluster kind (a tuple: built once per block-status
    query and per read, where a frozen dataclass' __init__ cost a microsecond)."""

    kind: ClusterType
    length: int
    host: int  # host byte offset of the first byte (NORMAL), else 0
    raw: int = 0  # the L2 entry (COMPRESSED)


def _eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def decompress(data: bytes, cluster_size: int, zstd: bool) -> bytes:
    """One compressed cluster's bytes; EIO when the stream is not exactly a full cluster.
    Output is bounded by the cluster size (one byte more, to tell a longer stream): a
    hostile image's few KiB of zstd can otherwise expand to gigabytes."""
    try:
        if zstd:
            if zstandard is None:
                raise OSError(errno.ENOTSUP, "zstd compression is not supported")
            reader = zstandard.ZstdDecompressor().stream_reader(BytesIO(data))
            out = reader.read(cluster_size + 1)
            if len(out) > cluster_size:  # more than a cluster: qsd's EIO, as for a short one
                raise _eio()
        else:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
    except (zlib.error, ValueError) as err:
        raise _eio() from err
    except Exception as err:
        if zstandard is not None and isinstance(err, zstandard.ZstdError):
            raise _eio() from err
        raise
    if len(out) < cluster_size:
        raise _eio()
    return out[:cluster_size]


_NOT_PLAIN = fmt.OFLAG_COMPRESSED | fmt.OFLAG_ZERO


def _standard_kind(value: int, has_data_file: bool) -> ClusterType:
    """`fmt.cluster_type` of a standard entry, from its integer value."""
    if value & fmt.OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    offset = value & fmt.L2E_OFFSET_MASK
    if value & fmt.OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if offset else ClusterType.ZERO_PLAIN
    if offset or (has_data_file and value & fmt.OFLAG_COPIED):
        return ClusterType.NORMAL
    return ClusterType.UNALLOCATED


class Mapper:
    def __init__(
        self,
        meta: Metadata,
        size: int,
        data: BdrvChild,
        has_data_file: bool,
    ) -> None:
        self.meta = meta
        self.size = size
        self.data = data
        self.backing: BdrvChild | None = None
        self.has_data_file = has_data_file
        self.extended = meta.hdr.extended_l2
        self.cluster_bits = meta.cluster_bits
        self.cluster_size = meta.cluster_size
        self.l2_entries = meta.hdr.l2_entries
        self.sc_bits = self.cluster_bits - 5 if self.extended else self.cluster_bits
        self.zstd = meta.hdr.compression_type == 1
        self._last_compressed: tuple[int, bytes] | None = None
        # Bumped by `forget_compressed`: a read that started before keeps its data to itself.
        self._compressed_gen = 0

    # --- mapping ------------------------------------------------------------------------

    async def l2_for(self, cluster_index: int) -> tuple[int, bytearray | None]:
        """(L2 table offset, table) for a guest cluster; (0, None) when unallocated."""
        l1_index = cluster_index // self.l2_entries
        l1 = self.meta.l1
        if l1_index >= len(l1):
            return 0, None
        offset = l1[l1_index] & fmt.L1E_OFFSET_MASK
        if not offset:
            return 0, None
        return offset, await self.meta.load_l2(offset)

    def unit(self, entry: fmt.L2Entry, sc_index: int) -> ClusterType:
        if self.extended:
            try:
                return fmt.subcluster_type(entry, sc_index, self.has_data_file)
            except fmt.InvalidEntry as err:
                raise Corruption(f"Invalid cluster entry found (L2 entry {entry.raw:#x})") from err
        return fmt.cluster_type(entry, False, self.has_data_file)

    async def _l2_slice(self, l2_offset: int, index: int) -> tuple[bytearray, bool]:
        """Slice `index` of an L2 table (l2-cache-entry-size < cluster size): from the cache,
        else read alone. Readers never hold whole tables they did not find cached."""
        cache = self.meta.l2_cache
        found = cache.get_slice(l2_offset, index)
        if found is not None:
            return found
        if l2_offset & (self.cluster_size - 1):
            raise Corruption(
                f"L2 table offset {l2_offset:#x} unaligned", l2_offset, self.cluster_size
            )
        epoch = cache.epoch
        debug_event(self.meta.file, "l2_load")
        part = await self.meta.read(l2_offset + index * cache.slice_size, cache.slice_size)
        found = cache.get_slice(l2_offset, index)
        if found is not None:
            return found  # a concurrent load (or a writer) got there first
        if cache.epoch == epoch:  # no table changed meanwhile: the bytes are current
            cache.put_slice(l2_offset, index, part)
            cache.evict_clean()
        return part, False

    async def extent(self, pos: int, length: int) -> Extent:
        """The longest run from `pos` (at most `length`) with one kind and contiguous host."""
        cluster_index = pos >> self.cluster_bits
        l2_index = cluster_index % self.l2_entries
        cache = self.meta.l2_cache
        base = 0  # index of the buffer's first entry in its table
        if cache.per_table > 1:
            span = self.l2_entries // cache.per_table
            first = l2_index - l2_index % span
            in_table = ((first + span - l2_index) << self.cluster_bits) - (
                pos & (self.cluster_size - 1)
            )
            length = min(length, in_table)
            l1_index = cluster_index // self.l2_entries
            l1 = self.meta.l1
            l2_offset = l1[l1_index] & fmt.L1E_OFFSET_MASK if l1_index < len(l1) else 0
            if not l2_offset:
                return Extent(ClusterType.UNALLOCATED, length, 0)
            table, whole = await self._l2_slice(l2_offset, first // span)
            if not whole:
                base = first
        else:
            in_table = ((self.l2_entries - l2_index) << self.cluster_bits) - (
                pos & (self.cluster_size - 1)
            )
            length = min(length, in_table)
            l2_offset, found = await self.l2_for(cluster_index)
            if found is None:
                return Extent(ClusterType.UNALLOCATED, length, 0)
            table = found
        return self._scan(table, base, l2_offset, pos, length)

    def unallocated_now(self, pos: int, length: int) -> int:
        """The length `extent` gives from `pos` when no L2 table maps it (an L1 entry of 0:
        the common case of an empty image), else 0. Cheaper than `extent_now` (no Extent)."""
        bits = self.cluster_bits
        cluster_index = pos >> bits
        l2_entries = self.l2_entries
        l1_index = cluster_index // l2_entries
        l1 = self.meta.l1
        if l1_index < len(l1) and l1[l1_index] & fmt.L1E_OFFSET_MASK:
            return 0
        l2_index = cluster_index - l1_index * l2_entries
        span = l2_entries // self.meta.l2_cache.per_table  # extents stop at cached slices
        in_table = ((span - l2_index % span) << bits) - (pos & (self.cluster_size - 1))
        return in_table if in_table < length else length

    def extent_now(self, pos: int, length: int) -> Extent | None:
        """`extent` when it needs no I/O (the L2 table, or its slice, is cached, or none is
        allocated); None when a table must be read first (then await `extent`)."""
        cluster_bits = self.cluster_bits
        cluster_index = pos >> cluster_bits
        l2_entries = self.l2_entries
        l1_index = cluster_index // l2_entries
        l2_index = cluster_index - l1_index * l2_entries
        l1 = self.meta.l1
        l2_offset = l1[l1_index] & fmt.L1E_OFFSET_MASK if l1_index < len(l1) else 0
        cache = self.meta.l2_cache
        if cache.per_table > 1:
            span = l2_entries // cache.per_table
            first = l2_index - l2_index % span
            in_table = ((first + span - l2_index) << cluster_bits) - (pos & (self.cluster_size - 1))
            if in_table < length:
                length = in_table
            if not l2_offset:
                return Extent(ClusterType.UNALLOCATED, length, 0)
            found = cache.get_slice(l2_offset, first // span)
            if found is None:
                return None
            table, whole = found
            return self._scan(table, 0 if whole else first, l2_offset, pos, length)
        in_table = ((l2_entries - l2_index) << cluster_bits) - (pos & (self.cluster_size - 1))
        if in_table < length:
            length = in_table
        if not l2_offset:
            return Extent(ClusterType.UNALLOCATED, length, 0)
        cached = cache.get(l2_offset)
        if cached is None:
            return None
        return self._scan(cached, 0, l2_offset, pos, length)

    def _scan(self, table: bytearray, base: int, l2_offset: int, pos: int, length: int) -> Extent:
        """The run from `pos` within one L2 table (`table` holds its entries from `base`)."""
        if not self.extended:
            return self._scan_standard(table, base, l2_offset, pos, length)
        return self._scan_units(table, base, l2_offset, pos, length)

    def _scan_units(
        self, table: bytearray, base: int, l2_offset: int, pos: int, length: int
    ) -> Extent:
        """`_scan` one allocation unit (cluster, or subcluster with extended L2) at a time."""
        cs_mask = self.cluster_size - 1
        end = pos + length
        first_kind: ClusterType | None = None
        first_host = 0
        raw = 0
        cur = pos
        units = 0
        while cur < end and units < MAX_EXTENT_UNITS:
            idx = (cur >> self.cluster_bits) % self.l2_entries
            if cur != pos and idx == 0 and not cur & cs_mask:
                break  # the next table (the subclusters of its first cluster are not)
            entry = fmt.l2_get(table, idx - base, self.extended)
            sc = (cur & cs_mask) >> self.sc_bits if self.extended else 0
            kind = self.unit(entry, sc)
            unit_end = min(((cur >> self.sc_bits) + 1) << self.sc_bits, end)
            host = 0
            if kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC, ClusterType.UNALLOCATED_ALLOC):
                if entry.offset & cs_mask:
                    raise Corruption(
                        f"Cluster allocation offset {entry.offset:#x} unaligned "
                        f"(L2 offset: {l2_offset:#x}, L2 index: {idx:#x})",
                        entry.offset,
                        self.cluster_size,
                    )
                host = entry.offset + (cur & cs_mask)
            if first_kind is None:
                first_kind, first_host, raw = kind, host, entry.raw
            elif (
                kind != first_kind
                or (kind == ClusterType.NORMAL and host != first_host + (cur - pos))
                or kind == ClusterType.COMPRESSED
            ):
                break
            cur = unit_end
            units += 1
        assert first_kind is not None
        return Extent(first_kind, cur - pos, first_host, raw)

    def _scan_standard(
        self, table: bytearray, base: int, l2_offset: int, pos: int, length: int
    ) -> Extent:
        """`_scan` for standard (64-bit) entries: the entries are decoded in one call and
        compared as integers (an L2Entry per cluster made a 8192-cluster walk ~20 ms)."""
        bits = self.cluster_bits
        cs = self.cluster_size
        first = pos >> bits
        idx = first % self.l2_entries
        count = min(((pos + length - 1) >> bits) - first + 1, MAX_EXTENT_UNITS)
        values = struct.unpack_from(f">{count}Q", table, (idx - base) * 8)
        has_df = self.has_data_file
        v = values[0]
        kind = _standard_kind(v, has_df)
        host = 0
        if kind == ClusterType.NORMAL or kind == ClusterType.ZERO_ALLOC:
            host = self._host(v, l2_offset, idx) + (pos & (cs - 1))
        n = 1
        if kind == ClusterType.NORMAL:
            expect = (v & fmt.L2E_OFFSET_MASK) + cs
            for v in values[1:]:
                if v & _NOT_PLAIN or (v & fmt.L2E_OFFSET_MASK) != expect:
                    self._check_next(v, has_df, l2_offset, idx + n)
                    break
                expect += cs
                n += 1
        elif kind == ClusterType.COMPRESSED:
            if count > 1:
                self._check_next(values[1], has_df, l2_offset, idx + 1)
        else:
            for v in values[1:]:
                next_kind = _standard_kind(v, has_df)
                if next_kind != kind:
                    self._check_next(v, has_df, l2_offset, idx + n)
                    break
                if kind == ClusterType.ZERO_ALLOC:
                    self._host(v, l2_offset, idx + n)
                n += 1
        stop = min((first + n) << bits, pos + length)
        return Extent(kind, stop - pos, host, values[0])

    def _host(self, value: int, l2_offset: int, idx: int) -> int:
        """The host cluster of an entry; Corruption when it is not cluster aligned."""
        host: int = value & fmt.L2E_OFFSET_MASK
        if host & (self.cluster_size - 1):
            raise Corruption(
                f"Cluster allocation offset {host:#x} unaligned "
                f"(L2 offset: {l2_offset:#x}, L2 index: {idx:#x})",
                host,
                self.cluster_size,
            )
        return host

    def _check_next(self, value: int, has_df: bool, l2_offset: int, idx: int) -> None:
        """The entry that ends a run is checked as the run's own entries are."""
        kind = _standard_kind(value, has_df)
        if kind == ClusterType.NORMAL or kind == ClusterType.ZERO_ALLOC:
            self._host(value, l2_offset, idx)

    # --- reading ------------------------------------------------------------------------

    async def read(self, pos: int, length: int) -> bytes | bytearray | memoryview:
        ext = await self.extent(pos, length)
        if ext.length == length and ext.kind == ClusterType.NORMAL:
            # One contiguous host run (the common case): the file's buffer, not a copy.
            debug_event(self.meta.file, "read_aio")
            return await io.pread(self.data, ext.host, length)
        buf = bytearray(length)
        done = 0
        count = 0
        while done < length:
            count += 1
            if count % 8 == 0:
                await asyncio.sleep(0)
            if done:
                ext = await self.extent(pos + done, length - done)
            n = ext.length
            kind = ext.kind
            if kind == ClusterType.NORMAL:
                debug_event(self.meta.file, "read_aio")
                buf[done : done + n] = await io.pread(self.data, ext.host, n)
            elif kind in (ClusterType.UNALLOCATED, ClusterType.UNALLOCATED_ALLOC):
                await self._read_backing(buf, done, pos + done, n)
            elif kind == ClusterType.COMPRESSED:
                cluster = await self.compressed_cluster(ext.raw)
                start = (pos + done) & (self.cluster_size - 1)
                buf[done : done + n] = cluster[start : start + n]
            # zero kinds: the buffer is already zero
            done += n
        return buf

    async def _read_backing(self, buf: bytearray, at: int, pos: int, n: int) -> None:
        backing = self.backing
        if backing is None:
            return
        blen = backing.node.driver.getlength()
        if pos >= blen:
            return
        count = min(n, blen - pos)
        debug_event(self.meta.file, "read_backing_aio")  # qsd raises it on the file edge
        buf[at : at + count] = await io.pread(backing, pos, count)

    async def compressed_cluster(self, raw: int) -> bytes:
        host, span = fmt.compressed_span(raw, self.cluster_bits)
        debug_event(self.meta.file, "read_compressed")
        cached = self._last_compressed
        if cached is not None and cached[0] == raw:
            return cached[1]
        gen = self._compressed_gen
        data = bytes(await io.pread(self.meta.file, host, span))
        if self.cluster_size >= _OFFLOAD_BYTES:
            out = await asyncio.to_thread(decompress, data, self.cluster_size, self.zstd)
        else:
            out = decompress(data, self.cluster_size, self.zstd)
        if gen == self._compressed_gen:
            self._last_compressed = (raw, out)
        return out

    def forget_compressed(self) -> None:
        """Drop the cached decompressed cluster, and keep reads in flight from caching what
        they fetched: compressed bytes were freed or written, and a stream reallocated at the
        same offset with the same length would repeat an old L2 entry's value."""
        self._last_compressed = None
        self._compressed_gen += 1

    def compressed_host_clusters(self, raw: int) -> tuple[int, int]:
        """(first host cluster offset, count) a compressed entry holds references on."""
        host, span = fmt.compressed_span(raw, self.cluster_bits)
        first = host >> self.cluster_bits
        last = (host + span - 1) >> self.cluster_bits
        return first << self.cluster_bits, last - first + 1
