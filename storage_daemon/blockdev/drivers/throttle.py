"""The `throttle` filter and the pass-through base every filter driver shares (domain ring).

A filter has one primary child (`file`, or blkdebug's `image`) and presents its data unchanged;
requests reach the child through the generic I/O path. The throttle filter first waits on its
throttle group's buckets (without blocking the loop); while drained, as in qsd, its queued
requests go at once and new ones pass without waiting (both still charged). Invariant: a
throttle node counts as a user of its group from open to close, so the group cannot be
deleted under it.
"""

from __future__ import annotations

import errno
from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import ROLE_FILTERED, BdrvChild
from storage_daemon.blockdev.driver import BlockDriver, BlockStatus, ChildOpener
from storage_daemon.objects import active_registry
from storage_daemon.qom.throttle_group import ThrottleGroup


class FilterDriver(BlockDriver):
    """A transparent filter over one child; subclasses hook the data operations."""

    is_filter = True
    child_name = "file"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self._file: BdrvChild | None = None

    async def open_filtered(self, ref: Any, opener: ChildOpener) -> BdrvChild:
        self._file = await opener.open_child(self.node, ref, self.child_name, ROLE_FILTERED)
        self.refresh_limits()
        return self._file

    def refresh_limits(self) -> None:
        # The filter passes requests on unchanged, so the child's limits are its own.
        child = self.child().node.driver
        self.request_alignment = max(self.request_alignment, child.request_alignment)
        if child.max_transfer and (not self.max_transfer or child.max_transfer < self.max_transfer):
            self.max_transfer = child.max_transfer

    def child(self) -> BdrvChild:
        if self._file is None:
            raise OSError(errno.ENOTSUP, "operation not supported")
        return self._file

    def image_info_extra(self) -> dict[str, Any]:
        child = self.child().node.driver.image_info_extra()
        return {key: child[key] for key in ("cluster-size", "dirty-flag") if key in child}

    async def actual_size(self) -> int:
        return await self.child().node.driver.actual_size()

    def getlength(self) -> int:
        return self.child().node.driver.getlength()

    async def preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return await io.pread(self.child(), offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await io.pwrite(self.child(), offset, data, fua=fua)

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        await io.pwrite_zeroes(
            self.child(),
            offset,
            length,
            may_unmap=unmap,
            fua=fua,
            fast_only=not io.zero_fallback_allowed(),
        )

    async def pdiscard(self, offset: int, length: int) -> None:
        await io.pdiscard(self.child(), offset, length)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await io.block_status(self.child(), offset, length)

    async def truncate(self, size: int) -> None:
        await io.truncate(self.child(), size)


class ThrottleDriver(FilterDriver):
    name = "throttle"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.group_name = ""
        self.group: ThrottleGroup | None = None
        self.drained = 0  # nesting depth of the drained sections over this node

    async def open(self, options: Any, opener: ChildOpener) -> None:
        registry = active_registry()
        group = registry.throttle_group(options.throttle_group)
        await self.open_filtered(options.file, opener)
        self.group_name = options.throttle_group
        self.group = group
        registry.use(self.group_name)

    async def close(self) -> None:
        if self.group is not None:
            active_registry().unuse(self.group_name)
            self.group = None

    def strong_options(self) -> dict[str, Any]:
        return {"throttle-group": self.group_name}

    def drained_begin(self) -> None:
        self.drained += 1
        if self.drained == 1 and self.group is not None:
            self.group.release_member(self)

    def drained_end(self) -> None:
        self.drained = max(self.drained - 1, 0)

    async def throttle(self, is_write: bool, size: int) -> None:
        """Wait until the group's limits let a request of `size` bytes through (at once
        while drained), and charge it."""
        group = self.group
        if group is None:
            return
        if self.drained:
            group.charge(is_write, size)
        else:
            await group.intercept(is_write, size, self)

    async def preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        await self.throttle(False, length)
        return await io.pread(self.child(), offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self.throttle(True, len(data))
        await io.pwrite(self.child(), offset, data, fua=fua)

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        await self.throttle(True, length)
        await super().pwrite_zeroes(offset, length, unmap, fua)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.throttle(True, length)
        await io.pdiscard(self.child(), offset, length)
