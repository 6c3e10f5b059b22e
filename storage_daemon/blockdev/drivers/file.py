"""The `file` protocol driver: a regular file or block device on the host (edge ring).

Every blocking syscall runs on the default executor (a thread pool), never on the loop.
Image locking with QEMU's OFD byte ranges, O_DIRECT, SEEK_DATA block status and fallocate
arrive with the block-core issue; until then the node reads, writes and flushes the file.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

from storage_daemon.blockdev.driver import BlockDriver, BlockStatus, ChildOpener
from storage_daemon.errors import QmpError


class FileDriver(BlockDriver):
    name = "file"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.filename = ""
        self.fd = -1
        self.length = 0

    async def open(self, options: Any, opener: ChildOpener) -> None:
        self.filename = options.filename
        flags = os.O_RDONLY if self.node.read_only else os.O_RDWR
        flags |= os.O_CLOEXEC
        loop = asyncio.get_running_loop()
        try:
            self.fd = await loop.run_in_executor(None, os.open, self.filename, flags)
            stat = await loop.run_in_executor(None, os.fstat, self.fd)
        except OSError as err:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            raise QmpError(
                f"Could not open '{self.filename}': {os.strerror(err.errno or errno.EIO)}"
            ) from err
        self.length = stat.st_size

    async def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            await asyncio.get_running_loop().run_in_executor(None, os.close, fd)

    def exact_filename(self) -> str:
        return self.filename

    def format_name(self) -> str:
        return "file"

    def image_info_extra(self) -> dict[str, Any]:
        return {"dirty-flag": False}

    async def actual_size(self) -> int:
        stat = await asyncio.get_running_loop().run_in_executor(None, os.fstat, self.fd)
        return int(stat.st_blocks) * 512

    def getlength(self) -> int:
        return self.length

    async def preadv(self, offset: int, length: int) -> bytes:
        data = await asyncio.get_running_loop().run_in_executor(
            None, os.pread, self.fd, length, offset
        )
        if len(data) < length:  # past the end of a file that shrank: zeroes, as QEMU reads
            data += bytes(length - len(data))
        return data

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, os.pwrite, self.fd, data, offset)
        self.length = max(self.length, offset + len(data))
        if fua:
            await loop.run_in_executor(None, os.fdatasync, self.fd)

    async def flush(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self.fd)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(length=length, data=True, zero=False)
