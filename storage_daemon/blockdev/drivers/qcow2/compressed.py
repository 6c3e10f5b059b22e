"""Compressed cluster writes of a qcow2 image (the compress filter's and backup's write path).

Domain ring; compression runs on a worker thread, allocation and the L2 update under the
driver's metadata lock. QEMU 7.2's rules: whole clusters only (a shorter last one at the
image's end), never over a cluster with a host offset (EIO), not with an external data file
(ENOTSUP); a cluster that does not shrink below the cluster size is written normally.
Invariant (crash safety, as alloc.py): refcount in the cache, then the data, then the cached
L2 entry; the refblock is stable before the L2 table that names the new bytes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import zlib
from typing import TYPE_CHECKING

from storage_daemon.blockdev.drivers.blkdebug import debug_event
from storage_daemon.blockdev.drivers.qcow2 import format as fmt

if TYPE_CHECKING:
    from storage_daemon.blockdev.drivers.qcow2.driver import Qcow2Driver
    from storage_daemon.blockdev.drivers.qcow2.writer import Writer

# Below this cluster size compressing costs less than a trip to a worker thread.
_OFFLOAD_BYTES = 16 * 1024
# QEMU's deflate parameters: default level, raw stream with a 4 KiB window, memLevel 9.
_ZLIB_WBITS = -12
_ZLIB_MEMLEVEL = 9
_ZSTD_LEVEL = 3  # libzstd's default, which QEMU uses


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def compress_cluster(data: bytes | bytearray | memoryview, limit: int, zstd: bool) -> bytes | None:
    """One cluster compressed as QEMU does (raw deflate, or one zstd frame), or None when
    the stream would be longer than `limit` bytes. Pure; safe to run on any thread."""
    if zstd:
        try:
            import zstandard
        except ImportError as err:  # pragma: no cover - a dependency of the daemon
            raise OSError(errno.ENOTSUP, "zstd compression is not supported") from err
        out = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(bytes(data))
    else:
        comp = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION,
            zlib.DEFLATED,
            _ZLIB_WBITS,
            _ZLIB_MEMLEVEL,
            zlib.Z_DEFAULT_STRATEGY,
        )
        out = comp.compress(data) + comp.flush()
    return out if len(out) <= limit else None


def compressed_descriptor(host: int, size: int, cluster_bits: int) -> int:
    """The L2 entry of a compressed cluster whose `size` stream bytes start at `host`: the
    byte offset, then the number of 512-byte sectors touched after the first (never COPIED)."""
    shift = 62 - (cluster_bits - 8)
    extra_sectors = ((host + size - 1) >> 9) - (host >> 9)
    return fmt.OFLAG_COMPRESSED | (extra_sectors << shift) | host


def offset_limit(cluster_bits: int) -> int:
    """Compressed streams must end below this host offset (the descriptor's offset bits)."""
    return 1 << (62 - (cluster_bits - 8))


async def write_compressed(driver: Qcow2Driver, offset: int, data: bytes | memoryview) -> None:
    """Write whole clusters compressed; errors as qsd's (EINVAL unaligned, ENOTSUP with a
    data file, EIO over an allocated cluster)."""
    hdr = driver.hdr
    assert hdr is not None
    if driver.mapper is not None and driver.mapper.has_data_file:
        raise _error(errno.ENOTSUP)
    cs = hdr.cluster_size
    end = offset + len(data)
    if offset % cs or (end % cs and end != hdr.size):
        raise _error(errno.EINVAL)
    view = memoryview(data)
    for pos in range(offset, end, cs):
        await _write_cluster(driver, pos, view[pos - offset : min(pos - offset + cs, len(view))])


async def _write_cluster(driver: Qcow2Driver, pos: int, chunk: memoryview) -> None:
    hdr = driver.hdr
    assert hdr is not None
    cs = hdr.cluster_size
    buf = chunk if len(chunk) == cs else bytes(chunk) + bytes(cs - len(chunk))
    zstd = hdr.compression_type == 1
    if cs >= _OFFLOAD_BYTES:
        out = await asyncio.to_thread(compress_cluster, buf, cs - 1, zstd)
    else:
        out = compress_cluster(buf, cs - 1, zstd)
    if out is None:
        # Incompressible: an ordinary write (which may overwrite in place, as qsd's does).
        await driver.pwritev(pos, chunk, False)
        return
    stream = out

    async def op(writer: Writer) -> None:
        await _place(writer, pos, stream)

    await driver._run_write(op, False, (pos, len(chunk)))


async def _place(writer: Writer, pos: int, stream: bytes) -> None:
    meta = writer.meta
    cluster_index = pos >> writer.cb
    l2_offset, table = await writer._l2_for_write(cluster_index)
    idx = cluster_index % writer.l2_entries
    entry = fmt.l2_get(table, idx, writer.ext)
    if entry.raw & fmt.L2E_OFFSET_MASK:
        raise _error(errno.EIO)  # compression never overwrites: qsd's answer too
    host = await meta.alloc_bytes(len(stream))
    if host + len(stream) > offset_limit(writer.cb):
        raise _error(errno.EFBIG)
    # The reader caches the last cluster it decompressed by L2 entry; a freed host cluster
    # reused here could repeat an old entry's value (reads in flight included).
    writer.mapper.forget_compressed()
    # qsd updates the cached L2 entry first; ours follows the data (crash safety).
    debug_event(meta.file, "l2_update_compressed")
    debug_event(writer.mapper.data, "write_compressed")
    await writer._write_host(host, stream)
    fmt.l2_set(table, idx, writer.ext, compressed_descriptor(host, len(stream), writer.cb), 0)
    meta.l2_dirty(l2_offset, table)


__all__ = ["compress_cluster", "compressed_descriptor", "offset_limit", "write_compressed"]
