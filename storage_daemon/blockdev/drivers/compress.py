"""The `compress` filter: writes become compressed writes on a format child (domain ring).

Only a child driver with `pwritev_compressed` can sit below it; qsd refuses others at open with
its text. Invariant: every data write goes to the child's compressed write path.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev.driver import ChildOpener
from storage_daemon.blockdev.drivers.throttle import FilterDriver
from storage_daemon.errors import QmpError


class CompressDriver(FilterDriver):
    name = "compress"

    async def open(self, options: Any, opener: ChildOpener) -> None:
        file = await self.open_filtered(options.file, opener)
        if getattr(file.node.driver, "pwritev_compressed", None) is None:
            raise QmpError(
                "Compression is not supported for underlying format: "
                f"{file.node.driver.format_name()}"
            )

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        drv: Any = self.child().node.driver
        await drv.pwritev_compressed(offset, data)
