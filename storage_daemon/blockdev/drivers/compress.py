"""The `compress` filter: writes become compressed writes on a format child (domain ring).

Only a child driver with `pwritev_compressed` can sit below it; qsd refuses others at open with
its text. As qsd's, the filter's request alignment is the child's cluster size, so the generic
I/O path turns partial-cluster writes into read-modify-write of whole clusters. Invariant:
every data write goes to the child's compressed write path (`pwrite_compressed`).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.driver import ChildOpener
from storage_daemon.blockdev.drivers.throttle import FilterDriver
from storage_daemon.blockdev.perm import Perm
from storage_daemon.errors import QmpError


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


async def pwrite_compressed(
    edge: BdrvChild, offset: int, data: bytes | memoryview, *, fua: bool = False
) -> None:
    """A compressed write through `edge` (QEMU's BDRV_REQ_WRITE_COMPRESSED): the checks and
    accounting of `io.pwrite`, then the driver's `pwritev_compressed`, which sees the request
    whole (no splitting, no padding). detect-zeroes on the node still turns zeroes into a
    zero write; FUA is a flush afterwards."""
    node = edge.node
    if not edge.perm & Perm.WRITE or node.options.read_only:
        raise _error(errno.EPERM)
    drv: Any = node.driver
    write = getattr(drv, "pwritev_compressed", None)
    if write is None:
        raise _error(errno.ENOTSUP)
    length = len(data)
    end = offset + length
    if offset < 0 or end > drv.getlength():
        node.stats.invalid_wr_operations += 1
        raise _error(errno.EIO)
    if not length:
        return
    detect = node.options.detect_zeroes
    if detect != "off" and io.is_zero(data):
        await io.pwrite_zeroes(edge, offset, length, may_unmap=detect == "unmap", fua=fua)
        return
    stats = node.stats
    io.write_prepare(node, end)
    started = io._now()  # the clock io.use_clock() installed
    try:
        await write(offset, data)
        if fua:
            await drv.flush()
    except Exception:
        stats.failed_wr_operations += 1
        raise
    finally:
        io.write_done(node, offset, end)
    stats.wr_operations += 1
    stats.wr_bytes += length
    stats.wr_total_time_ns += io._now() - started


class CompressDriver(FilterDriver):
    name = "compress"

    async def open(self, options: Any, opener: ChildOpener) -> None:
        file = await self.open_filtered(options.file, opener)
        if getattr(file.node.driver, "pwritev_compressed", None) is None:
            raise QmpError(
                "Compression is not supported for underlying format: "
                f"{file.node.driver.format_name()}"
            )

    def refresh_limits(self) -> None:
        super().refresh_limits()
        cluster_size = self.child().node.driver.image_info_extra().get("cluster-size", 0)
        if cluster_size:
            self.request_alignment = max(self.request_alignment, int(cluster_size))

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        # QEMU's generic rule, met here first: writers without resize need whole units.
        if (
            perm & (Perm.WRITE | Perm.WRITE_UNCHANGED)
            and not perm & Perm.RESIZE
            and self.getlength() % self.request_alignment
        ):
            raise QmpError(
                "Cannot get 'write' permission without 'resize': "
                "Image size is not a multiple of request alignment"
            )

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await pwrite_compressed(self.child(), offset, data, fua=fua)


__all__ = ["CompressDriver", "pwrite_compressed"]
