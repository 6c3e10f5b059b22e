"""Copy a range between two nodes in the kernel (copy_file_range), when both are plain files.

Domain ring, except `_kernel_copy`, the one blocking function, which runs on the file
driver's thread pool. `copy_range` resolves each edge down through `raw` nodes (adding their
offset) to a `file` node, checks what `io.pread`/`io.pwrite` would check at every level, and
accounts the request at every level as they would. Invariant: it returns False (nothing
copied, nothing accounted) whenever the kernel copy does not apply, so the caller's read and
write then behave exactly as they always did; once bytes were copied it never returns False.
"""

from __future__ import annotations

import asyncio
import errno
import os
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import Perm

# What makes the kernel refuse a copy between two files (other filesystems, kernels or
# file kinds): the caller copies through user space instead.
_NOT_APPLICABLE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_ZERO_FILL = 1 << 20

_kernel_ok = hasattr(os, "copy_file_range")
# File nodes the kernel refused to copy between (EXDEV: two filesystems; EOPNOTSUPP): asked
# again, they cost a pool round trip per request for nothing.
_REFUSED_FOR_GOOD = frozenset({errno.EXDEV, errno.EOPNOTSUPP})
_refused: weakref.WeakKeyDictionary[BlockNode, weakref.WeakSet[BlockNode]] = (
    weakref.WeakKeyDictionary()
)

# Set while a copy-up write runs (block-stream's copy of backing data into the top, QEMU's
# BDRV_REQ_WRITE_UNCHANGED copy-on-read write): a format driver must then leave alone every
# part of the range it already allocates, which a guest wrote since the data was read.
COPY_UP: ContextVar[bool] = ContextVar("copy_up", default=False)


def copy_up_active() -> bool:
    """True inside `copy_up_write`/`copy_up_zeroes`: write only into unallocated ranges."""
    return COPY_UP.get()


async def copy_up_write(edge: BdrvChild, offset: int, data: io.Buffer) -> None:
    """`io.pwrite` of data read from below the node, never over what the node allocates
    (in qcow2: clusters or subclusters a guest wrote meanwhile keep the guest's data)."""
    token = COPY_UP.set(True)
    try:
        await io.pwrite(edge, offset, data)
    finally:
        COPY_UP.reset(token)


async def copy_up_zeroes(edge: BdrvChild, offset: int, length: int) -> None:
    """`io.pwrite_zeroes` for an all-zero copy-up, with the same rule."""
    token = COPY_UP.set(True)
    try:
        await io.pwrite_zeroes(edge, offset, length)
    finally:
        COPY_UP.reset(token)


class _Level:
    """One edge of a resolved chain and the offset the request has there."""

    __slots__ = ("edge", "offset")

    def __init__(self, edge: BdrvChild, offset: int) -> None:
        self.edge = edge
        self.offset = offset


def _resolve(edge: BdrvChild, offset: int) -> list[_Level] | None:
    """The edges a request passes from `edge` down to a file node, or None when some node
    on the way is neither a plain `raw` nor a `file` node without O_DIRECT."""
    levels = [_Level(edge, offset)]
    node = edge.node
    while True:
        drv: Any = node.driver
        if drv.name == "file":
            if drv.direct or drv.request_alignment != 1 or type(drv).__name__ != "FileDriver":
                return None
            return levels
        if drv.name != "raw":
            return None
        child = drv._file
        if child is None:
            return None
        offset += drv.offset
        levels.append(_Level(child, offset))
        node = child.node


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _may_grow(edge: BdrvChild) -> bool:
    return bool(edge.perm & Perm.RESIZE) and isinstance(edge.parent, BlockNode)


def _check_write(levels: list[_Level], length: int) -> bool:
    """io.pwrite's checks at every level (EPERM, EIO outside the node); False when a node
    would turn the payload into something else (detect-zeroes needs to see the data)."""
    for level in levels:
        node = level.edge.node
        if not level.edge.perm & Perm.WRITE or node.options.read_only:
            raise _error(errno.EPERM)
        end = level.offset + length
        if level.offset < 0 or (end > node.driver.getlength() and not _may_grow(level.edge)):
            node.stats.invalid_wr_operations += 1
            raise _error(errno.EIO)
        if node.options.detect_zeroes != "off":
            return False
    return True


def _inside(levels: list[_Level], length: int) -> bool:
    """Whether the read lies inside every node (else io.pread's zero fill or EIO applies)."""
    return all(
        lv.offset >= 0 and lv.offset + length <= lv.edge.node.driver.getlength() for lv in levels
    )


