"""The `preallocate` filter: grows its file in big chunks ahead of writes past the end.

Domain ring. Like QEMU 7.2 it acts only while its users hold WRITE and RESIZE and share
neither (a format growing its file); the node's length stays the data length, and the
preallocated tail is cut off again on close. Invariant: data_end <= file_end.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.driver import ChildOpener
from storage_daemon.blockdev.drivers.throttle import FilterDriver
from storage_daemon.blockdev.perm import Perm
from storage_daemon.errors import QmpError

_WR = Perm.WRITE | Perm.RESIZE


class PreallocateDriver(FilterDriver):
    name = "preallocate"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.align = 1 << 20
        self.size = 128 << 20
        self.data_end = -1  # -1: not tracking
        self.file_end = -1

    async def open(self, options: Any, opener: ChildOpener) -> None:
        if options.prealloc_align is not None:
            self.align = int(options.prealloc_align)
        if options.prealloc_size is not None:
            self.size = int(options.prealloc_size)
        if self.align <= 0 or self.align & (self.align - 1) or self.size < 0:
            raise QmpError("prealloc-align parameter of preallocate filter is not a power of 2")
        file = await self.open_filtered(options.file, opener)
        if self.align % file.node.driver.request_alignment:
            raise QmpError(
                "prealloc-align parameter of preallocate filter is not aligned to "
                f"{file.node.driver.request_alignment}"
            )

    def strong_options(self) -> dict[str, Any]:
        return {}

    def _active(self) -> bool:
        edge = self.child()
        return (edge.perm & _WR) == _WR and not edge.shared & _WR

    def getlength(self) -> int:
        if self.data_end >= 0 and self._active():
            return self.data_end
        return super().getlength()

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._prepare(offset + len(data))
        await io.pwrite(self.child(), offset, data, fua=fua)
        self._wrote(offset + len(data))

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        await self._prepare(offset + length)
        await super().pwrite_zeroes(offset, length, unmap, fua)
        self._wrote(offset + length)

    async def _prepare(self, end: int) -> None:
        if not self._active():
            self.data_end = self.file_end = -1
            return
        if self.data_end < 0:
            self.data_end = self.file_end = io.length(self.child())
        if end <= self.file_end:
            return
        new_end = -(-(end + self.size) // self.align) * self.align
        try:
            await io.pwrite_zeroes(
                self.child(), self.file_end, new_end - self.file_end, fast_only=True
            )
        except OSError:
            return  # no fast preallocation: the write just extends the file
        self.file_end = new_end

    def _wrote(self, end: int) -> None:
        if self.data_end >= 0 and end > self.data_end:
            self.data_end = end
            self.file_end = max(self.file_end, end)

    async def truncate(self, size: int) -> None:
        await io.truncate(self.child(), size)
        if self.data_end >= 0:
            self.data_end = self.file_end = size

    async def close(self) -> None:
        # By now the users' permissions are gone; the tail is ours to cut, as QEMU does.
        if 0 <= self.data_end < self.file_end and self._file is not None:
            try:
                await self._file.node.driver.truncate(self.data_end)
            except (OSError, QmpError):
                pass  # the file keeps its preallocated tail, as qsd's does on failure
