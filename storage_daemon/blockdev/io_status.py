"""Block status through the generic I/O path: what backs a range of a node, down its chain.

Domain ring (re-exported by `io`). `block_status` awaits the drivers; `block_status_now`
answers only from memory (optional driver method `block_status_now`), never waiting.
Invariant: both give the same answer for the same state; `_now` says None rather than guess.
"""

from __future__ import annotations

import errno
import os

from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.driver import BlockDriver, BlockStatus
from storage_daemon.blockdev.io_align import aligned_span, is_aligned
from storage_daemon.blockdev.node import BlockNode


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


async def block_status(
    edge: BdrvChild, offset: int, length: int, *, want_zero: bool = True
) -> BlockStatus:
    """The status of one extent starting at `offset`, at most `length` bytes (clipped at EOF).

    `depth` is the allocation depth: 1 when this node (or the node whose data it passes
    through, e.g. raw's file) holds the range, 1 + the backing child's depth when only the
    backing chain does, 0 when nothing in the chain does. Allocated means data or zero.
    `want_zero=False` tells that only allocation matters (no zero probing past backing EOF).
    """
    node = edge.node
    drv = node.driver
    eof = drv.getlength()
    if offset < 0 or length < 0 or offset > eof:
        raise _error(errno.EIO)
    if offset + length > eof:
        length = eof - offset
    if not length:
        return BlockStatus(length=0, data=False, zero=False, depth=0)
    align = drv.request_alignment
    end = offset + length
    if align > 1 and not is_aligned(offset, end, align, eof):
        start, stop = aligned_span(offset, end, align, eof)
        status = await drv.block_status(start, stop - start)
        count = min(status.length - (offset - start), length)
        if count <= 0:
            # The driver's extent ends before `offset`: claim data for the rest of the block.
            count = min(start + align, eof) - offset
            status = BlockStatus(length=count, data=True, zero=False)
    else:
        status = await drv.block_status(offset, length)
        count = min(status.length, length)
        if count <= 0:
            count = length
            status = BlockStatus(length=count, data=True, zero=False)
    if status.data or status.zero:
        if count == status.length:
            return status
        return BlockStatus(length=count, data=status.data, zero=status.zero, depth=status.depth)
    return await _unallocated(node, drv, offset, count, want_zero)


def block_status_now(
    edge: BdrvChild, offset: int, length: int, *, want_zero: bool = True
) -> BlockStatus | None:
    """`block_status` answered without waiting, or None when it cannot be (then await it).

    A driver answers from memory through its optional `block_status_now(offset, length)`
    (cached tables, a cached data extent), returning None when it would need I/O; drivers
    without one always defer. Errors (a range outside the node, corruption) are left to
    the awaited path, which reports them: here they are just None.
    """
    node = edge.node
    drv = node.driver
    probe = getattr(drv, "block_status_now", None)
    if probe is None:
        return None
    eof = drv.getlength()
    end = offset + length
    if offset < 0 or length <= 0 or offset >= eof:
        return None
    if end > eof:
        end = eof
        length = eof - offset
    align = drv.request_alignment
    if align > 1 and (offset % align or (end % align and end != eof)):
        return None
    status: BlockStatus | None = probe(offset, length)
    if status is None:
        return None
    count = status.length
    if count <= 0:
        return None
    if status.data or status.zero:
        if count <= length:
            return status
        return BlockStatus(length=length, data=status.data, zero=status.zero, depth=status.depth)
    if count > length:
        count = length
    backing = node.child("backing")
    if backing is None:
        known = _UNALLOCATED[drv.supports_backing]  # (the hot case: an empty image)
        found = known.get(count)
        return found if found is not None else _unallocated_status(count, drv.supports_backing)
    backing_len = backing.node.driver.getlength()
    if offset >= backing_len:
        return _unallocated_status(count, want_zero)
    below = block_status_now(backing, offset, min(count, backing_len - offset), want_zero=want_zero)
    if below is None:
        return None
    return BlockStatus(
        length=below.length,
        data=below.data,
        zero=below.zero,
        depth=below.depth + 1 if below.depth else 0,
    )


_UNALLOCATED: tuple[dict[int, BlockStatus], dict[int, BlockStatus]] = ({}, {})


def _unallocated_status(count: int, zero: bool) -> BlockStatus:
    """BlockStatus(count, data=False, zero, depth=0), shared per length (the answer for
    every read of an empty qcow2 image: a frozen dataclass costs ~1 us to build)."""
    known = _UNALLOCATED[zero]
    status = known.get(count)
    if status is None:
        if len(known) >= 64:
            known.clear()
        status = known[count] = BlockStatus(length=count, data=False, zero=zero, depth=0)
    return status


async def _unallocated(
    node: BlockNode, drv: BlockDriver, offset: int, count: int, want_zero: bool
) -> BlockStatus:
    """Status of a range this node does not hold: its backing child's, one level deeper."""
    backing = node.child("backing")
    if backing is None:
        # A driver that can have a backing file but has none reads unallocated ranges as
        # zeroes (QEMU); other drivers (null-co without read-zeroes) promise nothing.
        return _unallocated_status(count, drv.supports_backing)
    backing_len = backing.node.driver.getlength()
    if offset >= backing_len:
        return _unallocated_status(count, want_zero)
    below = await block_status(
        backing, offset, min(count, backing_len - offset), want_zero=want_zero
    )
    return BlockStatus(
        length=below.length,
        data=below.data,
        zero=below.zero,
        depth=below.depth + 1 if below.depth else 0,
    )


async def allocation_depth(edge: BdrvChild, offset: int, length: int) -> tuple[int, int]:
    """(extent length, depth) for NBD's qemu:allocation-depth; see `block_status`."""
    status = await block_status(edge, offset, length, want_zero=False)
    return status.length, status.depth
