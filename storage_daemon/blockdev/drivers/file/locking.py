"""QEMU's image locking: block permissions mirrored as OFD byte-range locks (edge ring).

Byte 100+i is held (shared lock) while the node uses permission i; byte 200+i while it
refuses to share it. Another opener tests those bytes with F_OFD_GETLK before it takes or
refuses a permission, so qemu-img, qemu-io, QEMU and this daemon see each other. OFD locks
belong to the open file description: two fds of one process conflict like two processes.
Invariant: `held`/`unshared` always equal the bytes this fd really holds.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl

from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm, lock_bit_index, perm_words
from storage_daemon.errors import QmpError

F_OFD_GETLK = 36
F_OFD_SETLK = 37
F_OFD_SETLKW = 38

PERM_LOCK_BASE = 100
SHARED_LOCK_BASE = 200
_BITS = (Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE)


class _Flock(ctypes.Structure):
    """struct flock (64-bit off_t); ctypes lays out the padding as the C compiler does."""

    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    ]


def _fcntl_lock(fd: int, cmd: int, lock_type: int, byte: int) -> int:
    """One OFD lock call on a single byte; returns the l_type the kernel answered."""
    arg = bytes(_Flock(lock_type, 0, byte, 1, 0))  # OFD locks demand l_pid == 0
    while True:
        try:
            out = fcntl.fcntl(fd, cmd, arg)
            break
        except InterruptedError:
            continue
    return int(_Flock.from_buffer_copy(out).l_type)


def ofd_locks_work(fd: int) -> bool:
    """Whether this kernel and filesystem support OFD locks on `fd` (locking=auto)."""
    try:
        _fcntl_lock(fd, F_OFD_GETLK, fcntl.F_WRLCK, PERM_LOCK_BASE)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
    return True


def lock_hint(filename: str) -> str:
    return f"Is another process using the image [{filename}]?"


class ImageLocks:
    """The lock bytes one fd holds, changed only through `apply`."""

    def __init__(self, fd: int, filename: str) -> None:
        self.fd = fd
        self.filename = filename
        self.held = PERM_NONE  # bytes 100+i
        self.unshared = PERM_NONE  # bytes 200+i

    def apply(self, perm: Perm, unshared: Perm, *, unlock: bool) -> None:
        """Lock the bytes for `perm` and `unshared`; with `unlock`, release every other byte.

        Raises QmpError ("Failed to lock byte N") if the kernel refuses; bytes already changed
        stay changed and are recorded, so a later `apply` can undo them.
        """
        for base, want, attr in (
            (PERM_LOCK_BASE, perm, "held"),
            (SHARED_LOCK_BASE, unshared & PERM_ALL, "unshared"),
        ):
            for bit in _BITS:
                have: Perm = getattr(self, attr)
                byte = base + lock_bit_index(bit)
                if want & bit and not have & bit:
                    try:
                        _fcntl_lock(self.fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
                    except OSError as err:
                        raise QmpError(f"Failed to lock byte {byte}") from err
                    setattr(self, attr, have | bit)
                elif unlock and have & bit and not want & bit:
                    try:
                        _fcntl_lock(self.fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)
                    except OSError as err:
                        raise QmpError(f"Failed to unlock byte {byte}") from err
                    setattr(self, attr, have & ~bit)

    def release_all(self) -> None:
        """Drop every byte, ignoring failures (closing the fd would drop them anyway)."""
        try:
            self.apply(PERM_NONE, PERM_NONE, unlock=True)
        except QmpError:
            pass

    def check(self, perm: Perm, shared: Perm) -> None:
        """Refuse, in qsd's words, if another open file description blocks `perm`/`shared`.

        First every permission to take (nobody may refuse to share it: byte 200+i free of
        others' locks), then every permission to refuse (nobody may hold it: byte 100+i),
        each in ascending bit order, as QEMU tests them.
        """
        for bit in _BITS:
            if perm & bit and self._taken(SHARED_LOCK_BASE + lock_bit_index(bit)):
                raise QmpError(
                    f'Failed to get "{perm_words(bit)}" lock', hint=lock_hint(self.filename)
                )
        for bit in _BITS:
            if not shared & bit and self._taken(PERM_LOCK_BASE + lock_bit_index(bit)):
                raise QmpError(
                    f'Failed to get shared "{perm_words(bit)}" lock',
                    hint=lock_hint(self.filename),
                )

    def _taken(self, byte: int) -> bool:
        # F_OFD_GETLK ignores our own description's locks: it answers for everyone else.
        try:
            return _fcntl_lock(self.fd, F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK
        except OSError:
            return True  # QEMU treats a failed test as a conflict too
