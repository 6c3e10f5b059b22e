"""The --pidfile: locked before anything else is created, written once the daemon is ready.

Edge ring. Locking first means a second daemon on the same pidfile fails before it creates a
single socket, so it leaves nothing behind (qsd leaves its monitor socket). The file is
unlinked at exit while the lock is still held.
"""

from __future__ import annotations

import fcntl
import os

from storage_daemon.errors import QmpError


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def lock(self) -> None:
        """Create and lock the file; qsd's messages on failure."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise QmpError(
                f"cannot create PID file: Could not create '{self.path}': "
                f"{os.strerror(err.errno or 0)}"
            ) from err
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            raise QmpError(
                f"cannot create PID file: Cannot lock pid file: {os.strerror(err.errno or 0)}"
            ) from err
        self._fd = fd

    def write(self, pid: int) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode(), 0)

    def remove(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
