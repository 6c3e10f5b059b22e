"""Write thresholds, iothread bindings and blockdev-reopen inside one daemon, driven through
the QMP handlers, with qemu-io writing through an NBD export.

Component ring. What the compat tests cannot see: which nodes a write reaches (host offsets
below a format), the awaited and the immediate write paths, what a failed reopen leaves behind
(permissions, the file's lock bytes, fds), data written after a reopen to read-write, and
frozen links. Every server and qemu-io process started here is stopped by the test.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import iothread_binding, write_threshold
from storage_daemon.blockdev.perm import Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.qapi.runtime import command_args

# Build the schema visitor's tables outside the tests' loops (the slow-callback detector).
command_args("blockdev-reopen", {"options": [{"driver": "null-co", "node-name": "warm"}]})
command_args("blockdev-add", {"driver": "qcow2", "node-name": "warm", "file": "f"})
importlib.import_module("storage_daemon.blockdev.drivers.qcow2.driver")
Daemon()  # imports every command module


@pytest.fixture
async def daemon(scratch: Path) -> AsyncIterator[Daemon]:
    d = Daemon()
    events: list[tuple[str, Any]] = []
    d.events.subscribe(lambda name, data, ts: events.append((name, data)))
    d.test_events = events  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        await d.shutdown()


def _events(daemon: Daemon, name: str = write_threshold.EVENT) -> list[Any]:
    return [data for event, data in daemon.test_events if event == name]  # type: ignore[attr-defined]


async def _qemu_io(url: str, *commands: str) -> str:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    status, out = await _run(*argv, url)
    assert status == 0, out
    return out


async def _export(daemon: Daemon, scratch: Path, node: str) -> str:
    sock = scratch / "nbd.sock"
    await daemon.run_command(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
    )
    await daemon.run_command(
        "block-export-add", {"type": "nbd", "id": "e0", "node-name": node, "writable": True}
    )
    return f"nbd+unix:///{node}?socket={sock}"


async def _thresholds(daemon: Daemon) -> dict[str, int]:
    nodes = await daemon.run_command("query-named-block-nodes", {})
    return {n["node-name"]: n["write_threshold"] for n in nodes}


async def _run(*argv: str) -> tuple[int, str]:
    """A tool's status and output, awaited (a blocking run would stall the loop)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _qcow2(path: Path, size: str = "4M", *extra: str) -> Path:
    status, out = await _run("qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size)
    assert status == 0, out
    return path


# --- block-set-write-threshold -------------------------------------------------------------


async def test_threshold_fires_once_for_writes_through_an_export(
    daemon: Daemon, scratch: Path
) -> None:
    image = scratch / "r.raw"
    image.write_bytes(bytes(1 << 20))
    await daemon.run_command(
        "blockdev-add",
        {"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": str(image),
                                                      "node-name": "f0"}},
    )  # fmt: skip
    url = await _export(daemon, scratch, "r0")
    for node in ("r0", "f0"):
        await daemon.run_command(
            "block-set-write-threshold", {"node-name": node, "write-threshold": 1000}
        )
    assert await _thresholds(daemon) == {"r0": 1000, "f0": 1000}
    await _qemu_io(url, "write 0 1000", "write -z 0 1000")  # up to the threshold: nothing
    assert _events(daemon) == []
    await _qemu_io(url, "write 2000 10", "write 3000 10")
    expected = {"amount-exceeded": 1010, "write-threshold": 1000}
    assert _events(daemon) == [{"node-name": "r0", **expected}, {"node-name": "f0", **expected}]
    assert await _thresholds(daemon) == {"r0": 0, "f0": 0}
    # discard=ignore (the default): a discard never reaches the driver, and does not count.
    await daemon.run_command(
        "block-set-write-threshold", {"node-name": "r0", "write-threshold": 100}
    )
    await _qemu_io(url, "discard 0 4096")
    assert len(_events(daemon)) == 2
    await _qemu_io(url, "write -z 4096 4096")
    assert _events(daemon)[2] == {
        "node-name": "r0",
        "amount-exceeded": 8092,
        "write-threshold": 100,
    }
    assert write_threshold.ARMED is False


