"""The `file` protocol driver package (edge ring): `posix.py` the driver, `locking.py` QEMU's
OFD lock bytes, `syscalls.py` the blocking calls the driver runs on the thread pool.

Invariant: nothing in this package blocks the event loop except non-waiting lock calls.
"""

from __future__ import annotations

from storage_daemon.blockdev.drivers.file.posix import FileDriver

__all__ = ["FileDriver"]
