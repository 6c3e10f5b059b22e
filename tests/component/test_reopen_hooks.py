"""blockdev-reopen through the drivers' reopen hooks, inside one daemon: raw's window moved on
a live node, qcow2's runtime options applied to the live image, and all of it undone when a
later entry of the same reopen fails.

Component ring. What the compat tests cannot see: the data behind a moved window, the sizes
of the live metadata caches, which freed clusters reach the file. Every server and qemu-io
process started here is stopped by the test.
"""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev.drivers.qcow2.alloc import FREE_OTHER, FREE_REQUEST
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.qapi.runtime import command_args

# Build the schema visitor's tables outside the tests' loops (the slow-callback detector).
command_args("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "warm", "file": "f"}]})
command_args("blockdev-add", {"driver": "qcow2", "node-name": "warm", "file": "f"})
importlib.import_module("storage_daemon.blockdev.drivers.qcow2.driver")
Daemon()  # imports every command module


async def _run(*argv: str) -> tuple[int, str]:
    """A tool's status and output, awaited (a blocking run would stall the loop)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _export(daemon: Daemon, scratch: Path, node: str, writable: bool) -> str:
    sock = scratch / "nbd.sock"
    await daemon.run_command(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
    )
    await daemon.run_command(
        "block-export-add", {"type": "nbd", "id": "e0", "node-name": node, "writable": writable}
    )
    return f"nbd+unix:///{node}?socket={sock}"


async def _qemu_io(url: str, command: str) -> str:
    mode = ["-r"] if command.startswith("read") else []
    status, out = await _run("qemu-io", *mode, "-f", "raw", "-c", command, url)
    assert status == 0 and "Pattern verification failed" not in out, out
    return out


async def test_raw_window_moves_and_a_failed_reopen_puts_it_back(
    daemon: Daemon, scratch: Path
) -> None:
    image = scratch / "img.raw"
    image.write_bytes(bytes(4096) + b"\x05" * 4096 + b"\x06" * 8192)
    await daemon.run_command(
        "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(image)}
    )
    raw = {"driver": "raw", "node-name": "r", "file": "f"}
    await daemon.run_command("blockdev-add", {**raw, "size": 4096})
    await daemon.run_command("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    drv: Any = daemon.graph.lookup("r").driver
    await daemon.run_command("blockdev-reopen", {"options": [{**raw, "offset": 4096}]})
    assert (drv.offset, drv.size, drv.getlength()) == (4096, None, 16384 - 4096)
    url = await _export(daemon, scratch, "r", writable=False)
    await _qemu_io(url, "read -P 5 0 4k")
    await _qemu_io(url, "read -P 6 4k 8k")
    await daemon.run_command("block-export-del", {"id": "e0"})
    # The second entry fails after the first was prepared: the window is back.
    bad = {"driver": "null-co", "node-name": "n0", "size": 1}
    with pytest.raises(QmpError, match="Cannot change the option 'size'"):
        await daemon.run_command(
            "blockdev-reopen", {"options": [{**raw, "offset": 8192, "size": 8192}, bad]}
        )
    assert (drv.offset, drv.size) == (4096, None)
    # A permission failure comes after raw's prepare: undone as well.
    await daemon.run_command(
        "block-export-add", {"type": "nbd", "id": "e1", "node-name": "n0", "writable": True}
    )
    ro = {"driver": "null-co", "node-name": "n0", "read-only": True}
    with pytest.raises(QmpError, match="cannot support read-write users"):
        await daemon.run_command(
            "blockdev-reopen", {"options": [{**raw, "offset": 8192, "size": 8192}, ro]}
        )
    assert (drv.offset, drv.size, drv.getlength()) == (4096, None, 12288)


async def test_qcow2_runtime_options_reach_the_live_image(daemon: Daemon, scratch: Path) -> None:
    image = scratch / "w.qcow2"
    status, out = await _run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M")
    assert status == 0, out
    file = {"driver": "file", "node-name": "wf", "filename": str(image)}
    await daemon.run_command("blockdev-add", file)
    qcow2 = {"driver": "qcow2", "node-name": "w", "file": "wf"}
    await daemon.run_command("blockdev-add", qcow2)
    drv: Any = daemon.graph.lookup("w").driver
    meta = drv.meta
    default = drv.cache_config
    assert FREE_REQUEST not in meta.discard_kinds
    url = await _export(daemon, scratch, "w", writable=True)
    await _qemu_io(url, "write -P 7 0 1M")
    options = {
        **qcow2,
        "l2-cache-size": 65536,
        "refcount-cache-size": 262144,
        "l2-cache-entry-size": 1024,
        "pass-discard-request": True,
        "pass-discard-other": True,
        "overlap-check": "none",
    }
    await daemon.run_command("blockdev-reopen", {"options": [options]})
    config = drv.cache_config
    assert config != default
    assert (config.l2_bytes, config.l2_slice_size, config.refcount_bytes) == (65536, 1024, 262144)
    # At least two whole L2 tables (64 KiB clusters: 64 slices each), as the cache keeps.
    assert meta.l2_cache.capacity == max(2 * 64, config.l2_entries) == 128
    assert meta.l2_cache.slice_size == 1024
    assert meta.rb_cache.capacity == 262144 // 65536
    assert {FREE_REQUEST, FREE_OTHER} <= meta.discard_kinds
    assert meta.overlap_checks == frozenset()
    # The data written before is read through the new caches, and new writes land.
    await _qemu_io(url, "read -P 7 0 1M")
    await _qemu_io(url, "write -P 8 1M 1M")
    # Options left out go back to their defaults.
    await daemon.run_command("blockdev-reopen", {"options": [qcow2]})
    assert drv.cache_config == default
    assert FREE_REQUEST not in meta.discard_kinds and FREE_OTHER not in meta.discard_kinds
    assert meta.overlap_checks != frozenset()
    await _qemu_io(url, "read -P 8 1M 1M")
    await daemon.run_command("block-export-del", {"id": "e0"})
    await daemon.run_command("blockdev-del", {"node-name": "w"})
    await daemon.run_command("blockdev-del", {"node-name": "wf"})
    status, out = await _run("qemu-img", "check", str(image))
    assert status == 0, out