async def test_threshold_below_a_format_sees_host_offsets(daemon: Daemon, scratch: Path) -> None:
    image = await _qcow2(scratch / "q.qcow2")
    await daemon.run_command(
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(image),
                                                       "node-name": "qf"}},
    )  # fmt: skip
    url = await _export(daemon, scratch, "q")
    length = image.stat().st_size
    await daemon.run_command(
        "block-set-write-threshold", {"node-name": "qf", "write-threshold": length}
    )
    await _qemu_io(url, "write 0 512")  # a new cluster: data and an L2 table past the end
    (event,) = _events(daemon)
    assert event["node-name"] == "qf" and event["write-threshold"] == length
    assert event["amount-exceeded"] > 0


async def test_threshold_wraps_like_a_uint64_and_is_not_kept_for_deleted_nodes(
    daemon: Daemon,
) -> None:
    await daemon.run_command("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    for value, shown in [(-5, -5), (1 << 63, -(1 << 63)), ((1 << 64) - 1, -1), (7, 7)]:
        await daemon.run_command(
            "block-set-write-threshold", {"node-name": "n0", "write-threshold": value}
        )
        assert (await _thresholds(daemon))["n0"] == shown
    node = daemon.graph.find("n0")
    assert node is not None
    write_threshold.check(node, 1 << 62)  # the hook io.py calls
    assert _events(daemon) == [
        {"node-name": "n0", "amount-exceeded": (1 << 62) - 7, "write-threshold": 7}
    ]
    with pytest.raises(QmpError, match="Device 'gone' not found"):
        await daemon.run_command(
            "block-set-write-threshold", {"node-name": "gone", "write-threshold": 1}
        )


# --- x-blockdev-set-iothread ---------------------------------------------------------------


async def test_iothread_binding_covers_the_connected_nodes(daemon: Daemon, scratch: Path) -> None:
    await daemon.run_command("object-add", {"qom-type": "iothread", "id": "io0"})
    await daemon.run_command("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    await daemon.run_command("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "n0"})
    await daemon.run_command("blockdev-add", {"driver": "null-co", "node-name": "lone"})
    await daemon.run_command("x-blockdev-set-iothread", {"node-name": "n0", "iothread": "io0"})
    graph = daemon.graph
    bound = {
        name: iothread_binding.iothread_of(graph.lookup(name)) for name in ("n0", "r0", "lone")
    }
    assert bound == {"n0": "io0", "r0": "io0", "lone": None}
    await _export(daemon, scratch, "r0")
    with pytest.raises(QmpError, match="Node r0 is associated with a BlockBackend"):
        await daemon.run_command("x-blockdev-set-iothread", {"node-name": "r0", "iothread": None})
    await daemon.run_command(
        "x-blockdev-set-iothread", {"node-name": "r0", "iothread": None, "force": True}
    )
    assert iothread_binding.iothread_of(graph.lookup("n0")) is None


# --- blockdev-reopen -----------------------------------------------------------------------


async def test_reopen_read_write_then_write_through_an_export(
    daemon: Daemon, scratch: Path
) -> None:
    image = await _qcow2(scratch / "w.qcow2", "1M")
    file = {"driver": "file", "node-name": "wf", "filename": str(image)}
    await daemon.run_command("blockdev-add", {**file, "read-only": True})
    qcow2 = {"driver": "qcow2", "node-name": "w", "file": "wf"}
    await daemon.run_command("blockdev-add", {**qcow2, "read-only": True})
    drv: Any = daemon.graph.lookup("wf").driver
    assert not drv.writable
    await daemon.run_command("blockdev-reopen", {"options": [file, qcow2]})
    url = await _export(daemon, scratch, "w")
    assert drv.writable  # the export's write permission reopened the fd read-write
    await _qemu_io(url, "write -P 0x5a 0 64k")
    with pytest.raises(QmpError, match="Read-only block node 'w' cannot support read-write"):
        await daemon.run_command("blockdev-reopen", {"options": [{**qcow2, "read-only": True}]})
    await daemon.run_command("block-export-del", {"id": "e0"})
    await daemon.run_command(
        "blockdev-reopen", {"options": [{**file, "read-only": True}, {**qcow2, "read-only": True}]}
    )
    assert not drv.writable
    # Read-only now: the data went out and other processes may read the image.
    status, out = await _run("qemu-img", "check", str(image))
    assert status == 0, out
    status, out = await _run("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5a 0 64k", str(image))
    assert "read 65536/65536" in out, out