async def copy_range(
    src: BdrvChild, src_offset: int, dst: BdrvChild, dst_offset: int, length: int
) -> bool:
    """Copy `length` bytes from `src` at `src_offset` to `dst` at `dst_offset` with
    os.copy_file_range on the file driver's pool; True when done.

    False, with nothing copied, when this does not apply: a node on either side that is not
    a plain `raw` or a `file` node (O_DIRECT files included), detect-zeroes on the
    destination, a source range not inside its nodes, or a kernel that refuses the pair
    (EXDEV, EINVAL, ENOSYS, EOPNOTSUPP on the first call). The caller then reads and writes.
    Raises what `io.pwrite` raises for permissions and bounds (EPERM, EIO), and OSError for
    real I/O errors (accounted as a failed write on the destination's nodes).
    """
    if length <= 0 or not _kernel_ok:
        return length == 0
    src_levels = _resolve(src, src_offset)
    dst_levels = _resolve(dst, dst_offset)
    if src_levels is None or dst_levels is None:
        return False
    if not _inside(src_levels, length) or not _check_write(dst_levels, length):
        return False
    src_node = src_levels[-1].edge.node
    dst_node = dst_levels[-1].edge.node
    refused = _refused.get(src_node)
    if refused is not None and dst_node in refused:
        return False
    src_drv: Any = src_node.driver
    dst_drv: Any = dst_node.driver
    for level in dst_levels:
        io.write_prepare(level.edge.node, level.offset + length)
    started = io._now()
    try:
        copied = await _run_pair(
            src_drv,
            dst_drv,
            _kernel_copy,
            src_levels[-1].offset,
            dst_levels[-1].offset,
            length,
        )
    except OSError:
        _written(dst_levels, length)  # as io.pwrite: whether or not the write worked
        for level in dst_levels:
            level.edge.node.stats.failed_wr_operations += 1
        raise
    if copied is not True:
        if copied in _REFUSED_FOR_GOOD:
            _refused.setdefault(src_node, weakref.WeakSet()).add(dst_node)
        return False
    elapsed = io._now() - started
    end = dst_levels[-1].offset + length
    if end > dst_drv.length:
        dst_drv.length = end
    _written(dst_levels, length)
    for level in src_levels:
        stats = level.edge.node.stats
        stats.rd_operations += 1
        stats.rd_bytes += length
        stats.rd_total_time_ns += elapsed
    for level in dst_levels:
        stats = level.edge.node.stats
        stats.wr_operations += 1
        stats.wr_bytes += length
        stats.wr_total_time_ns += elapsed
    return True


def _written(levels: list[_Level], length: int) -> None:
    """What io.pwrite records after every attempt, on every node the write went through."""
    for level in levels:
        io.write_done(level.edge.node, level.offset, level.offset + length)


def _run_pair(
    src_drv: Any, dst_drv: Any, func: Callable[..., bool | int], *args: Any
) -> asyncio.Future[bool | int]:
    """`func(src_fd, dst_fd, *args)` on the file driver's pool, both fds kept open (their
    users counted) until the call has really ended, as FileDriver._run does for one."""
    from storage_daemon.blockdev.drivers.file import pool

    src_handle = src_drv._live()
    dst_handle = dst_drv._live()
    src_handle.users += 1
    dst_handle.users += 1

    def done() -> None:
        src_handle.release()
        dst_handle.release()

    return pool.submit(
        asyncio.get_running_loop(),
        func,
        src_handle.fd,
        dst_handle.fd,
        *args,
        on_done=done,
    )


def _kernel_copy(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> bool | int:
    """Blocking (pool thread): copy_file_range until `length` bytes are copied; True then.
    The errno when the kernel refuses before any byte moved; a refusal later, or the source
    ending early (shrunk by someone else), is finished by hand: read and write, zeroes past
    the source's end, as a read there returns."""
    global _kernel_ok
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done, src_off + done, dst_off + done)
        except InterruptedError:
            continue
        except OSError as err:
            if err.errno not in _NOT_APPLICABLE:
                raise
            if err.errno == errno.ENOSYS:
                _kernel_ok = False
            if not done:
                return err.errno
            _copy_by_hand(src_fd, dst_fd, src_off + done, dst_off + done, length - done)
            return True
        if n == 0:
            _copy_by_hand(src_fd, dst_fd, src_off + done, dst_off + done, length - done)
            return True
        done += n
    return True


def _copy_by_hand(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> None:
    done = 0
    while done < length:
        size = min(_ZERO_FILL, length - done)
        data = os.pread(src_fd, size, src_off + done)
        if len(data) < size:
            data = data + bytes(size - len(data))  # past the source's end: zeroes
        view = memoryview(data)
        written = 0
        while written < size:
            written += os.pwrite(dst_fd, view[written:], dst_off + done + written)
        done += size


__all__ = ["COPY_UP", "copy_range", "copy_up_active", "copy_up_write", "copy_up_zeroes"]
