"""The generic I/O path on real graphs: null-co and raw nodes from blockdev-add, and in-memory
nodes attached through the graph, checked for errnos, splitting, detect-zeroes, accounting,
flushes, block status and allocation depth."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import ROLE_BACKING, BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.raw import RawDriver
from storage_daemon.blockdev.node import BlockNode, NodeOptions
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.clock import FakeClock, SystemClock
from storage_daemon.daemon import Daemon
from tests.unit.test_io_layer import MemDriver, Parent, mem_node

RW = Perm.CONSISTENT_READ | Perm.WRITE


async def add(daemon: Daemon, args: dict[str, Any]) -> BlockNode:
    await daemon.run_command("blockdev-add", args)
    return daemon.graph.lookup(args["node-name"])


def attach(daemon: Daemon, node: BlockNode, perm: Perm = RW) -> BdrvChild:
    return daemon.graph.attach(Parent(), node, "root", ChildRole.PRIMARY, perm, PERM_ALL)


async def errno_of(coro: Any) -> int | None:
    with pytest.raises(OSError) as info:
        await coro
    return info.value.errno


class _Opener:
    def __init__(self, daemon: Daemon, child: BlockNode) -> None:
        self.daemon = daemon
        self.child = child

    async def open_child(
        self, parent: BlockNode, ref: Any, name: str, role: ChildRole
    ) -> BdrvChild:
        return self.daemon.graph.attach(parent, self.child, name, role)


async def raw_over(
    daemon: Daemon, child: BlockNode, *, offset: int = 0, options: NodeOptions | None = None
) -> BlockNode:
    node = BlockNode(name="raw", driver=None, options=options or NodeOptions(), serial=2)  # type: ignore[arg-type]
    node.driver = RawDriver(node)
    await node.driver.open(
        SimpleNamespace(offset=offset, size=None, file=child.name), _Opener(daemon, child)
    )
    return node


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    fake = FakeClock()
    io.use_clock(fake)
    try:
        yield fake
    finally:
        io.use_clock(SystemClock())


# --- errnos ------------------------------------------------------------------------------


async def test_bounds_are_eio_and_counted_as_invalid() -> None:
    daemon = Daemon()
    node = await add(daemon, {"driver": "null-co", "node-name": "n", "size": 1 << 20})
    edge = attach(daemon, node)
    assert await errno_of(io.pread(edge, 1 << 20, 4096)) == errno.EIO
    assert await errno_of(io.pread(edge, -1, 1)) == errno.EIO
    assert await errno_of(io.pread(edge, 0, -1)) == errno.EIO
    assert await errno_of(io.pread(edge, (1 << 20) + 1, 0)) == errno.EIO
    assert await errno_of(io.pwrite(edge, (1 << 20) - 4095, bytes(4096))) == errno.EIO
    assert await errno_of(io.pwrite_zeroes(edge, 1 << 20, 1)) == errno.EIO
    assert await errno_of(io.pdiscard(edge, 1 << 20, 1)) == errno.EIO
    assert await errno_of(io.block_status(edge, (1 << 20) + 1, 1)) == errno.EIO
    assert bytes(await io.pread(edge, 1 << 20, 0)) == b""  # zero length at EOF is fine
    await io.pwrite(edge, 1 << 20, b"")
    stats = node.stats
    assert (stats.invalid_rd_operations, stats.invalid_wr_operations) == (4, 2)
    assert stats.invalid_unmap_operations == 1
    assert stats.rd_operations == stats.wr_operations == 0


async def test_zero_length_requests_do_not_reach_the_driver() -> None:
    node, driver = mem_node(4096, align=512)
    edge = BdrvChild(Parent(), node, "root", ChildRole.PRIMARY, RW, PERM_ALL)
    assert bytes(await io.pread(edge, 100, 0)) == b""
    await io.pwrite(edge, 100, b"")
    await io.pwrite_zeroes(edge, 100, 0)
    await io.pdiscard(edge, 100, 0)
    assert driver.calls == []


async def test_writes_need_the_write_permission_and_reads_need_none() -> None:
    daemon = Daemon()
    node = await add(daemon, {"driver": "null-co", "node-name": "n", "size": 65536})
    reader = attach(daemon, node, Perm(0))
    assert len(await io.pread(reader, 0, 4096)) == 4096
    for request in (
        io.pwrite(reader, 0, b"x"),
        io.pwrite_zeroes(reader, 0, 512),
        io.pdiscard(reader, 0, 512),
        io.truncate(reader, 4096),
    ):
        assert await errno_of(request) == errno.EPERM
    # The check comes first: a bad range without permission is still EPERM.
    assert await errno_of(io.pwrite(reader, 1 << 30, b"x")) == errno.EPERM
    assert node.stats.wr_operations == node.stats.invalid_wr_operations == 0


async def test_read_only_node_never_reaches_a_driver_write() -> None:
    node, driver = mem_node(4096, options=NodeOptions(read_only=True))
    # The graph never grants WRITE on a read-only node; forge an edge that claims it.
    edge = BdrvChild(Parent(), node, "root", ChildRole.PRIMARY, PERM_ALL, PERM_ALL)
    assert await errno_of(io.pwrite(edge, 0, b"x")) == errno.EPERM
    assert await errno_of(io.pwrite_zeroes(edge, 0, 1)) == errno.EPERM
    assert await errno_of(io.pdiscard(edge, 0, 1)) == errno.EPERM
    with pytest.raises(OSError) as info:
        await io.truncate(edge, 8192)
    assert (info.value.errno, info.value.strerror) == (errno.EACCES, "Image is read-only")
    await io.flush(edge)  # nothing to flush on a read-only node
    assert driver.calls == [] and driver.flushes == 0


async def test_truncate_checks_and_resizes() -> None:
    daemon = Daemon()
    node, driver = mem_node(4096)
    edge = attach(daemon, node, RW | Perm.RESIZE)
    with pytest.raises(OSError) as info:
        await io.truncate(edge, -1)
    assert len(driver.data) == 4096
    assert (info.value.errno, info.value.strerror) == (
        errno.EINVAL,
        "Image size cannot be negative",
    )
    await io.truncate(edge, 8192)
    assert io.length(edge) == 8192
    await io.pwrite(edge, 8000, b"z" * 192)
    assert await errno_of(io.truncate(attach(daemon, node, RW), 4096)) == errno.EPERM


async def test_null_node_without_resize_support_keeps_its_qmp_error() -> None:
    daemon = Daemon()
    node = await add(daemon, {"driver": "null-co", "node-name": "n"})
    edge = attach(daemon, node, RW | Perm.RESIZE)
    with pytest.raises(Exception, match="does not support resize"):
        await io.truncate(edge, 4096)


async def test_node_parents_may_read_past_eof_and_grow_with_resize() -> None:
    daemon = Daemon()
    child, driver = mem_node(1000)
    driver.data[:] = b"\x07" * 1000
    parent_node, _ = mem_node(0, name="fmt")
    edge = daemon.graph.attach(parent_node, child, "file", ChildRole.PRIMARY)
    # A parent node (a format reading its file) gets zeroes past EOF; an export gets EIO.
    assert bytes(await io.pread(edge, 990, 20)) == b"\x07" * 10 + bytes(10)
    assert await errno_of(io.pread(attach(daemon, child), 990, 20)) == errno.EIO
    grower = BdrvChild(parent_node, child, "file", ChildRole.PRIMARY, RW | Perm.RESIZE, PERM_ALL)
    await io.pwrite(grower, 1500, b"abc")
    assert len(driver.data) == 1503 and driver.data[1500:] == b"abc"
    exporter = BdrvChild(Parent(), child, "root", ChildRole.PRIMARY, RW | Perm.RESIZE, PERM_ALL)
    assert await errno_of(io.pwrite(exporter, 1503, b"x")) == errno.EIO


# --- splitting and alignment -------------------------------------------------------------


async def test_max_transfer_splits_every_kind_of_request() -> None:
    daemon = Daemon()
    node, driver = mem_node(1 << 16, options=NodeOptions(discard="unmap"), max_transfer=4096)
    edge = attach(daemon, node)
    await io.pwrite(edge, 0, b"a" * 10000)
    assert driver.calls == [("write", 0, 4096), ("write", 4096, 4096), ("write", 8192, 1808)]
    driver.calls.clear()
    assert bytes(await io.pread(edge, 100, 9000)) == b"a" * 9000
    assert driver.calls == [("read", 100, 4096), ("read", 4196, 4096), ("read", 8292, 808)]
    driver.calls.clear()
    await io.pwrite_zeroes(edge, 0, 9000)
    assert [call[2] for call in driver.calls] == [4096, 4096, 808]
    driver.calls.clear()
    await io.pdiscard(edge, 0, 8193)
    assert driver.calls == [("discard", 0, 4096), ("discard", 4096, 4096), ("discard", 8192, 1)]


async def test_unaligned_requests_reach_the_driver_aligned() -> None:
    daemon = Daemon()
    node, driver = mem_node(16384 + 100, align=4096, max_transfer=8192)
    driver.data[:] = bytes(range(256)) * 64 + bytes(100)
    edge = attach(daemon, node)
    data = await io.pread(edge, 4000, 200)
    assert bytes(data) == bytes(driver.data[4000:4200])
    assert driver.calls == [("read", 0, 8192)]
    driver.calls.clear()
    await io.pwrite(edge, 16384 + 10, b"\xff" * 20)  # the last block, cut short by EOF
    assert driver.calls == [("read", 16384, 100), ("write", 16384, 100)]
    assert driver.data[16394:16414] == b"\xff" * 20 and len(driver.data) == 16484
    driver.calls.clear()
    await io.pwrite(edge, 4095, b"\x01\x02")  # straddles two blocks: both read, one write
    assert driver.calls == [("read", 0, 4096), ("read", 4096, 4096), ("write", 0, 8192)]
    driver.calls.clear()
    await io.pwrite_zeroes(edge, 100, 12300)
    assert driver.calls == [
        ("read", 0, 4096),
        ("write", 0, 4096),
        ("zeroes", 4096, 8192),
        ("read", 12288, 4096),
        ("write", 12288, 4096),
    ]
    assert not any(driver.data[100:12400]) and driver.data[12400] == 12400 % 256
    assert driver.data[99] == 99


async def test_raw_passes_child_requests_through_the_io_path() -> None:
    daemon = Daemon()
    child, driver = mem_node(8192, name="mem", align=512)
    raw = await raw_over(daemon, child, offset=1024)
    edge = attach(daemon, raw)
    await io.pwrite(edge, 10, b"hello")
    assert driver.calls == [("read", 1024, 512), ("write", 1024, 512)]
    assert driver.data[1034:1039] == b"hello"
    assert bytes(await io.pread(edge, 10, 5)) == b"hello"
    assert io.length(edge) == 8192 - 1024
    # Accounting happens on both nodes, each with its own view of the request.
    assert raw.stats.wr_highest_offset == 15 and child.stats.wr_highest_offset == 1039
    assert raw.stats.wr_operations == child.stats.wr_operations == 1


# --- detect-zeroes and zero writes -------------------------------------------------------


@pytest.mark.parametrize(
    ("detect", "discard", "expected"),
    [
        ("off", "ignore", "write"),
        ("on", "ignore", "zeroes"),
        ("on", "unmap", "zeroes"),
        ("unmap", "unmap", "unmap"),
    ],
)
async def test_detect_zeroes_turns_zero_payloads_into_zero_writes(
    detect: str, discard: str, expected: str
) -> None:
    daemon = Daemon()
    node, driver = mem_node(1 << 16, options=NodeOptions(detect_zeroes=detect, discard=discard))
    edge = attach(daemon, node)
    await io.pwrite(edge, 4096, memoryview(bytearray(8192)))
    await io.pwrite(edge, 0, b"\x00" * 4095 + b"\x01")  # not all zero: a plain write
    assert driver.calls == [(expected, 4096, 8192), ("write", 0, 4096)]
    assert node.stats.wr_operations == 2 and node.stats.wr_bytes == 8192 + 4096


async def test_detect_zeroes_on_a_driver_without_zero_writes_writes_the_payload() -> None:
    daemon = Daemon()
    node, driver = mem_node(8192, options=NodeOptions(detect_zeroes="on"), native_zeroes=False)
    edge = attach(daemon, node)
    await io.pwrite(edge, 0, bytes(4096))
    assert driver.calls == [("write", 0, 4096)]


async def test_detect_zeroes_through_blockdev_add_on_raw_over_null() -> None:
    daemon = Daemon()
    raw = await add(
        daemon,
        {
            "driver": "raw",
            "node-name": "r",
            "detect-zeroes": "unmap",
            "discard": "unmap",
            "file": {"driver": "null-co", "size": 65536},
        },
    )
    edge = attach(daemon, raw)
    await io.pwrite(edge, 0, bytes(4096))
    await io.pwrite(edge, 4096, b"\x01" * 4096)
    child = raw.children[0].node
    assert child.stats.wr_operations == 2 and child.stats.wr_highest_offset == 8192


async def test_zero_writes_fall_back_unless_fast_only() -> None:
    daemon = Daemon()
    node, driver = mem_node(1 << 16, native_zeroes=False, align=512, max_transfer=8192)
    driver.data[:] = b"\x01" * (1 << 16)
    edge = attach(daemon, node)
    await io.pwrite_zeroes(edge, 0, 20000)
    assert not any(driver.data[:20000]) and driver.data[20000] == 1
    assert driver.calls[:2] == [("write", 0, 8192), ("write", 8192, 8192)]
    driver.calls.clear()
    assert await errno_of(io.pwrite_zeroes(edge, 0, 4096, fast_only=True)) == errno.ENOTSUP
    # Through raw, the fast-only flag reaches the child's zero write too.
    raw = await raw_over(daemon, node)
    raw_edge = attach(daemon, raw)
    assert await errno_of(io.pwrite_zeroes(raw_edge, 0, 4096, fast_only=True)) == errno.ENOTSUP
    assert driver.calls == []
    assert io.zero_fallback_allowed()


async def test_fast_zeroes_must_be_aligned() -> None:
    daemon = Daemon()
    node, driver = mem_node(1 << 16, align=4096)
    edge = attach(daemon, node)
    await io.pwrite_zeroes(edge, 4096, 8192, fast_only=True)
    assert driver.calls == [("zeroes", 4096, 8192)]
    assert await errno_of(io.pwrite_zeroes(edge, 1, 4096, fast_only=True)) == errno.ENOTSUP
    null = await add(daemon, {"driver": "null-co", "node-name": "n"})
    await io.pwrite_zeroes(attach(daemon, null), 3, 5, fast_only=True)  # alignment 1


async def test_may_unmap_needs_discard_unmap_on_the_node() -> None:
    daemon = Daemon()
    keep, keep_driver = mem_node(8192)
    unmap, unmap_driver = mem_node(8192, options=NodeOptions(discard="unmap"))
    await io.pwrite_zeroes(attach(daemon, keep), 0, 4096, may_unmap=True)
    await io.pwrite_zeroes(attach(daemon, unmap), 0, 4096, may_unmap=True)
    assert keep_driver.calls == [("zeroes", 0, 4096)]
    assert unmap_driver.calls == [("unmap", 0, 4096)]


# --- discard -----------------------------------------------------------------------------


async def test_discard_is_ignored_unless_enabled_and_drops_partial_blocks() -> None:
    daemon = Daemon()
    ignored, ignored_driver = mem_node(1 << 16)
    await io.pdiscard(attach(daemon, ignored), 0, 4096)
    assert ignored_driver.calls == [] and ignored.stats.unmap_operations == 1
    node, driver = mem_node(1 << 16, options=NodeOptions(discard="unmap"), align=4096)
    edge = attach(daemon, node)
    await io.pdiscard(edge, 100, 12300)
    assert driver.calls == [("discard", 4096, 8192)]
    driver.calls.clear()
    await io.pdiscard(edge, 100, 200)  # nothing whole inside
    assert driver.calls == []
    driver.fail_next = errno.ENOTSUP
    await io.pdiscard(edge, 0, 4096)  # ENOTSUP is not an error for an advisory request
    driver.fail_next = errno.EIO
    assert await errno_of(io.pdiscard(edge, 0, 4096)) == errno.EIO
    assert node.stats.failed_unmap_operations == 1 and node.stats.unmap_operations == 3


# --- accounting --------------------------------------------------------------------------


class _SlowMem(MemDriver):
    clock: FakeClock

    async def preadv(self, offset: int, length: int) -> bytes:
        self.clock.advance(1000)
        return await super().preadv(offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self.clock.advance(3000)
        await super().pwritev(offset, data, fua)


async def test_stats_count_operations_bytes_failures_and_time(clock: FakeClock) -> None:
    daemon = Daemon()
    node = BlockNode(name="s", driver=None, options=NodeOptions(), serial=1)  # type: ignore[arg-type]
    driver = _SlowMem(node, 1 << 16)
    driver.clock = clock
    node.driver = driver
    edge = attach(daemon, node)
    await io.pread(edge, 0, 512)
    await io.pread(edge, 512, 1024)
    await io.pwrite(edge, 60000, b"x" * 100)
    await io.pwrite(edge, 0, b"y" * 10)
    driver.fail_next = errno.EIO
    assert await errno_of(io.pread(edge, 0, 1)) == errno.EIO
    driver.fail_next = errno.ENOSPC
    assert await errno_of(io.pwrite(edge, 0, b"z")) == errno.ENOSPC
    await io.flush(edge)
    stats = node.stats
    assert (stats.rd_operations, stats.rd_bytes, stats.rd_total_time_ns) == (2, 1536, 2000)
    assert (stats.wr_operations, stats.wr_bytes, stats.wr_total_time_ns) == (2, 110, 6000)
    assert (stats.failed_rd_operations, stats.failed_wr_operations) == (1, 1)
    assert stats.wr_highest_offset == 60100
    assert stats.flush_operations == 1 and stats.failed_flush_operations == 0


# --- flush -------------------------------------------------------------------------------


async def test_flush_reaches_children_and_skips_clean_nodes() -> None:
    daemon = Daemon()
    child, driver = mem_node(8192)
    raw = await raw_over(daemon, child)
    edge = attach(daemon, raw)
    await io.flush(edge)
    assert driver.flushes == 0  # nothing written since open: nothing to flush
    await io.pwrite(edge, 0, b"data")
    await io.flush(edge)
    assert driver.flushes == 1
    await io.flush(edge)
    assert driver.flushes == 1
    await io.pwrite_zeroes(edge, 0, 10)
    await io.flush(edge)
    assert driver.flushes == 2
    assert raw.stats.flush_operations == 4 and child.stats.flush_operations == 4
    # A reader's flush does not reach children it cannot write.
    reader_only = await raw_over(daemon, mem_node(512, name="m2")[0])
    await io.flush(attach(daemon, reader_only, Perm.CONSISTENT_READ))


async def test_cache_no_flush_skips_the_driver_but_not_the_children() -> None:
    daemon = Daemon()
    child, driver = mem_node(8192)
    raw = await raw_over(daemon, child, options=NodeOptions(cache_no_flush=True))
    edge = attach(daemon, raw)
    await io.pwrite(edge, 0, b"data")
    await io.flush(edge)
    assert driver.flushes == 1  # the child did not inherit no-flush here
    unsafe, unsafe_driver = mem_node(8192, options=NodeOptions(cache_no_flush=True))
    unsafe_edge = attach(daemon, unsafe)
    await io.pwrite(unsafe_edge, 0, b"data")
    await io.flush(unsafe_edge)
    assert unsafe_driver.flushes == 0 and unsafe.stats.flush_operations == 1


async def test_flush_failures_are_reported_and_counted() -> None:
    daemon = Daemon()
    node, driver = mem_node(8192)
    edge = attach(daemon, node)
    await io.pwrite(edge, 0, b"x")
    driver.fail_next = errno.EIO
    assert await errno_of(io.flush(edge)) == errno.EIO
    assert node.stats.failed_flush_operations == 1
    await io.flush(edge)  # still dirty: tried again
    assert driver.flushes == 2


async def test_flush_through_blockdev_add_honours_no_flush_on_null() -> None:
    daemon = Daemon()
    node = await add(daemon, {"driver": "null-co", "node-name": "n", "cache": {"no-flush": True}})
    edge = attach(daemon, node)
    await io.pwrite(edge, 0, b"x")
    await io.flush(edge)
    assert node.stats.flush_operations == 1


# --- block status and allocation depth ---------------------------------------------------


async def test_null_block_status_and_depth_match_qsd() -> None:
    # qsd 7.2 over NBD: null-co read-zeroes=off is "hole" at depth 0 ("absent"),
    # read-zeroes=on is "hole,zero" at depth 1 ("local").
    daemon = Daemon()
    plain = await add(daemon, {"driver": "null-co", "node-name": "a", "size": 1 << 20})
    zeroes = await add(
        daemon, {"driver": "null-co", "node-name": "z", "size": 1 << 20, "read-zeroes": True}
    )
    status = await io.block_status(attach(daemon, plain), 0, 1 << 30)
    assert (status.length, status.data, status.zero, status.depth) == (1 << 20, False, False, 0)
    assert await io.allocation_depth(attach(daemon, plain), 0, 4096) == (4096, 0)
    status = await io.block_status(attach(daemon, zeroes), 4096, 4096)
    assert (status.length, status.data, status.zero, status.depth) == (4096, False, True, 1)
    raw = await add(daemon, {"driver": "raw", "node-name": "r", "file": "z"})
    assert await io.allocation_depth(attach(daemon, raw), 0, 1 << 20) == (1 << 20, 1)
    empty = await io.block_status(attach(daemon, raw), 1 << 20, 4096)
    assert empty.length == 0


class _Cow(MemDriver):
    supports_backing = True


async def test_allocation_depth_walks_the_backing_chain() -> None:
    daemon = Daemon()
    base, base_driver = mem_node(1 << 16, name="base")
    base_driver.allocated = [(8192, 12288)]
    top = BlockNode(name="top", driver=None, options=NodeOptions(), serial=3)  # type: ignore[arg-type]
    top_driver = _Cow(top, 1 << 16)
    top_driver.allocated = [(0, 4096)]
    top.driver = top_driver
    daemon.graph.attach(top, base, "backing", ROLE_BACKING)
    edge = attach(daemon, top)
    assert await io.allocation_depth(edge, 0, 1 << 16) == (4096, 1)
    assert await io.allocation_depth(edge, 4096, 1 << 16) == (4096, 0)
    assert await io.allocation_depth(edge, 8192, 1 << 16) == (4096, 2)
    status = await io.block_status(edge, 8192, 100)
    assert (status.length, status.data, status.depth) == (100, True, 2)
    # Unallocated in the whole chain: a driver with backing support reads zeroes there.
    top.children.clear()
    status = await io.block_status(edge, 4096, 4096)
    assert (status.length, status.data, status.zero, status.depth) == (4096, False, True, 0)


async def test_block_status_aligns_the_driver_query() -> None:
    daemon = Daemon()
    node, driver = mem_node(1 << 16, align=4096)
    driver.allocated = [(0, 8192)]
    edge = attach(daemon, node)
    status = await io.block_status(edge, 100, 50)
    assert status.length == 50 and status.data
    assert driver.calls == [("status", 0, 4096)]
    status = await io.block_status(edge, 5000, 1 << 20)
    assert status.length == 8192 - 5000 and status.data
    status = await io.block_status(edge, 8192, 1 << 20)
    assert status.length == (1 << 16) - 8192 and not status.data and status.depth == 0
