"""An internal snapshot waits for the guest writes already in flight outside the qcow2
metadata lock (Writer.write_in_place): a cluster must not become shared while a write still
changes it, or a later copy-on-write of that cluster would miss the rest of the write.

Component ring: an in-process daemon over an image made by qemu-img; the write in flight is
stood in for by its entry in `Metadata.inflight`, which is what the snapshot looks at.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev.drivers import preload
from storage_daemon.daemon import Daemon
from storage_daemon.monitor.dispatch import load_handlers

load_handlers()
preload()


@pytest.fixture
async def daemon(scratch: Path) -> AsyncIterator[Daemon]:
    image = scratch / "a.qcow2"
    await asyncio.to_thread(
        subprocess.run, ["qemu-img", "create", "-f", "qcow2", str(image), "1M"], check=True
    )
    d = Daemon()
    await d.run_command(
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(image)}},
    )
    try:
        yield d
    finally:
        await d.shutdown()


async def test_the_snapshot_waits_for_writes_in_flight(daemon: Daemon) -> None:
    driver: Any = daemon.graph.lookup("q").driver
    meta = driver.meta
    meta.inflight[5] = 1  # a guest write in flight on host cluster 5
    task = asyncio.create_task(
        daemon.run_command("blockdev-snapshot-internal-sync", {"device": "q", "name": "s"})
    )
    # Long enough for the snapshot to be made (well under 2 s here) if it did not wait.
    await asyncio.wait({task}, timeout=2)
    assert not task.done()
    assert not driver.snapshots
    del meta.inflight[5]
    meta.inflight_done()
    async with asyncio.timeout(10):  # a bound, not a synchronisation
        await task
    assert [s.name for s in driver.snapshots] == ["s"]
