"""Driver registry: the `driver` value of BlockdevOptions -> driver class.

Drivers are imported on first use (the qcow2 package alone costs tens of milliseconds), so
short-lived invocations (`--help`, command-line errors) stay quick; a serving daemon preloads
them all before it reports ready.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from storage_daemon.blockdev.driver import BlockDriver

# driver name -> (module, class name)
_LOCATIONS: dict[str, tuple[str, str]] = {
    "file": ("file", "FileDriver"),
    "null-co": ("null", "NullDriver"),
    "null-aio": ("null", "NullAioDriver"),
    "qcow2": ("qcow2", "Qcow2Driver"),
    "raw": ("raw", "RawDriver"),
    "snapshot-access": ("snapshot_access", "SnapshotAccessDriver"),
    "blkdebug": ("blkdebug", "BlkdebugDriver"),
    "compress": ("compress", "CompressDriver"),
    "copy-before-write": ("copy_before_write", "CopyBeforeWriteDriver"),
    "copy-on-read": ("copy_on_read", "CopyOnReadDriver"),
    "preallocate": ("preallocate", "PreallocateDriver"),
    "throttle": ("throttle", "ThrottleDriver"),
    "error": ("error", "ErrorDriver"),  # our extension (drivers/error.py)
}


class _Registry(Mapping[str, type[BlockDriver]]):
    """A read-only mapping that imports a driver's module when it is first asked for."""

    def __init__(self) -> None:
        self._loaded: dict[str, type[BlockDriver]] = {}

    def __getitem__(self, name: str) -> type[BlockDriver]:
        cls = self._loaded.get(name)
        if cls is None:
            module_name, class_name = _LOCATIONS[name]
            module = importlib.import_module(f"{__name__}.{module_name}")
            cls = self._loaded[name] = getattr(module, class_name)
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(_LOCATIONS)

    def __len__(self) -> int:
        return len(_LOCATIONS)


DRIVERS: Mapping[str, type[BlockDriver]] = _Registry()


def preload() -> None:
    """Import every driver now: the daemon does this (in a worker thread) before it reports
    ready, so no later blockdev-add stalls the event loop with an import."""
    for name in _LOCATIONS:
        DRIVERS[name]
