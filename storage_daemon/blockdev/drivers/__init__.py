"""Driver registry: the `driver` value of BlockdevOptions -> driver class."""

from __future__ import annotations

from storage_daemon.blockdev.driver import BlockDriver
from storage_daemon.blockdev.drivers.file import FileDriver
from storage_daemon.blockdev.drivers.null import NullAioDriver, NullDriver
from storage_daemon.blockdev.drivers.qcow2 import Qcow2Driver
from storage_daemon.blockdev.drivers.raw import RawDriver

DRIVERS: dict[str, type[BlockDriver]] = {
    cls.name: cls for cls in (FileDriver, NullDriver, NullAioDriver, Qcow2Driver, RawDriver)
}
