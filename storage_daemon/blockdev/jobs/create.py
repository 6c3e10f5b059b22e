"""blockdev-create as a job, and the `file` driver's image creation.

Domain ring, except the `_file_*` functions, which make the blocking syscalls and run only on
the thread pool. Drivers that can create images register a coroutine in `CREATORS` under their
BlockdevDriver name (the qcow2 driver adds "qcow2"). Invariant: progress is 0/1 until the
creator returns or fails, then 1/1; errors become the job's error text, in qsd's words.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev.drivers import DRIVERS
from storage_daemon.blockdev.drivers.file.locking import ImageLocks
from storage_daemon.blockdev.jobs.job import Job
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.errors import QmpError
from storage_daemon.hostpath import host_path

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph
    from storage_daemon.blockdev.jobs.manager import JobManager

log = logging.getLogger(__name__)

Creator = Callable[["CreateJob", Any], Awaitable[None]]

#: BlockdevDriver name -> coroutine creating an image from typed BlockdevCreateOptions.
#: A creator raises QmpError (qsd's text) or OSError; it may call `job.release_start()` once
#: it reaches the point where qsd's create would first wait, so that failures before that
#: point are reported before blockdev-create returns, as on qsd.
CREATORS: dict[str, Creator] = {}


def register_creator(driver: str, creator: Creator) -> None:
    CREATORS[driver] = creator


class CreateJob(Job):
    """blockdev-create: auto-finalized, never auto-dismissed (job-dismiss needed), as qsd."""

    job_type = "create"

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        options: Any,
        creator: Creator,
        graph: BlockGraph | None = None,
    ) -> None:
        self.options = options
        self.creator = creator
        self.graph = graph
        super().__init__(manager, job_id, auto_finalize=True, auto_dismiss=False)

    async def run(self) -> None:
        self.progress_set_remaining(1)
        try:
            await self.creator(self, self.options)
        finally:
            self.progress_update(1)


def creator_for(driver: str) -> Creator:
    if driver not in CREATORS and driver in DRIVERS:
        DRIVERS[driver]  # importing a driver registers its creator, if it has one
    creator = CREATORS.get(driver)
    if creator is None:
        raise QmpError("Driver does not support blockdev-create")
    return creator


# --- the file driver ----------------------------------------------------------------------

_UINT32_MAX = (1 << 32) - 1
_INT64_MAX = (1 << 63) - 1
_MIB = 1 << 20
_ZERO_CHUNK = 65536
_FIRST_BLOCK = 4096  # QEMU's MAX_BLOCKSIZE
_SECTOR = 512
# qsd takes these on the new file: it writes, and nobody may resize it under it.
_CREATE_PERM = Perm.WRITE | Perm.RESIZE
_CREATE_SHARED = PERM_ALL & ~Perm.RESIZE

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_NOCOW_FL = 0x00800000
_FS_IOC_FSGETXATTR = 0x801C581F
_FS_IOC_FSSETXATTR = 0x401C5820
_FS_XFLAG_EXTSIZE = 0x00000800
_FSXATTR = struct.Struct("=IIIII8x")  # xflags, extsize, nextents, projid, cowextsize


def _wire(value: Any) -> Any:
    return getattr(value, "value", value)


async def create_file(job: CreateJob, options: Any) -> None:
    """The `file` driver's creation: qsd's checks, steps, errors and file layout."""
    filename: str = options.filename
    size: int = options.size
    prealloc = _wire(options.preallocation) or "off"
    nocow = bool(options.nocow)
    explicit_hint = options.extent_size_hint is not None
    hint = options.extent_size_hint if explicit_hint else _MIB
    if hint > _UINT32_MAX:
        raise QmpError("Extent size hint is too large")
    loop = asyncio.get_running_loop()
    fd, locks = await loop.run_in_executor(None, _file_open, filename)
    # qsd first waits on its thread pool here, truncating: later errors come after the reply.
    job.release_start()
    await loop.run_in_executor(
        None, _file_fill, fd, locks, size, prealloc, nocow, hint, explicit_hint
    )


def _file_open(filename: str) -> tuple[int, ImageLocks]:
    """Create (or open) the file and take qsd's create locks; runs on the pool."""
    try:
        fd = os.open(host_path(filename), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise QmpError(
            f"Could not create '{filename}': {os.strerror(err.errno or errno.EIO)}"
        ) from err
    locks = ImageLocks(fd, filename)
    try:
        locks.apply(_CREATE_PERM, ~_CREATE_SHARED & PERM_ALL, unlock=False)
        locks.check(_CREATE_PERM, _CREATE_SHARED)
    except BaseException:
        locks.release_all()
        os.close(fd)
        raise
    return fd, locks


def _file_fill(
    fd: int,
    locks: ImageLocks,
    size: int,
    prealloc: str,
    nocow: bool,
    hint: int,
    explicit_hint: bool,
) -> None:
    """Empty the file, set its attributes, then grow it to `size`; runs on the pool."""
    try:
        _truncate(fd, 0, "off")
        if nocow:
            _set_nocow(fd)  # an optimisation for btrfs; other filesystems may refuse
        _set_extent_hint(fd, hint, explicit_hint)
        _truncate(fd, size, prealloc)
    finally:
        locks.release_all()
        try:
            os.close(fd)
        except OSError as err:
            raise QmpError(f"Could not close the new file: {os.strerror(err.errno or 0)}") from err


def _set_nocow(fd: int) -> None:
    try:
        buf = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("=l", 0))
        (attr,) = struct.unpack("=l", buf)
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("=l", attr | _FS_NOCOW_FL))
    except OSError:
        pass


