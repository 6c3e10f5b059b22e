"""The generic I/O path against an in-memory driver that checks every precondition it is promised.

Random unaligned writes, zero writes and reads through the layer must leave the same bytes as
the same operations on a plain bytearray; concurrent overlapping writes must end in the state
of some serial order, never a torn mix. `MemDriver` is shared with the component tests.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.driver import BlockDriver, BlockStatus, ChildOpener
from storage_daemon.blockdev.node import BlockNode, NodeOptions
from storage_daemon.blockdev.perm import PERM_ALL, Perm


class MemDriver(BlockDriver):
    """A RAM disk that asserts the I/O path's promises and logs every call it gets.

    `yields` (a callable returning a count) makes each call give the loop away that many
    times before touching the data, so concurrent requests interleave; each call then
    applies its effect at once, like a single syscall.
    """

    name = "mem"

    def __init__(
        self,
        node: BlockNode,
        size: int,
        *,
        align: int = 1,
        max_transfer: int = 0,
        native_zeroes: bool = True,
        yields: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(node)
        self.data = bytearray(size)
        self.request_alignment = align
        self.max_transfer = max_transfer
        self.native_zeroes = native_zeroes
        self.yields = yields
        self.calls: list[tuple[str, int, int]] = []
        self.allocated: list[tuple[int, int]] | None = None  # None: all allocated
        self.fail_next: int | None = None  # errno for the next call
        self.flushes = 0

    async def open(self, options: Any, opener: ChildOpener) -> None:
        pass

    def getlength(self) -> int:
        return len(self.data)

    async def _enter(self, op: str, offset: int, length: int, write: bool) -> None:
        align = self.request_alignment
        end = offset + length
        assert offset >= 0 and length > 0, (op, offset, length)
        assert offset % align == 0, (op, offset, align)
        assert end % align == 0 or end == len(self.data), (op, end, align)
        assert not self.max_transfer or length <= self.max_transfer, (op, length)
        assert write or end <= len(self.data), (op, end)
        self.calls.append((op, offset, length))
        for _ in range(self.yields() if self.yields else 0):
            await asyncio.sleep(0)
        if self.fail_next is not None:
            code, self.fail_next = self.fail_next, None
            raise OSError(code, "injected")

    def _store(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    async def preadv(self, offset: int, length: int) -> bytes:
        await self._enter("read", offset, length, False)
        return bytes(self.data[offset : offset + length])

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._enter("write", offset, len(data), True)
        self._store(offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        if not self.native_zeroes:
            raise OSError(errno.ENOTSUP, "no zero write here")
        await self._enter("unmap" if unmap else "zeroes", offset, length, True)
        self._store(offset, bytes(length))

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._enter("discard", offset, length, True)
        self._store(offset, bytes(length))

    async def flush(self) -> None:
        self.flushes += 1
        if self.fail_next is not None:
            code, self.fail_next = self.fail_next, None
            raise OSError(code, "injected")

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        await self._enter("status", offset, length, False)
        if self.allocated is None:
            return BlockStatus(length=length, data=True, zero=False)
        for start, stop in self.allocated:
            if start <= offset < stop:
                return BlockStatus(length=min(length, stop - offset), data=True, zero=False)
        following = [start for start, _ in self.allocated if start > offset]
        return BlockStatus(
            length=min([length, *(start - offset for start in following)]), data=False, zero=False
        )

    async def truncate(self, size: int) -> None:
        del self.data[size:]
        self.data.extend(bytes(size - len(self.data)))


class Parent:
    """A non-node user, as an export or a job is."""

    def parent_description(self, child: BdrvChild) -> str:
        return "a test user"


def mem_node(
    size: int, *, options: NodeOptions | None = None, name: str = "mem", **kwargs: Any
) -> tuple[BlockNode, MemDriver]:
    node = BlockNode(
        name=name,
        driver=None,  # type: ignore[arg-type]  # set below: the driver needs the node
        options=options or NodeOptions(),
        serial=1,
    )
    driver = MemDriver(node, size, **kwargs)
    node.driver = driver
    return node, driver


def user_edge(node: BlockNode, perm: Perm = Perm.CONSISTENT_READ | Perm.WRITE) -> BdrvChild:
    """An edge held by a non-node user, outside any graph (pure layer tests)."""
    return BdrvChild(Parent(), node, "root", ChildRole.PRIMARY, perm, PERM_ALL)


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await coro_fn()

    asyncio.run(main())


# --- sequential model --------------------------------------------------------------------

OP = st.tuples(
    st.sampled_from(["write", "zeroes", "zero-payload", "read"]),
    st.floats(0, 1),
    st.floats(0, 1),
    st.integers(1, 255),
)


@settings(max_examples=150, deadline=None)
@given(
    align=st.sampled_from([512, 4096]),
    blocks=st.integers(1, 5),
    tail=st.sampled_from([0, 1, 100]),
    max_blocks=st.sampled_from([0, 1, 2]),
    detect=st.sampled_from(["off", "on"]),
    native=st.booleans(),
    ops=st.lists(OP, min_size=1, max_size=12),
)
def test_unaligned_requests_match_a_bytearray(
    align: int,
    blocks: int,
    tail: int,
    max_blocks: int,
    detect: str,
    native: bool,
    ops: list[tuple[str, float, float, int]],
) -> None:
    size = blocks * align + tail  # an unaligned EOF too
    node, driver = mem_node(
        size,
        options=NodeOptions(detect_zeroes=detect),
        align=align,
        max_transfer=max_blocks * align,
        native_zeroes=native,
    )
    edge = user_edge(node)
    model = bytearray(size)

    async def body() -> None:
        for kind, where, how_long, fill in ops:
            offset = int(where * size)
            length = int(how_long * (size - offset))
            end = offset + length
            if kind == "write":
                payload = bytes([fill]) * length
                await io.pwrite(edge, offset, memoryview(payload))
                model[offset:end] = payload
            elif kind == "zero-payload":
                await io.pwrite(edge, offset, bytes(length))
                model[offset:end] = bytes(length)
            elif kind == "zeroes":
                await io.pwrite_zeroes(edge, offset, length)
                model[offset:end] = bytes(length)
            else:
                assert bytes(await io.pread(edge, offset, length)) == model[offset:end]
        assert driver.data == model

    run(body)
    assert len(driver.data) == size  # nothing grew the image


# --- concurrency -------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(
    align=st.sampled_from([512, 4096]),
    spans=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=4),
    zero_one=st.booleans(),
    seed=st.integers(0, 1 << 32),
)
def test_concurrent_overlapping_writes_end_in_some_serial_order(
    align: int, spans: list[tuple[float, float]], zero_one: bool, seed: int
) -> None:
    size = 3 * align
    rng = random.Random(seed)
    node, driver = mem_node(size, align=align, yields=lambda: rng.randrange(4))
    edge = user_edge(node)
    writes = []
    for i, (where, how_long) in enumerate(spans):
        offset = int(where * (size - 1))
        length = max(1, int(how_long * (size - offset) / 2))
        writes.append((offset, bytes([i + 1]) * length))
    initial = bytes(range(256)) * (size // 256)

    async def body() -> None:
        driver.data[:] = initial
        requests = []
        for i, (offset, payload) in enumerate(writes):
            if zero_one and i == 0:
                requests.append(io.pwrite_zeroes(edge, offset, len(payload)))
            else:
                requests.append(io.pwrite(edge, offset, payload))
        await asyncio.gather(*requests)

    run(body)
    outcomes = set()
    for order in itertools.permutations(range(len(writes))):
        state = bytearray(initial)
        for i in order:
            offset, payload = writes[i]
            if zero_one and i == 0:
                payload = bytes(len(payload))
            state[offset : offset + len(payload)] = payload
        outcomes.add(bytes(state))
    assert bytes(driver.data) in outcomes
    assert len(node.io_state.tracker) == 0


def test_read_modify_writes_of_one_block_do_not_lose_updates() -> None:
    # Two writes into different bytes of one block, both started before either finishes:
    # without serialisation both read the old block and the second write undoes the first.
    node, driver = mem_node(4096, align=4096, yields=lambda: 3)
    edge = user_edge(node)

    async def body() -> None:
        await asyncio.gather(io.pwrite(edge, 10, b"\x01" * 10), io.pwrite(edge, 100, b"\x02" * 10))

    run(body)
    assert driver.data[10:20] == b"\x01" * 10 and driver.data[100:110] == b"\x02" * 10
    reads = [call for call in driver.calls if call[0] == "read"]
    assert reads == [("read", 0, 4096), ("read", 0, 4096)]


def test_cancelled_waiter_leaves_the_tracker_clean() -> None:
    node, driver = mem_node(4096, align=512, yields=lambda: 2)
    edge = user_edge(node)

    async def body() -> None:
        first = asyncio.ensure_future(io.pwrite(edge, 1, b"a"))
        second = asyncio.ensure_future(io.pwrite(edge, 2, b"b"))
        await asyncio.sleep(0)
        second.cancel()
        await first
        try:
            await second
        except asyncio.CancelledError:
            pass
        assert len(node.io_state.tracker) == 0
        await io.pwrite(edge, 3, b"c")

    run(body)
    assert driver.data[1] == ord("a") and driver.data[3] == ord("c")
