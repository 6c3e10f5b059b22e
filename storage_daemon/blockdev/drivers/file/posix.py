"""The `file` protocol driver: a regular file on the host, QEMU's file-posix (edge ring).

Blocking syscalls run on the driver's own thread pool (`pool.py`). Two kinds of small I/O run
on the loop instead, as they never wait for a device: any I/O on tmpfs (shmem pages are only
ever memory; a 4 KiB read costs ~2 us, a pool hop ~9 us) and cached reads elsewhere, tried with
RWF_NOWAIT. Writes whose caller takes a callback (large ones on tmpfs, all buffered ones
elsewhere) go to the file's own writer thread (`copier.py`). Permissions are mirrored as OFD
lock bytes (`locking.py`).
Invariant: an fd stays open while a pool or writer thread may still use it (`_Handle` counts
users).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

from storage_daemon.blockdev import io
from storage_daemon.blockdev.driver import BlockDriver, BlockStatus, ChildOpener, ReopenChange
from storage_daemon.blockdev.drivers.file import pool, syscalls
from storage_daemon.blockdev.drivers.file.copier import Copier, Done
from storage_daemon.blockdev.drivers.file.locking import ImageLocks, ofd_locks_work
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm
from storage_daemon.errors import QmpError

T = TypeVar("T")

# Reads up to this size try the page cache on the loop: a larger copy would hold the loop
# longer than a thread hop costs (1 MiB took ~150 us, which the pool overlaps with other work).
NOWAIT_MAX = 256 * 1024
# tmpfs reads and writes up to this size run on the loop (256 KiB: ~40 us), but for writes
# from COPIER_MIN whose caller takes a callback (`pwritev_start`).
INLINE_MAX = 256 * 1024
COPIER_MIN = 128 * 1024
"""tmpfs writes this large (any size above: 1 MiB ones went to the pool before) go to the
writer thread when the caller takes a callback (`pwritev_start`): below it, the hand-over
costs about as much loop time as the copy. Elsewhere every buffered write may go there."""
_WRITERS = Perm.WRITE | Perm.RESIZE  # what makes auto-read-only switch to read-write


def _wire(value: Any) -> Any:
    return getattr(value, "value", value)


class _Handle:
    """An open fd, its lock bytes, its writer thread, and how many jobs still use it."""

    def __init__(self, fd: int, writable: bool, filename: str) -> None:
        self.fd = fd
        self.writable = writable
        self.locks = ImageLocks(fd, filename)
        self.users = 0
        self.retired = False
        self.idle: asyncio.Future[None] | None = None  # set by close(), done at users == 0
        self.copier: Copier | None = None  # started by the first `pwritev_start`

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users == 0:
            self.close_fd()
            if self.idle is not None and not self.idle.done():
                self.idle.set_result(None)

    def retire(self) -> None:
        """Close once no job uses the fd any more (its locks go with it)."""
        self.retired = True
        if self.users == 0:
            self.close_fd()

    def close_fd(self) -> None:
        """No job uses the fd: close it (nothing of ours is pending, it cannot block for
        long), and let the writer thread end."""
        if self.copier is not None:
            self.copier.stop()
        os.close(self.fd)


class FileDriver(BlockDriver):
    name = "file"
    # qsd 7.2 refuses block and character devices here (the `host_device` driver takes
    # them); a host_device subclass sets this and gets the device code paths.
    allow_devices = False
    reopen_mutable = frozenset({"drop-cache", "x-check-cache-dropped"})

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.discard_nb_ok = 0
        self.discard_nb_failed = 0
        self.discard_bytes_ok = 0
        self.filename = ""
        self.length = 0
        self.locking = False
        self.direct = False
        self.no_flush = False
        self.aio = "threads"
        self.aio_max_batch = 0
        self.drop_cache = True
        self.check_cache_dropped = False
        self._dynamic_ro = False  # auto-read-only: read-write only while a writer exists
        self._flags = 0  # open flags other than the access mode
        self._handle: _Handle | None = None
        self._pending: _Handle | None = None  # prepared by check_perm, swapped by set_perm
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that opened the node
        self._perm = PERM_NONE  # committed, as the lock bytes show it
        self._shared = PERM_ALL
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self._inline = False  # tmpfs: small reads and writes never block, run them inline
        self._dsync = hasattr(os, "RWF_DSYNC")
        self._has_zero_range = True
        self._has_punch = True
        self._has_fallocate = True
        # QEMU's block-status cache: one range known to be data, so that a client walking a
        # fully allocated image (nbdcopy asks 128 MiB at a time) does not make the kernel
        # scan the page cache for the next hole again and again (SEEK_HOLE is linear in the
        # data before the hole). Writes only turn holes into data, so only zero writes,
        # discards and truncation drop it; `_holes_gen` tells a probe that raced with one.
        self._data_cache: tuple[int, int] | None = None
        self._holes_gen = 0
        # tmpfs: a read-only shared mapping of the image, for live reads of data extents
        # (`io.pread_live`): the NBD reply is then copied once, from the page cache straight
        # into the socket, instead of into a buffer first and from there into the socket.
        self._map: memoryview | None = None
        self._mappable = True

    # --- open and close ---------------------------------------------------------------

    async def open(self, options: Any, opener: ChildOpener) -> None:
        opts = self.node.options
        self.filename = options.filename
        if not self.filename:
            raise QmpError("The 'file' block driver requires a file name")
        if options.pr_manager is not None:
            raise QmpError(f"No persistent reservation manager with id '{options.pr_manager}'")
        locking = _wire(options.locking) or "auto"
        self.aio = _wire(options.aio) or "threads"
        self.aio_max_batch = int(options.aio_max_batch or 0)
        if options.drop_cache is not None:
            self.drop_cache = bool(options.drop_cache)
        self.check_cache_dropped = bool(options.x_check_cache_dropped)
        self.direct = opts.cache_direct
        self.no_flush = opts.cache_no_flush
        self._dynamic_ro = opts.auto_read_only and not opts.read_only
        self._flags = os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        writable = not opts.read_only and not self._dynamic_ro

        syscalls.keep_freed_buffers()  # once per process: no page faults per request
        loop = self._loop = asyncio.get_running_loop()
        fd, st = await loop.run_in_executor(None, self._open_fd, writable)
        handle = _Handle(fd, writable, self.filename)
        try:
            await loop.run_in_executor(None, self._setup, fd, st, locking)
        except BaseException:
            await loop.run_in_executor(None, os.close, fd)
            raise
        self._handle = handle

    def _open_fd(self, writable: bool) -> tuple[int, os.stat_result]:
        """Open with qsd's error texts (may block: pool or, when reopening, a tiny syscall)."""
        flags = self._flags | (os.O_RDWR if writable else os.O_RDONLY)
        try:
            return syscalls.open_image(self.filename, flags)
        except OSError as err:
            if err.errno == errno.EINVAL and flags & os.O_DIRECT:
                reason = "filesystem does not support O_DIRECT"
            else:
                reason = os.strerror(err.errno or errno.EIO)
            raise QmpError(f"Could not open '{self.filename}': {reason}") from err

    def _setup(self, fd: int, st: os.stat_result, locking: str) -> None:
        """Checks and probes after the open, in qsd's order (runs on the pool)."""
        is_device = stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)
        if not stat.S_ISREG(st.st_mode) and not (self.allow_devices and is_device):
            raise QmpError(f"'{self.name}' driver requires '{self.filename}' to be a regular file")
        if self.aio == "native" and not self.direct:
            raise QmpError(
                "aio=native was specified, but it requires cache.direct=on, which was not "
                "specified."
            )
        self.length = syscalls.device_length(fd, st)
        self._inline = stat.S_ISREG(st.st_mode) and (
            syscalls.filesystem_type(fd) == syscalls.TMPFS_MAGIC
        )
        if self.direct:
            align = syscalls.probe_request_alignment(fd, st)
            if not align:
                raise QmpError(
                    "Could not find working O_DIRECT alignment", hint="Try cache.direct=off"
                )
            self.request_alignment = align
            # RWF_NOWAIT on O_DIRECT would still wait for the device: only cached reads gain.
            self._nowait = False
        if locking == "off":
            self.locking = False
        elif locking == "on":
            self.locking = True
        else:
            self.locking = ofd_locks_work(fd)

    async def close(self) -> None:
        self._map = None  # unmapped once the last reply using it was sent
        handles = [h for h in (self._pending, self._handle) if h is not None]
        self._pending = self._handle = None
        loop = asyncio.get_running_loop()
        for handle in handles:
            handle.retired = True  # with pool jobs still running, the last one closes it
            if handle.users == 0:
                await loop.run_in_executor(None, handle.close_fd)
            else:
                # The pool's threads do not hold the process open at exit: wait for the
                # syscalls of cancelled requests here, so none is cut short.
                handle.idle = loop.create_future()
                await asyncio.shield(handle.idle)

    @property
    def fd(self) -> int:
        """The current fd (tests read its lock bytes in /proc/locks)."""
        return self._live().fd

    @property
    def writable(self) -> bool:
        return self._live().writable

    def _live(self) -> _Handle:
        if self._handle is None:
            raise OSError(errno.EBADF, "file node is closed")
        return self._handle

    # --- blockdev-reopen ----------------------------------------------------------------

    def reopen_prepare(self, change: ReopenChange) -> None:
        """The fd is reopened for writing or reading only inside a permission update while
        the auto-read-only flag is up: raise it while writability may change."""
        old, new = change.old, change.new
        if (new.read_only, new.auto_read_only) != (old.read_only, old.auto_read_only):
            change.saved = self._dynamic_ro
            self._dynamic_ro = True

    def reopen_commit(self, change: ReopenChange) -> None:
        self._settle_dynamic_ro(change)
        self.drop_cache = change.options.drop_cache is not False  # default: on
        self.check_cache_dropped = bool(change.options.x_check_cache_dropped)

    def reopen_abort(self, change: ReopenChange) -> None:
        self._settle_dynamic_ro(change)

    def _settle_dynamic_ro(self, change: ReopenChange) -> None:
        """After the update: auto-read-only as the options say, and also while a read-write
        node still has its read-only fd (no writer came yet: the first one reopens it)."""
        if change.saved is None:
            return
        opts = self.node.options
        self._dynamic_ro = (opts.auto_read_only and not opts.read_only) or (
            not opts.read_only and not self.writable
        )

    # --- permissions and image locking -------------------------------------------------

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """Prepare `perm`/`shared`: reopen for auto-read-only, take and test the lock bytes.

        Runs on the loop, as the graph's transaction is synchronous: OFD lock calls never
        wait (F_OFD_SETLK, F_OFD_GETLK), and a reopen is one open(2) of a file already open.
        """
        handle = self._live()
        self._drop_pending()
        if self._dynamic_ro:
            want_rw = bool(perm & _WRITERS)
            if want_rw != handle.writable:
                try:
                    fd, _ = self._open_fd(want_rw)
                except QmpError:
                    if want_rw:
                        raise
                    fd = -1  # keep writing access rather than fail a permission drop
                if fd >= 0:
                    self._pending = _Handle(fd, want_rw, self.filename)
        if not self.locking:
            return
        old_perm, old_unshared = self._perm, ~self._shared & PERM_ALL
        new_unshared = ~shared & PERM_ALL
        try:
            if perm & ~old_perm or new_unshared & ~old_unshared:
                # Hold the union while testing, so no other opener slips in between.
                handle.locks.apply(old_perm | perm, old_unshared | new_unshared, unlock=False)
                handle.locks.check(perm, shared)
            if self._pending is not None:
                self._pending.locks.apply(perm, new_unshared, unlock=False)
        except QmpError:
            self._drop_pending()
            self._rollback_locks()
            raise

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Commit: switch to the prepared fd, keep exactly the bytes `perm`/`shared` imply."""
        pending, self._pending = self._pending, None
        if pending is not None:
            old = self._live()
            self._handle = pending
            old.locks.release_all()  # now, not when the last in-flight request ends
            old.retire()
        self._perm, self._shared = perm, shared
        if self.locking:
            try:
                self._live().locks.apply(perm, ~shared & PERM_ALL, unlock=True)
            except QmpError:
                pass  # unlocking cannot conflict; QEMU ignores failures here as well

    def abort_perm(self) -> None:
        self._drop_pending()
        if self.locking:
            self._rollback_locks()

    def _rollback_locks(self) -> None:
        try:
            self._live().locks.apply(self._perm, ~self._shared & PERM_ALL, unlock=True)
        except QmpError:
            pass

    def _drop_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.retire()

    # --- naming and info --------------------------------------------------------------

    def exact_filename(self) -> str:
        return self.filename

    def format_name(self) -> str:
        return "file"

    def image_info_extra(self) -> dict[str, Any]:
        return {"dirty-flag": False}

    async def actual_size(self) -> int:
        st = await self._run(os.fstat)
        return int(st.st_blocks) * 512

    def getlength(self) -> int:
        return self.length

    # --- data path --------------------------------------------------------------------

    def _run(self, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`func(fd, *args)` on the pool; the fd stays open until the job really ended.

        A cancelled caller stops waiting, but the syscall (and the fd) run to the end.
        """
        handle = self._live()
        handle.users += 1
        return pool.submit(
            asyncio.get_running_loop(), func, handle.fd, *args, on_done=handle.release
        )

    async def preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self.direct:
            return await self._read_direct(offset, length)
        if self._inline:
            cell = io.live_read_cell()
            if cell is not None:
                view = self._mapped(offset, length)
                if view is not None:
                    cell[0] = True
                    return view
            if length <= INLINE_MAX:
                return syscalls.read_bytes(self._live().fd, length, offset)
        if self._nowait and length <= NOWAIT_MAX:
            buf = bytearray(length)
            view = memoryview(buf)
            done = 0
            try:
                done = syscalls.try_read_nowait(self._live().fd, view, offset)
            except OSError as err:
                if err.errno not in syscalls.UNSUPPORTED and err.errno != errno.EINVAL:
                    raise
                self._nowait = False
            if done == length:
                return buf
            if done:
                await self._run(syscalls.read_full, view[done:], offset + done, False)
                return buf
        return await self._run(syscalls.read_bytes, length, offset)

    def preadv_now(
        self, offset: int, length: int, live: bool
    ) -> bytes | bytearray | memoryview | None:
        """`preadv` when it needs no wait (tmpfs, or a page-cache hit), else None; `live`:
        a view of the mapping may do (see `io.pread_now`)."""
        if self.direct:
            return None
        if self._inline:
            if live:
                view = self._mapped(offset, length)
                if view is not None:
                    return view
            if length <= INLINE_MAX:
                return syscalls.read_bytes(self._live().fd, length, offset)
            return None
        if not self._nowait or length > NOWAIT_MAX:
            return None
        buf = bytearray(length)
        try:
            done = syscalls.try_read_nowait(self._live().fd, memoryview(buf), offset)
        except OSError as err:
            if err.errno not in syscalls.UNSUPPORTED and err.errno != errno.EINVAL:
                raise
            self._nowait = False
            return None
        return buf if done == length else None  # a partial hit: the awaited path reads

    def pwritev_now(self, offset: int, data: bytes | memoryview, fua: bool) -> bool:
        """`pwritev` when it runs inline (tmpfs, small enough), else False (nothing done)."""
        if self.direct or not self._inline or len(data) > INLINE_MAX or (fua and not self._dsync):
            return False
        flags = os.RWF_DSYNC if fua else 0
        try:
            syscalls.write_full(self._live().fd, memoryview(data).cast("B"), offset, flags)
        except OSError as err:
            if flags and err.errno in syscalls.UNSUPPORTED:
                self._dsync = False  # no pwritev2 RWF_DSYNC here: the awaited path syncs
                return False
            raise
        if offset + len(data) > self.length:
            self.length = offset + len(data)
        return True

    def pwritev_start(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        """Start a buffered write on the file's writer thread (`copier.py`), `done(error)`
        once it ended; False (nothing done) for small tmpfs writes (inline is cheaper), FUA
        and O_DIRECT ones. The fd stays open until then."""
        loop = self._loop
        if self.direct or fua or loop is None or (self._inline and len(data) < COPIER_MIN):
            return False
        handle = self._live()
        writer = handle.copier
        if writer is None:
            writer = handle.copier = Copier(loop)
        handle.users += 1

        def written(error: BaseException | None) -> None:
            handle.release()  # (io.pwrite_start never grows the file: no length to update)
            done(error)

        writer.pwrite(handle.fd, data, offset, written)
        return True

    def _mapped(self, offset: int, length: int) -> memoryview | None:
        """A view of `[offset, offset+length)` in the mapping, or None to read it instead.

        Only ranges known to be data: touching a tmpfs hole through a mapping would allocate
        it (the image would stop being sparse), while read(2) leaves holes alone.
        """
        cache = self._data_cache
        end = offset + length
        if cache is None or offset < cache[0] or end > cache[1] or end > self.length:
            return None
        if end > os.fstat(self._live().fd).st_size:
            # Shrunk by another process: the mapping's pages past EOF are gone, and a copy
            # from them would fail (EFAULT in the kernel, SIGBUS in user space). Read instead
            # (zeroes past EOF, as qsd reads them), and forget what no longer holds. (~1 us
            # per read; a shrink racing with the send between here and the socket costs the
            # client its connection, never the daemon its life.)
            self._may_punch()
            return None
        view = self._map
        if view is None or end > len(view):
            if not self._mappable:
                return None
            try:
                view = memoryview(syscalls.map_readonly(self._live().fd, self.length))
            except (OSError, ValueError):
                self._mappable = False
                return None
            self._map = view
        return view[offset:end]

    async def _read_direct(self, offset: int, length: int) -> memoryview:
        # The I/O path aligns the start; the end is aligned too unless it is EOF.
        align = self.request_alignment
        padded = -(-length // align) * align
        buf = syscalls.aligned_buffer(padded)
        view = memoryview(buf)
        await self._run(syscalls.read_full, view[:padded], offset, True)
        return view[:length]

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        view = memoryview(data).cast("B")
        flags = os.RWF_DSYNC if fua and self._dsync else 0
        try:
            if self.direct:
                end = await self._run(self._write_direct_job, view, offset, flags)
            elif self._inline and len(view) <= INLINE_MAX:
                syscalls.write_full(self._live().fd, view, offset, flags)
                end = offset + len(view)
            else:
                await self._run(syscalls.write_full, view, offset, flags)
                end = offset + len(view)
        except OSError as err:
            if not flags or err.errno not in syscalls.UNSUPPORTED:
                raise
            self._dsync = False  # no pwritev2 RWF_DSYNC here: write, then fdatasync
            await self.pwritev(offset, data, fua)
            return
        if end > self.length:
            self.length = end
        if fua and not flags:
            await self._run(os.fdatasync)

    def _write_direct_job(self, fd: int, view: memoryview, offset: int, flags: int) -> int:
        size = self.length
        end = syscalls.write_direct(fd, view, offset, flags, self.request_alignment)
        padded_end = offset + -(-len(view) // self.request_alignment) * self.request_alignment
        if padded_end > max(size, end):
            os.ftruncate(fd, max(size, end))  # a write at an unaligned EOF: drop the padding
        return end

    async def flush(self) -> None:
        if self.no_flush:
            return
        await self._run(os.fdatasync)

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        """Zero with fallocate; ENOTSUP tells the I/O path to write zero buffers instead."""
        unmap = unmap and self.node.options.discard == "unmap"
        await self._run_punching(self._zeroes_job, offset, length, unmap)
        self.length = max(self.length, offset + length)
        if fua:
            await self._run(os.fdatasync)

    def _zeroes_job(self, fd: int, offset: int, length: int, unmap: bool) -> None:
        size = os.fstat(fd).st_size
        if unmap and self._has_punch and offset + length <= size:
            try:
                syscalls.fallocate(
                    fd,
                    syscalls.FALLOC_FL_PUNCH_HOLE | syscalls.FALLOC_FL_KEEP_SIZE,
                    offset,
                    length,
                )
                return  # a hole in a regular file reads as zeroes
            except OSError as err:
                if err.errno not in syscalls.UNSUPPORTED:
                    raise
                self._has_punch = False
        if self._has_zero_range:
            try:
                syscalls.fallocate(fd, syscalls.FALLOC_FL_ZERO_RANGE, offset, length)
                return
            except OSError as err:
                if err.errno not in syscalls.UNSUPPORTED:
                    raise
                self._has_zero_range = False
        if self._has_punch and self._has_fallocate and offset + length <= size:
            try:  # punch, then allocate again: zeroes that stay allocated
                syscalls.fallocate(
                    fd,
                    syscalls.FALLOC_FL_PUNCH_HOLE | syscalls.FALLOC_FL_KEEP_SIZE,
                    offset,
                    length,
                )
                syscalls.fallocate(fd, 0, offset, length)
                return
            except OSError as err:
                if err.errno not in syscalls.UNSUPPORTED:
                    raise
                self._has_fallocate = False
        if offset >= size:
            os.ftruncate(fd, offset + length)  # all past EOF: growing the file zeroes it
            return
        raise OSError(errno.ENOTSUP, "cannot zero this range without writing")

    async def pdiscard(self, offset: int, length: int) -> None:
        if self.node.options.discard != "unmap":
            return
        if not self._has_punch:
            raise OSError(errno.ENOTSUP, "discard not supported")
        try:
            await self._run_punching(
                syscalls.fallocate,
                syscalls.FALLOC_FL_PUNCH_HOLE | syscalls.FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            )
        except OSError as err:
            self.discard_nb_failed += 1
            if err.errno not in syscalls.UNSUPPORTED:
                raise
            self._has_punch = False
            raise OSError(errno.ENOTSUP, "discard not supported") from err
        self.discard_nb_ok += 1
        self.discard_bytes_ok += length

    def driver_specific_stats(self) -> dict[str, Any] | None:
        return {
            "driver": "file",
            "discard-nb-ok": self.discard_nb_ok,
            "discard-nb-failed": self.discard_nb_failed,
            "discard-bytes-ok": self.discard_bytes_ok,
        }

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        cache = self._data_cache
        if cache is not None and cache[0] <= offset < cache[1]:
            data, count = True, min(cache[1] - offset, length)
        else:
            gen = self._holes_gen
            # Probe to EOF at least, so that the whole data extent can be cached.
            probe = max(length, self.length - offset)
            data, count = await self._run(syscalls.find_allocation, offset, probe)
            if data and gen == self._holes_gen:
                self._cache_data(offset, offset + count)
            count = min(count, length)
        align = self.request_alignment
        if align > 1 and offset + count < self.length:
            # Keep extents aligned for the I/O path: data grows to the next boundary, a hole
            # shrinks to the previous one (or is reported as data when nothing would remain).
            if data:
                count = min(-(-(offset + count) // align) * align - offset, length)
            else:
                aligned = (offset + count) // align * align - offset
                data, count = (True, min(align, length)) if aligned <= 0 else (False, aligned)
        return BlockStatus(length=count, data=data, zero=not data)

    def block_status_now(self, offset: int, length: int) -> BlockStatus | None:
        """`block_status` inside the cached data extent (no probe), else None."""
        cache = self._data_cache
        if cache is None or not cache[0] <= offset < cache[1]:
            return None
        count = min(cache[1] - offset, length)
        align = self.request_alignment
        if align > 1 and offset + count < self.length:
            count = min(-(-(offset + count) // align) * align - offset, length)
        return BlockStatus(length=count, data=True, zero=False)

    def _cache_data(self, start: int, end: int) -> None:
        """Remember `[start, end)` as data, merged with the cached range when they touch.

        Probes run concurrently (nbdcopy's four connections each ask from where they are);
        replacing the range with the last answer made every client below it miss, and each
        miss rescanned the page cache to EOF (16 ms per GiB on tmpfs): 40 such scans per
        1 GiB nbdcopy were 40% of the daemon's CPU. Two data ranges that overlap or touch
        are one data range (no hole can be inside either).
        """
        cache = self._data_cache
        if cache is not None and start <= cache[1] and cache[0] <= end:
            start, end = min(start, cache[0]), max(end, cache[1])
        self._data_cache = (start, end)

    async def activate(self) -> None:
        """Back from inactive (QEMU 10.0): another process may have grown, shrunk or
        rewritten the file; its length is read again and nothing cached about it is kept."""
        self._may_punch()
        self.length = await self._run(_current_length)

    def _may_punch(self) -> None:
        """A range may become a hole (or the file shorter): forget the cached data extent,
        and the mapping (views already handed out keep theirs until they are dropped)."""
        self._data_cache = None
        self._holes_gen += 1
        self._map = None

    def _run_punching(self, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`_run` for a job that may make holes: the data cache is dropped before it and
        again once the syscall really ended, so no probe overlapping it caches anything."""
        self._may_punch()
        handle = self._live()
        handle.users += 1

        def done() -> None:
            handle.release()
            self._may_punch()

        return pool.submit(asyncio.get_running_loop(), func, handle.fd, *args, on_done=done)

    async def truncate(self, size: int) -> None:
        self.length = await self._run_punching(_truncate_job, size)


def _truncate_job(fd: int, size: int) -> int:
    """ftruncate; a file grown from empty gets its first block written (qsd's
    allocate_first_block). Returns the new length (a tiny file may have grown to 512)."""
    current = os.fstat(fd).st_size
    os.ftruncate(fd, size)
    if current or size <= 0:
        return size
    syscalls.allocate_first_block(fd, size)
    return max(size, os.fstat(fd).st_size)


def _current_length(fd: int) -> int:
    """The file's (or device's) length now (runs on the pool)."""
    return syscalls.device_length(fd, os.fstat(fd))
