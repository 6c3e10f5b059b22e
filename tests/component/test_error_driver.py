"""The `error` driver and the corruption swap: a fenced qcow2 node's users get an EIO node."""

from __future__ import annotations

import asyncio
import errno
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError


class User:
    def parent_description(self, child: BdrvChild) -> str:
        return "a test user"


def _run(*args: str) -> tuple[int, str]:
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    return proc.returncode, proc.stdout.decode()


def _hostile_image(path: Path) -> Path:
    """A qcow2 image whose guest cluster 0 maps onto its own refcount table (COPIED flag set,
    so a write goes in place and the overlap check catches it)."""
    assert _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M")[0] == 0
    assert _run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(path))[0] == 0
    data = bytearray(path.read_bytes())
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    reftable = struct.unpack_from(">Q", data, 48)[0]
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", data, l2_offset, reftable | (1 << 63))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module", autouse=True)
def _warm_models(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the lazily generated schema models outside the tests' event loops."""
    img = _hostile_image(tmp_path_factory.mktemp("warm") / "w.qcow2")

    async def warm() -> None:
        daemon = Daemon()
        await daemon.run_command("blockdev-add", {"driver": "error", "node-name": "e", "size": 512})
        file = {"driver": "file", "filename": str(img)}
        await daemon.run_command(
            "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": file}
        )
        edge = daemon.graph.attach(
            User(), daemon.graph.lookup("q"), "root", ChildRole.PRIMARY, Perm.WRITE, PERM_ALL
        )
        with pytest.raises(OSError):
            await io.pwrite(edge, 0, b"x" * 512)
        await daemon.run_command("query-named-block-nodes", {})
        await daemon.run_command("query-block-exports", {})
        await daemon.run_command("x-query-block-node", {"node-name": "q"})
        daemon.graph.detach(edge)
        await daemon.run_command("blockdev-del", {"node-name": "q"})
        await daemon.run_command("blockdev-del", {"node-name": "e"})
        await daemon.shutdown()

    asyncio.run(warm())


async def test_error_node_fails_every_request_with_its_errno() -> None:
    daemon = Daemon()
    await daemon.run_command(
        "blockdev-add", {"driver": "error", "node-name": "e", "size": 1 << 20, "errno": "enospc"}
    )
    node = daemon.graph.lookup("e")
    edge = daemon.graph.attach(User(), node, "root", ChildRole.PRIMARY, Perm.WRITE, PERM_ALL)
    assert io.length(edge) == 1 << 20
    requests: list[Any] = [
        io.pread(edge, 0, 512),
        io.pwrite(edge, 0, b"a" * 512),
        io.pwrite_zeroes(edge, 0, 512),
        io.flush(edge),
    ]
    for request in requests:
        with pytest.raises(OSError) as info:
            await request
        assert info.value.errno == errno.ENOSPC
    (entry,) = await daemon.run_command("query-named-block-nodes", {})
    assert entry["drv"] == "error" and entry["image"]["virtual-size"] == 1 << 20
    with pytest.raises(QmpError) as qerr:
        await daemon.run_command("blockdev-add", {"driver": "error", "node-name": "x", "size": -1})
    assert "size" in qerr.value.desc
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": "e"})


async def test_corrupt_qcow2_is_swapped_for_an_error_node_under_an_nbd_export(
    scratch: Path,
) -> None:
    img = await asyncio.to_thread(_hostile_image, scratch / "bad.qcow2")
    sock = scratch / "nbd.sock"
    daemon = Daemon()
    events: list[tuple[str, Any]] = []
    daemon.events.subscribe(lambda name, data, ts: events.append((name, data)))
    run = daemon.run_command
    try:
        await run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        file = {"driver": "file", "filename": str(img)}
        await run("blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": file})
        await run(
            "block-export-add", {"type": "nbd", "id": "x", "node-name": "disk", "writable": True}
        )
        url = f"nbd+unix:///disk?socket={sock}"
        rc, out = await asyncio.to_thread(
            _run, "qemu-io", "-f", "raw", "-c", "write -P 2 0 4k", "-c", "read 64k 4k", url
        )
        assert rc == 1
        assert "write failed: Input/output error" in out
        # After the swap the export reads through the error node: clean EIO, no hang.
        assert "read failed: Input/output error" in out
        names = [name for name, _ in events]
        assert names[:2] == ["BLOCK_IMAGE_CORRUPTED", "BLOCK_NODE_REPLACED"]
        assert events[0][1]["fatal"] is True and events[0][1]["node-name"] == "disk"
        assert events[1][1] == {
            "node-name": "disk",
            "new-node-name": "disk-error",
            "reason": "corrupt",
        }
        nodes = {n["node-name"]: n for n in await run("query-named-block-nodes", {})}
        assert nodes["disk-error"]["drv"] == "error"
        assert nodes["disk-error"]["image"]["virtual-size"] == 1 << 20
        assert nodes["disk"]["image"]["format-specific"]["data"]["corrupt"] is True
        (export,) = await run("query-block-exports", {})
        assert export["node-name"] == "disk-error"
        fenced = await run("x-query-block-node", {"node-name": "disk"})
        assert fenced["parents"] == []
        # The fenced node and its replacement both go away with blockdev-del.
        await run("block-export-del", {"id": "x", "mode": "hard"})
        await run("blockdev-del", {"node-name": "disk"})
        await run("blockdev-del", {"node-name": "disk-error"})
        assert await run("query-named-block-nodes", {}) == []
    finally:
        await daemon.shutdown()
    assert struct.unpack_from(">Q", img.read_bytes(), 72)[0] & 2  # corrupt bit on disk
