"""The `null-co` and `null-aio` drivers: a sized device that stores nothing (domain ring).

Reads return zeroes only with `read-zeroes=on` (otherwise the buffer is left undefined, as in
QEMU; we return zeroes all the same, which is a valid undefined value). `latency-ns` delays
every request without blocking the loop, which makes these nodes handy as slow storage.
"""

from __future__ import annotations

import asyncio
from typing import Any

from storage_daemon.blockdev.driver import BlockDriver, BlockStatus, ChildOpener
from storage_daemon.errors import QmpError

DEFAULT_SIZE = 1 << 30


class NullDriver(BlockDriver):
    name = "null-co"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.size = DEFAULT_SIZE
        self.latency_ns = 0
        self.read_zeroes = False
        self._strong: dict[str, Any] = {}
        self._zeroes = b""

    async def open(self, options: Any, opener: ChildOpener) -> None:
        explicit = options.model_fields_set
        if options.size is not None and options.size < 0:
            # qsd 7.2 aborts here (an upstream bug); we give the message it meant to print.
            raise QmpError("Parameter 'size' expects a non-negative number below 2^64")
        if options.size is not None:
            self.size = int(options.size)
        # uint64 on the wire, int64 inside QEMU: a wrapped negative value is refused.
        if options.latency_ns is not None and not 0 <= options.latency_ns < 1 << 63:
            raise QmpError("latency-ns is invalid")
        if options.latency_ns is not None:
            self.latency_ns = int(options.latency_ns)
        if options.read_zeroes is not None:
            self.read_zeroes = bool(options.read_zeroes)
        # QEMU names the node by size and read-zeroes only ("strong" options).
        if "read_zeroes" in explicit and options.read_zeroes is not None:
            self._strong["read-zeroes"] = bool(options.read_zeroes)
        if "size" in explicit and options.size is not None:
            self._strong["size"] = int(options.size)

    def exact_filename(self) -> str:
        return f"{self.name}://"

    def strong_options(self) -> dict[str, Any]:
        return dict(self._strong)

    def getlength(self) -> int:
        return self.size

    async def _delay(self) -> None:
        if self.latency_ns:
            await asyncio.sleep(self.latency_ns / 1e9)

    async def preadv(self, offset: int, length: int) -> bytes:
        await self._delay()
        if len(self._zeroes) < length:
            self._zeroes = bytes(length)
        return self._zeroes[:length]

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._delay()

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        await self._delay()

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._delay()

    async def flush(self) -> None:
        await self._delay()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        # QEMU reports no data: a hole that reads as zeroes with read-zeroes=on (allocated,
        # depth 1), otherwise a hole with undefined contents (unallocated, depth 0).
        return BlockStatus(length=length, data=False, zero=self.read_zeroes)


class NullAioDriver(NullDriver):
    name = "null-aio"
