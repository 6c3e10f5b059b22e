"""The `snapshot-access` driver: reads a copy-before-write node's point-in-time view.

Domain ring. Put over a copy-before-write node (image fleecing), it reads each range as it was
when the filter was inserted: from the filter's target where old data was copied there, from
the source otherwise. Discards tell the filter a range is no longer needed. Invariant: it never
writes; over any other node every data request fails with ENOTSUP.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from storage_daemon.blockdev.child import ChildRole
from storage_daemon.blockdev.driver import BlockDriver, BlockStatus, ChildOpener
from storage_daemon.blockdev.drivers.copy_before_write import CopyBeforeWriteDriver
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class SnapshotAccessDriver(BlockDriver):
    name = "snapshot-access"
    passes_filename = True

    async def open(self, options: Any, opener: ChildOpener) -> None:
        edge = await opener.open_child(
            self.node, options.file, "file", ChildRole.DATA | ChildRole.PRIMARY
        )
        graph = self.node.graph
        if graph is not None:
            graph.refresh_perms(edge.node)  # a filter with a user unshares writes below it

    def child_perm(self, child: Any, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return PERM_NONE, PERM_ALL

    def _cbw(self) -> CopyBeforeWriteDriver:
        drv = self._primary().driver
        if not isinstance(drv, CopyBeforeWriteDriver):
            raise _error(errno.ENOTSUP)
        return drv

    async def preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return await self._cbw().snapshot_preadv(offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        raise _error(errno.ENOTSUP)

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        raise _error(errno.ENOTSUP)

    async def pdiscard(self, offset: int, length: int) -> None:
        self._cbw().snapshot_discard(offset, length)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await self._cbw().snapshot_block_status(offset, length)

    async def flush(self) -> None:
        return None
