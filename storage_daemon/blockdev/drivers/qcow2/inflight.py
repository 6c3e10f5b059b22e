"""Cluster allocations whose guest data is being written outside the qcow2 metadata lock.

Domain ring. An allocating write reserves its host clusters (refcounts) under the lock,
writes the data without it, then links the L2 entries under the lock again (qsd's order:
refcount, data, L2). Invariant: while a `PendingAlloc` is registered no other metadata change
may touch its guest clusters; a request that would waits for it (`AllocTracker.blocker`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

# A whole-image range, for requests that may touch any cluster (resize).
EVERYTHING = (0, 1 << 63)


@dataclass(eq=False)
class PendingAlloc:
    """New host clusters `host`.. for the guest clusters `first`..`first + count`: the file
    writes to make first, then the L2 entries to set (`replace`: free what they held)."""

    first: int
    count: int
    host: int
    writes: list[tuple[int, bytes | bytearray | memoryview]]
    replace: bool
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)

    async def wait(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        await future

    def wake(self) -> None:
        for future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters.clear()


class AllocTracker:
    """The registered `PendingAlloc`s of one image (few: at most one per request)."""

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self.pending: list[PendingAlloc] = []

    def add(self, alloc: PendingAlloc) -> None:
        self.pending.append(alloc)

    def done(self, alloc: PendingAlloc) -> None:
        """Unregister (linked or given up) and wake whoever waits for it."""
        try:
            self.pending.remove(alloc)
        except ValueError:
            pass
        alloc.wake()

    async def acquire(self, lock: asyncio.Lock, offset: int, length: int) -> None:
        """Take the metadata `lock` with no pending allocation sharing a guest cluster with
        [offset, offset+length) (one may start while waiting for the lock: check again)."""
        while True:
            blocker = self.blocker(offset, length)
            if blocker is not None:
                await blocker.wait()
                continue
            await lock.acquire()
            if self.blocker(offset, length) is None:
                return
            lock.release()

    def blocker(self, offset: int, length: int) -> PendingAlloc | None:
        """A pending allocation sharing a guest cluster with [offset, offset+length)."""
        if not self.pending or length <= 0:
            return None
        cb = self.cluster_bits
        first = offset >> cb
        last = (offset + length - 1) >> cb
        for alloc in self.pending:
            if alloc.first <= last and first < alloc.first + alloc.count:
                return alloc
        return None
