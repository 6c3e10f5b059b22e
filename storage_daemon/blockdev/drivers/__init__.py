"""Driver registry: the `driver` value of BlockdevOptions -> driver class."""

from __future__ import annotations

from storage_daemon.blockdev.driver import BlockDriver
from storage_daemon.blockdev.drivers.blkdebug import BlkdebugDriver
from storage_daemon.blockdev.drivers.compress import CompressDriver
from storage_daemon.blockdev.drivers.copy_on_read import CopyOnReadDriver
from storage_daemon.blockdev.drivers.error import ErrorDriver
from storage_daemon.blockdev.drivers.file import FileDriver
from storage_daemon.blockdev.drivers.null import NullAioDriver, NullDriver
from storage_daemon.blockdev.drivers.preallocate import PreallocateDriver
from storage_daemon.blockdev.drivers.qcow2 import Qcow2Driver
from storage_daemon.blockdev.drivers.raw import RawDriver
from storage_daemon.blockdev.drivers.throttle import ThrottleDriver

DRIVERS: dict[str, type[BlockDriver]] = {
    cls.name: cls
    for cls in (
        FileDriver,
        NullDriver,
        NullAioDriver,
        Qcow2Driver,
        RawDriver,
        BlkdebugDriver,
        CompressDriver,
        CopyOnReadDriver,
        PreallocateDriver,
        ThrottleDriver,
    )
}
DRIVERS[ErrorDriver.name] = ErrorDriver  # our extension (drivers/error.py)