def _set_extent_hint(fd: int, hint: int, explicit: bool) -> None:
    try:
        buf = fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
        xflags, _extsize, nextents, projid, cowextsize = _FSXATTR.unpack(buf)
        fcntl.ioctl(
            fd,
            _FS_IOC_FSSETXATTR,
            _FSXATTR.pack(xflags | _FS_XFLAG_EXTSIZE, hint, nextents, projid, cowextsize),
        )
    except OSError as err:
        if explicit and hint:
            log.warning("Failed to set extent size hint: %s", os.strerror(err.errno or 0))


def _signed(size: int) -> int:
    """qsd passes sizes on as off_t: values past INT64_MAX become negative (EINVAL)."""
    return size - (1 << 64) if size > _INT64_MAX else size


def _ftruncate(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, _signed(size))
    except OSError as err:
        raise QmpError(f"Could not resize file: {os.strerror(err.errno or 0)}") from err


def _allocate_first_block(fd: int, size: int) -> None:
    """Write zeroes over the first block (a sector for small files, which may grow the file
    to 512 bytes, as qsd's do), so that later block-status queries are cheap."""
    length = _SECTOR if size < _FIRST_BLOCK else _FIRST_BLOCK
    try:
        os.pwrite(fd, bytes(length), 0)
    except OSError:
        pass


def _truncate(fd: int, size: int, prealloc: str) -> None:
    """QEMU's handle_aiocb_truncate for a new file, with its messages."""
    try:
        current = os.fstat(fd).st_size
    except OSError as err:
        raise QmpError(f"Could not stat file: {os.strerror(err.errno or 0)}") from err
    if current > size and prealloc != "off":
        raise QmpError("Cannot use preallocation for shrinking files")
    if prealloc == "off":
        _ftruncate(fd, size)
        if current == 0 and size > 0:
            _allocate_first_block(fd, size)
        return
    if prealloc not in ("falloc", "full"):
        raise QmpError(f"Unsupported preallocation mode: {prealloc}")
    try:
        if prealloc == "falloc":
            if size != current:
                try:
                    os.posix_fallocate(fd, current, _signed(size) - current)
                except OSError as err:
                    raise QmpError(
                        f"Could not preallocate new data: {os.strerror(err.errno or 0)}"
                    ) from err
                if current == 0:
                    _allocate_first_block(fd, size)
            return
        _ftruncate(fd, size)
        zeroes = bytes(_ZERO_CHUNK)
        offset = current
        while offset < size:
            n = min(size - offset, _ZERO_CHUNK)
            try:
                offset += os.pwrite(fd, zeroes[:n], offset)
            except OSError as err:
                raise QmpError(
                    f"Could not write zeros for preallocation: {os.strerror(err.errno or 0)}"
                ) from err
        try:
            os.fsync(fd)
        except OSError as err:
            raise QmpError(f"Could not flush file to disk: {os.strerror(err.errno or 0)}") from err
    except QmpError:
        try:
            os.ftruncate(fd, current)
        except OSError as err:
            log.error("Failed to restore old file length: %s", os.strerror(err.errno or 0))
        raise


register_creator("file", create_file)
