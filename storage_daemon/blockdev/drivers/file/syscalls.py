"""Blocking syscalls of the `file` driver: fallocate, aligned buffers, full reads and writes.

Edge ring. Every function here may block and is meant to run on the thread pool, never on
the event loop (except `try_read_nowait`, which never blocks). They raise `OSError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct

from storage_daemon.hostpath import host_path

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BLKSSZGET = 0x1268  # logical sector size of a block device (int)
PAGE_SIZE = mmap.PAGESIZE
MAX_ALIGN = max(4096, PAGE_SIZE)
# Errnos that say "this filesystem cannot do that operation", as opposed to a real failure.
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY})

TMPFS_MAGIC = 0x01021994

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int
_mallopt = getattr(_libc, "mallopt", None)  # glibc (and musl's stub) only

# glibc mallopt parameters, and the values the data path wants (see `keep_freed_buffers`).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 4 * 1024 * 1024
HEAP_TRIM_THRESHOLD = 64 * 1024 * 1024
_malloc_tuned = False


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """libc fallocate(2); Python's os module has only posix_fallocate, without modes."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def keep_freed_buffers() -> bool:
    """Make freed I/O buffers (up to 4 MiB) stay in the heap for the next request.

    Every request allocates its data buffer (a 256 KiB nbdcopy read: `os.pread`'s bytes; a
    write: the NBD payload). With glibc's dynamic thresholds the heap top is trimmed back to
    the kernel as soon as ~512 KiB are free, so the next request faults 64 fresh zeroed pages
    back in: measured, half the daemon's CPU in an nbdcopy run went to page faults, brk and
    munmap. Fixed thresholds keep up to 64 MiB of freed memory for reuse (qsd's buffers are
    reused the same way). Process-wide and idempotent; False when there is no glibc mallopt.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if _mallopt is None:
        return False
    _mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _mallopt.restype = ctypes.c_int
    # Setting either threshold turns glibc's dynamic adjustment of both off.
    ok = bool(_mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))
    ok = bool(_mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)) and ok
    _malloc_tuned = ok
    return ok


def filesystem_type(fd: int) -> int:
    """fstatfs(2)'s f_type (e.g. TMPFS_MAGIC); 0 when it cannot be told.

    Python's os.fstatvfs has no f_type. On Linux, f_type is the first member of struct statfs
    and a machine word on every architecture but s390x, where a wrong value only means
    "not recognised" (the caller then takes its safe path).
    """
    buf = ctypes.create_string_buffer(256)  # larger than struct statfs anywhere
    if _fstatfs(fd, buf) != 0:
        return 0
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def aligned_buffer(length: int) -> mmap.mmap:
    """Zero-filled anonymous memory, page aligned, as O_DIRECT wants (at least one page)."""
    size = max(PAGE_SIZE, -(-length // PAGE_SIZE) * PAGE_SIZE)
    return mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


FIRST_BLOCK = 4096


def allocate_first_block(fd: int, size: int) -> None:
    """Write zeroes over the first block of a file just grown from empty, as qsd does.

    Filesystems allocate lazily; an allocated first block keeps later block-status probes
    cheap (and `qemu-img info` shows 4 KiB in use, as for qsd's files). A file smaller than
    a block gets one sector, which makes it at least 512 bytes long (qsd's files too).
    Best effort: a failure (e.g. an O_DIRECT alignment above 512) is ignored, as qsd does.
    """
    length = 512 if size < FIRST_BLOCK else FIRST_BLOCK
    buf = aligned_buffer(length)
    try:
        with memoryview(buf) as view:
            write_full(fd, view[:length], 0, 0)
    except OSError:
        pass
    finally:
        buf.close()


def map_readonly(fd: int, length: int) -> mmap.mmap:
    """A read-only shared mapping of the first `length` bytes of the file open as `fd`.

    Made through a descriptor of its own (a new open file description, reopened through
    /proc): Python's mmap keeps a dup of the descriptor it is given, and a dup of `fd` would
    keep the image's OFD locks alive for as long as the mapping lives.
    """
    own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mmap.mmap(own, length, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(own)


def open_image(path: str, flags: int) -> tuple[int, os.stat_result]:
    """Open and fstat, closing the fd again if fstat fails."""
    fd = os.open(host_path(path), flags)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def device_length(fd: int, st: os.stat_result) -> int:
    """A regular file's size, or a block device's (which fstat reports as 0)."""
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def probe_request_alignment(fd: int, st: os.stat_result) -> int:
    """The smallest O_DIRECT request size the file accepts, found as QEMU finds it.

    Block devices report their logical sector size; for files, aligned reads of growing size
    (1, 512, ... MAX_ALIGN) at offset 0 are tried, and the kernel's EINVAL marks a misaligned
    one. A 1-byte read that works (a file whose start is a hole: the kernel zeroes the buffer
    without checking alignment) tells nothing, so MAX_ALIGN is taken, as qsd does. 0: none
    worked.
    """
    if stat.S_ISBLK(st.st_mode):
        try:
            raw = fcntl.ioctl(fd, BLKSSZGET, b"\0\0\0\0")
            size = int(struct.unpack("i", raw)[0])
            if size > 0:
                return size
        except OSError:
            pass
    buf = aligned_buffer(MAX_ALIGN)
    try:
        align = 1
        while align <= MAX_ALIGN:
            try:
                os.preadv(fd, [memoryview(buf)[:align]], 0)
            except OSError as err:
                if err.errno == errno.EINVAL:
                    align = 512 if align == 1 else align * 2
                    continue
                # only EINVAL means misaligned; other errors are not ours
            return MAX_ALIGN if align == 1 else align
        return 0
    finally:
        buf.close()


def read_full(fd: int, view: memoryview, offset: int, direct: bool) -> None:
    """Fill `view` from `offset`; what lies past the end of the file reads as zeroes."""
    done = 0
    total = len(view)
    while done < total:
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except InterruptedError:
            continue
        except OSError as err:
            # O_DIRECT after a short read: the next offset is misaligned, i.e. we are at EOF.
            if direct and done and err.errno == errno.EINVAL:
                got = 0
            else:
                raise
        if got == 0:
            view[done:] = bytes(total - done)
            return
        done += got


def read_bytes(fd: int, length: int, offset: int) -> bytes | bytearray:
    """`length` bytes at `offset`, zeroes past the end of the file.

    os.pread allocates its result without zero-filling it first (a bytearray would be
    cleared, then overwritten): the cheaper way for the common full read.
    """
    while True:
        try:
            data = os.pread(fd, length, offset)
            break
        except InterruptedError:
            continue
    if len(data) == length:
        return data
    buf = bytearray(length)
    view = memoryview(buf)
    view[: len(data)] = data
    read_full(fd, view[len(data) :], offset + len(data), False)
    return buf


def try_read_nowait(fd: int, view: memoryview, offset: int) -> int:
    """Read what the page cache holds without blocking: bytes read, 0 if nothing was cached.

    Raises OSError for errors other than "would block" (EOPNOTSUPP: no RWF_NOWAIT here).
    """
    try:
        return os.preadv(fd, [view], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0


def write_full(fd: int, data: memoryview, offset: int, flags: int) -> None:
    """Write all of `data` at `offset` (pwritev2 `flags`, e.g. RWF_DSYNC for FUA)."""
    done = 0
    total = len(data)
    while done < total:
        try:
            done += os.pwritev(fd, [data[done:]], offset + done, flags)
        except InterruptedError:
            continue


def write_direct(fd: int, data: memoryview, offset: int, flags: int, align: int) -> int:
    """Write through O_DIRECT from an aligned copy, padded with zeroes to `align`.

    Returns the file size the write implies (offset + len(data)); the caller truncates the
    padding away again when it ran past that size.
    """
    length = len(data)
    padded = -(-length // align) * align
    buf = aligned_buffer(padded)
    try:
        view = memoryview(buf)
        view[:length] = data
        write_full(fd, view[:padded], offset, flags)
        view.release()
    finally:
        buf.close()
    return offset + length


def find_allocation(fd: int, offset: int, length: int) -> tuple[bool, int]:
    """(is data, extent length) of the extent at `offset`, at most `length` bytes long.

    SEEK_DATA/SEEK_HOLE as QEMU uses them; a filesystem without them reports all data.
    """
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as err:
        if err.errno == errno.ENXIO:  # only a hole (or EOF) from here on
            return False, length
        if err.errno in UNSUPPORTED or err.errno == errno.EINVAL:
            return True, length
        raise
    if data > offset:
        return False, min(data - offset, length)
    try:
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError as err:
        if err.errno == errno.ENXIO:  # the file shrank under us
            return True, length
        raise
    if hole <= offset:  # raced with a concurrent write: call it data
        return True, length
    return True, min(hole - offset, length)