async def test_failed_reopen_leaves_every_node_as_it_was(daemon: Daemon, scratch: Path) -> None:
    image = await _qcow2(scratch / "w.qcow2", "1M")
    file = {"driver": "file", "node-name": "wf", "filename": str(image)}
    await daemon.run_command("blockdev-add", file)
    qcow2 = {"driver": "qcow2", "node-name": "w", "file": "wf"}
    await daemon.run_command("blockdev-add", qcow2)
    await daemon.run_command("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    await _export(daemon, scratch, "n0")
    graph = daemon.graph
    before = {n.name: (n.perm, n.shared, n.options.read_only) for n in graph}
    drv: Any = graph.lookup("wf").driver
    fd = drv.fd
    # Both format and file become read-only, then the exported null node fails the update.
    options = [{**file, "read-only": True}, {**qcow2, "read-only": True},
               {"driver": "null-co", "node-name": "n0", "read-only": True}]  # fmt: skip
    with pytest.raises(QmpError, match="Read-only block node 'n0' cannot support read-write"):
        await daemon.run_command("blockdev-reopen", {"options": options})
    assert {n.name: (n.perm, n.shared, n.options.read_only) for n in graph} == before
    assert drv.writable and graph.lookup("wf").perm & Perm.WRITE
    assert drv.fd == fd and drv._dynamic_ro is False  # the same read-write fd, as opened
    # And the nodes still write.
    await daemon.run_command("block-export-del", {"id": "e0"})
    await daemon.run_command(
        "block-export-add", {"type": "nbd", "id": "e1", "node-name": "w", "writable": True}
    )
    await _qemu_io(f"nbd+unix:///w?socket={scratch / 'nbd.sock'}", "write -P 1 0 4k")


async def test_reopen_respects_frozen_backing_links(daemon: Daemon, scratch: Path) -> None:
    base = await _qcow2(scratch / "base.qcow2")
    top = await _qcow2(scratch / "top.qcow2", "4M", "-b", str(base), "-F", "qcow2")
    await daemon.run_command(
        "blockdev-add", {"driver": "file", "node-name": "tf", "filename": str(top)}
    )
    await daemon.run_command("blockdev-add", {"driver": "qcow2", "node-name": "t", "file": "tf"})
    graph = daemon.graph
    node = graph.lookup("t")
    backing = node.child("backing")
    assert backing is not None and backing.node.implicit
    implicit = {backing.node.name, backing.node.children[0].node.name}
    frozen = graph.freeze_chain(node, None)
    reopen = {"options": [{"driver": "qcow2", "node-name": "t", "file": "tf", "backing": None}]}
    with pytest.raises(QmpError, match=f"Cannot change frozen 'backing' link from 't' to "
                                       f"'{backing.node.name}'"):  # fmt: skip
        await daemon.run_command("blockdev-reopen", reopen)
    assert node.child("backing") is backing
    graph.unfreeze(frozen)
    await daemon.run_command("blockdev-reopen", reopen)
    assert node.child("backing") is None
    assert implicit.isdisjoint(n.name for n in graph)  # closed with their link
    info = {n["node-name"]: n for n in await daemon.run_command("query-named-block-nodes", {})}
    assert '"backing": null' in info["t"]["file"]
