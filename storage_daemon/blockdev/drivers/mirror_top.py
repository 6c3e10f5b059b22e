"""The `mirror_top` filter a mirror job (or an active block-commit) puts above its source
while it runs, and the `commit_top` filter of an intermediate block-commit.

Domain ring. Users of the source are moved onto this node, so every write, zero write and
discard they make passes here and is handed to the job (which marks it dirty, or in
write-blocking mode also writes it to the target). Only the job creates it: blockdev-add
cannot name the driver, as in qsd. Invariant: while the gate is closed no new write reaches
the source, and `in_flight` counts the writes that did get past it and have not finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from storage_daemon.blockdev import io
from storage_daemon.blockdev.driver import BlockStatus, ChildOpener
from storage_daemon.blockdev.drivers.throttle import FilterDriver
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm
from storage_daemon.errors import QmpError

Buffer = bytes | bytearray | memoryview
SourceWrite = Callable[[], Awaitable[None]]


class WriteKind:
    """What a client write does: new data (the payload), zeroes, or a discard."""

    __slots__ = ("data", "zero")

    def __init__(self, data: Buffer | None = None, *, zero: bool = False) -> None:
        self.data = data
        self.zero = zero


DISCARD = WriteKind()


class MirrorWriteHook(Protocol):
    """What the filter asks of its job for every client write."""

    async def client_write(
        self, offset: int, length: int, kind: WriteKind, source_write: SourceWrite
    ) -> None:
        """Do `source_write` and account for it (a dirty mark, or a copy to the target)."""
        ...


class MirrorTopDriver(FilterDriver):
    name = "mirror_top"
    passes_filename = True
    child_name = "backing"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.job: MirrorWriteHook | None = None
        self.is_commit = False  # an active commit's: the source's own backing is the target
        self.in_flight = 0
        self._open_gate = asyncio.Event()
        self._open_gate.set()
        self._idle: list[asyncio.Future[None]] = []

    async def open(self, options: Any, opener: ChildOpener) -> None:
        raise QmpError("Driver 'mirror_top' cannot be opened by a user")

    def set_child(self, edge: Any) -> None:
        """The job attached the source as this node's `backing` child."""
        self._file = edge
        self.refresh_limits()

    # Reads and block status pass through untouched (only writes concern the job), so they
    # keep the NBD server's synchronous path (`io.pread_now`) while a mirror runs.
    def preadv_now(
        self, offset: int, length: int, live: bool
    ) -> bytes | bytearray | memoryview | None:
        file = self._file
        return None if file is None else io.pread_now(file, offset, length, live=live)

    def block_status_now(self, offset: int, length: int) -> BlockStatus | None:
        file = self._file
        return None if file is None else io.block_status_now(file, offset, length)

    def child_perm(self, child: Any, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        if self.is_commit:
            # As QEMU's: above the base nobody may read consistently while the commit runs,
            # and writes must be shared or the job would block itself at the base.
            return perm & ~Perm.CONSISTENT_READ, shared | Perm.WRITE
        return perm, shared

    # --- the gate: holding client writes while the job switches the graph ---------------

    def close_gate(self) -> None:
        self._open_gate.clear()

    def open_gate(self) -> None:
        self._open_gate.set()

    async def wait_idle(self) -> None:
        """Until no write is between the gate and its end."""
        while self.in_flight:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter

    async def _write(
        self, offset: int, length: int, kind: WriteKind, source_write: SourceWrite
    ) -> None:
        if not self._open_gate.is_set():
            await self._open_gate.wait()
        self.in_flight += 1
        try:
            job = self.job
            if job is None:
                await source_write()
            else:
                await job.client_write(offset, length, kind, source_write)
        finally:
            self.in_flight -= 1
            if not self.in_flight and self._idle:
                waiters, self._idle = self._idle, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    # --- data path ----------------------------------------------------------------------

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._write(
            offset,
            len(data),
            WriteKind(data),
            lambda: io.pwrite(self.child(), offset, data, fua=fua),
        )

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        fast_only = not io.zero_fallback_allowed()
        await self._write(
            offset,
            length,
            WriteKind(zero=True),
            lambda: io.pwrite_zeroes(
                self.child(), offset, length, may_unmap=unmap, fua=fua, fast_only=fast_only
            ),
        )

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._write(
            offset, length, DISCARD, lambda: io.pdiscard(self.child(), offset, length)
        )

    async def truncate(self, size: int) -> None:
        raise QmpError("Cannot resize a node while a mirror job runs on it")


class CommitTopDriver(FilterDriver):
    """The `commit_top` filter an intermediate block-commit puts above its top node while it
    runs (the overlay reads through it). It takes no permission on the node below and lets
    everyone do everything, as qsd's does; only the job creates it."""

    name = "commit_top"
    passes_filename = True
    child_name = "backing"

    async def open(self, options: Any, opener: ChildOpener) -> None:
        raise QmpError("Driver 'commit_top' cannot be opened by a user")

    def set_child(self, edge: Any) -> None:
        """The job attached the commit's top as this node's `backing` child."""
        self._file = edge
        self.refresh_limits()

    def child_perm(self, child: Any, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return PERM_NONE, PERM_ALL

    async def truncate(self, size: int) -> None:
        raise QmpError("Cannot resize a node while a commit job runs on it")
