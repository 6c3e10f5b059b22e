"""The `file` protocol driver package (edge ring): `posix.py` the driver, `locking.py` QEMU's
OFD lock bytes, `syscalls.py` the blocking calls, `pool.py` the threads that run them,
`copier.py` the writer thread of an open file (large tmpfs writes, buffered ones elsewhere).

Invariant: nothing in this package blocks the event loop except non-waiting lock calls and
small I/O that cannot wait for a device (tmpfs pages, RWF_NOWAIT page-cache reads).
"""

from __future__ import annotations

from storage_daemon.blockdev.drivers.file.posix import FileDriver

__all__ = ["FileDriver"]
