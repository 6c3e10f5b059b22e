"""reopen.set_read_only (qsd's bdrv_reopen_set_read_only) on live nodes: a qcow2 node and its
inline file node turn writable and back, the fd following; a protocol node added on its own
stays as it is; a writer above refuses the way back, and everything stays as it was.

Component ring: one daemon in the test's loop, images made with qemu-img (awaited).
"""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path

import pytest

from storage_daemon.blockdev import chain
from storage_daemon.blockdev.backend import UnnamedBackend
from storage_daemon.blockdev.child import ChildRole
from storage_daemon.blockdev.drivers.file.posix import FileDriver
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.blockdev.reopen import set_read_only
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.qapi.runtime import command_args

# Build the schema visitor's tables outside the tests' loops (the slow-callback detector).
command_args("blockdev-add", {"driver": "qcow2", "node-name": "warm", "file": "f"})
importlib.import_module("storage_daemon.blockdev.drivers.qcow2.driver")
Daemon()  # imports every command module


async def _image(path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-f", "qcow2", str(path), "1M", stdout=asyncio.subprocess.DEVNULL
    )
    assert await proc.wait() == 0


def _node(daemon: Daemon, name: str) -> BlockNode:
    node = daemon.graph.find(name)
    assert node is not None
    return node


def _file(node: BlockNode) -> FileDriver:
    edge = node.child("file")
    assert edge is not None and isinstance(edge.node.driver, FileDriver)
    return edge.node.driver


async def test_inline_file_follows_and_the_fd_with_a_writer(daemon: Daemon, scratch: Path) -> None:
    await _image(scratch / "a.qcow2")
    file = {"driver": "file", "filename": str(scratch / "a.qcow2")}
    await daemon.run_command(
        "blockdev-add", {"driver": "qcow2", "node-name": "a", "read-only": True, "file": file}
    )
    node = _node(daemon, "a")
    drv = _file(node)
    await set_read_only(daemon.graph, node, False)
    assert not node.read_only and not drv.node.read_only
    assert drv.writable  # a writable qcow2 takes WRITE on its file: the fd is read-write
    grant = chain.WritableGrant(daemon.graph, node)
    await grant.grant()
    assert not grant.granted  # already writable: nothing to undo
    await chain.make_read_only(daemon.graph, node)
    assert node.read_only and drv.node.read_only and not drv.writable


async def test_a_file_node_of_its_own_is_not_taken_along(daemon: Daemon, scratch: Path) -> None:
    await _image(scratch / "b.qcow2")
    await daemon.run_command(
        "blockdev-add",
        {"driver": "file", "node-name": "bf", "filename": str(scratch / "b.qcow2"),
         "read-only": True},
    )  # fmt: skip
    await daemon.run_command(
        "blockdev-add", {"driver": "qcow2", "node-name": "b", "read-only": True, "file": "bf"}
    )
    node = _node(daemon, "b")
    grant = chain.WritableGrant(daemon.graph, node)
    with pytest.raises(QmpError, match="Block node is read-only"):
        await grant.grant()
    assert node.read_only and _node(daemon, "bf").read_only and not grant.granted
    await grant.restore()  # nothing granted: nothing done
    assert node.read_only


async def test_a_writer_refuses_read_only_and_nothing_changes(
    daemon: Daemon, scratch: Path
) -> None:
    await _image(scratch / "c.qcow2")
    file = {"driver": "file", "filename": str(scratch / "c.qcow2")}
    await daemon.run_command("blockdev-add", {"driver": "qcow2", "node-name": "c", "file": file})
    node = _node(daemon, "c")
    drv = _file(node)
    writer = daemon.graph.attach(UnnamedBackend(), node, "root", ChildRole(0), Perm.WRITE, PERM_ALL)
    try:
        with pytest.raises(QmpError, match="cannot support read-write users"):
            await chain.make_read_only(daemon.graph, node)
        assert not node.read_only and not drv.node.read_only and drv.writable
    finally:
        daemon.graph.detach(writer)
