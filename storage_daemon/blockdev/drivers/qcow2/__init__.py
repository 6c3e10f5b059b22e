"""The `qcow2` format driver package (domain ring; `format.py` and `cache.py` are pure).

`format.py` on-disk codecs and QEMU's open-time checks, `cache.py` the table cache,
`alloc.py` metadata state, refcounts and crash-safe write-back, `mapping.py` guest->host
lookups and reads, `writer.py` writes/zeroes/discards, `inflight.py` allocations whose data
is written outside the metadata lock, `check.py` dirty-image repair, `driver.py` the
BlockDriver, `layout.py`/`create.py` blockdev-create. Invariant: the file is only touched
through `io.*`.
"""

from __future__ import annotations

from storage_daemon.blockdev.drivers.qcow2 import create  # registers blockdev-create
from storage_daemon.blockdev.drivers.qcow2.driver import Qcow2Driver, set_event_sink

__all__ = ["Qcow2Driver", "create", "set_event_sink"]
