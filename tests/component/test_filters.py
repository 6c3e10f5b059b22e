"""Filter drivers in process: throttle, blkdebug, copy-on-read, compress, preallocate."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import storage_daemon.monitor.commands  # noqa: F401  (handlers imported before any loop runs)
from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.clock import FakeClock
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.qom.throttle_group import ThrottleGroup


class User:
    """A non-node parent, as an export attaches."""

    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


async def run(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> Any:
    return await daemon.run_command(name, args)


async def error(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> str:
    with pytest.raises(QmpError) as info:
        await daemon.run_command(name, args)
    return info.value.desc


def attach(
    daemon: Daemon,
    name: str,
    perm: Perm = Perm.CONSISTENT_READ | Perm.WRITE,
    shared: Perm = PERM_ALL,
) -> BdrvChild:
    node = daemon.graph.lookup(name)
    return daemon.graph.attach(User(), node, "root", ChildRole.PRIMARY, perm, shared)


async def node_info(daemon: Daemon, name: str) -> dict[str, Any]:
    nodes = await run(daemon, "query-named-block-nodes", {"flat": True})
    return next(n for n in nodes if n["node-name"] == name)


# --- throttle -----------------------------------------------------------------------------


async def test_throttle_group_reference_and_in_use() -> None:
    daemon = Daemon()
    add = {"driver": "throttle", "node-name": "th", "file": {"driver": "null-co"}}
    assert await error(daemon, "blockdev-add", {**add, "throttle-group": "nosuch"}) == (
        "Throttle group 'nosuch' does not exist"
    )
    await run(daemon, "object-add", {"qom-type": "iothread", "id": "io0"})
    assert await error(daemon, "blockdev-add", {**add, "throttle-group": "io0"}) == (
        "Throttle group 'io0' does not exist"
    )
    await run(daemon, "object-add", {"qom-type": "throttle-group", "id": "tg0"})
    await run(daemon, "blockdev-add", {**add, "throttle-group": "tg0"})
    assert await error(daemon, "object-del", {"id": "tg0"}) == (
        "object 'tg0' is in use, can not be deleted"
    )
    info = await node_info(daemon, "th")
    assert info["file"] == (
        'json:{"throttle-group": "tg0", "driver": "throttle", "file": {"driver": "null-co"}}'
    )
    assert info["image"]["format"] == "throttle"
    await run(daemon, "blockdev-del", {"node-name": "th"})
    await run(daemon, "object-del", {"id": "tg0"})


async def throttled_reads(limits: dict[str, int]) -> tuple[Daemon, FakeClock, BdrvChild]:
    """A throttle node over null-co in group tg0 with `limits`, on a fake clock that only
    the test advances (so a queued request goes only when the test fires its timer)."""
    clock = FakeClock()
    daemon = Daemon(clock)
    await run(daemon, "object-add", {"qom-type": "throttle-group", "id": "tg0", "limits": limits})
    await run(
        daemon,
        "blockdev-add",
        {
            "driver": "throttle",
            "node-name": "th",
            "throttle-group": "tg0",
            "file": {"driver": "null-co", "read-zeroes": True},
        },
    )
    return daemon, clock, attach(daemon, "th")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def fire(group: ThrottleGroup, is_write: bool) -> None:
    """What the loop does at the armed timer's deadline (its real delay is minutes away)."""
    timer = group._timers[is_write]
    assert timer is not None
    timer.cancel()
    group._fire(is_write)


def set_limits(limits: dict[str, int]) -> dict[str, Any]:
    return {"path": "/objects/tg0", "property": "limits", "value": limits}


async def test_throttle_waits_without_blocking_and_qom_set_keeps_the_timer() -> None:
    # 1 kB/s: after 200 kB, the next read waits ~200 s.
    daemon, clock, edge = await throttled_reads({"bps-read": 1000})
    group = daemon.objects.throttle_group("tg0")
    start = clock.monotonic_ns()
    await io.pread(edge, 0, 200_000)
    await io.pwrite(edge, 0, bytes(100_000))  # writes are not limited by a read limit
    queued = asyncio.ensure_future(io.pread(edge, 0, 1000))
    await settle()  # the loop keeps running while the read waits
    assert not queued.done()
    deadline = group.deadline_ns(False)
    assert deadline == start + 199_900_000_000
    # As in qsd, lifting the limit leaves the armed timer (and its deadline) alone, and a
    # read arriving meanwhile queues behind it although nothing limits it any more.
    await run(daemon, "qom-set", set_limits({"bps-read": 0}))
    later = asyncio.ensure_future(io.pread(edge, 0, 1000))
    await settle()
    assert not queued.done() and not later.done()
    assert group.deadline_ns(False) == deadline
    assert group.deadline_ns(True) is None
    clock.advance(199_900_000_000)
    fire(group, False)
    await settle()
    assert len(queued.result()) == 1000 and len(later.result()) == 1000
    assert group.deadline_ns(False) is None and not group._queues[False]
    # Nothing armed, no limit: the next read goes at once.
    assert len(await asyncio.wait_for(io.pread(edge, 0, 1_000_000), 5)) == 1_000_000
    daemon.graph.detach(edge)
    await run(daemon, "blockdev-del", {"node-name": "th"})
    await run(daemon, "object-del", {"id": "tg0"})


async def test_lowered_limits_time_the_requests_behind_the_armed_timer() -> None:
    daemon, clock, edge = await throttled_reads({"bps-read": 1000})
    group = daemon.objects.throttle_group("tg0")
    start = clock.monotonic_ns()
    await io.pread(edge, 0, 20_000)  # the next read waits 19.9 s
    head = asyncio.ensure_future(io.pread(edge, 0, 10_000))
    second = asyncio.ensure_future(io.pread(edge, 0, 10_000))
    await settle()
    assert group.deadline_ns(False) == start + 19_900_000_000
    # Ten times lower; the buckets restart empty, the timer keeps its deadline.
    await run(daemon, "qom-set", set_limits({"bps-read": 100}))
    assert group.deadline_ns(False) == start + 19_900_000_000
    clock.advance(19_900_000_000)
    fire(group, False)
    await settle()
    assert head.done() and not second.done()
    # qsd charges the released read before the buckets leak the 19.9 s since the change:
    # 10000 - 1990 bytes left, less the 10-byte allowance, at 100 B/s: 80 s.
    deadline = group.deadline_ns(False)
    assert deadline is not None
    assert abs(deadline - (clock.monotonic_ns() + 80_000_000_000)) < 1_000_000
    clock.advance(deadline - clock.monotonic_ns())
    fire(group, False)
    await settle()
    assert second.done() and group.deadline_ns(False) is None
    daemon.graph.detach(edge)
    await run(daemon, "blockdev-del", {"node-name": "th"})
    await run(daemon, "object-del", {"id": "tg0"})


async def test_throttle_wait_is_cancellable() -> None:
    daemon = Daemon()
    await run(
        daemon,
        "object-add",
        {"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 1}},
    )
    await run(
        daemon,
        "blockdev-add",
        {
            "driver": "throttle",
            "node-name": "th",
            "throttle-group": "tg0",
            "file": {"driver": "null-co"},
        },
    )
    edge = attach(daemon, "th")
    await io.pread(edge, 0, 512)
    waiting = asyncio.ensure_future(io.pread(edge, 0, 512))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    group = daemon.objects.throttle_group("tg0")
    assert not group._queues[False]
    daemon.graph.detach(edge)
    await run(daemon, "blockdev-del", {"node-name": "th"})
    await run(daemon, "object-del", {"id": "tg0"})


# --- copy-on-read --------------------------------------------------------------------------


async def qemu_img(*args: str) -> str:
    # In a thread: a test must not block its event loop either.
    done = await asyncio.to_thread(
        subprocess.run, ["qemu-img", *args], check=True, capture_output=True, text=True
    )
    return done.stdout


async def test_copy_on_read_copies_backing_data_into_top(scratch: Path) -> None:
    base, top = scratch / "base.raw", scratch / "top.qcow2"
    base.write_bytes(b"B" * 65536 + bytes(65536 * 3))
    await qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    daemon = Daemon()
    await run(
        daemon,
        "blockdev-add",
        {
            "driver": "copy-on-read",
            "node-name": "cor",
            "file": {
                "driver": "qcow2",
                "node-name": "top",
                "file": {"driver": "file", "filename": str(top)},
            },
        },
    )
    graph = await run(daemon, "x-debug-query-block-graph")
    cor_edge = next(
        e for e in graph["edges"] if e["name"] == "file" and graph["nodes"][0]["id"] == e["parent"]
    )
    assert cor_edge["perm"] == ["write-unchanged"]
    edge = attach(daemon, "cor", Perm.CONSISTENT_READ)
    top_edge = daemon.graph.lookup("top").parents[-1]
    assert (await io.allocation_depth(top_edge, 0, 65536))[1] == 2
    assert bytes(await io.pread(edge, 0, 4096)) == b"B" * 4096
    assert (await io.allocation_depth(top_edge, 0, 4096))[1] == 1  # copied up
    info = await node_info(daemon, "cor")
    assert info["image"]["format"] == "copy-on-read"
    assert info["image"]["cluster-size"] == 65536
    daemon.graph.detach(edge)
    await run(daemon, "blockdev-del", {"node-name": "cor"})
    await daemon.shutdown()
    mapped = await qemu_img("map", "--output=json", str(top))
    # The first cluster now lives in the top image (depth 0), the rest still in the base.
    assert mapped.startswith('[{ "start": 0, "length": 65536, "depth": 0')


# --- compress, preallocate -----------------------------------------------------------------


async def test_compress_refuses_non_compressing_child() -> None:
    daemon = Daemon()
    desc = await error(
        daemon,
        "blockdev-add",
        {"driver": "compress", "node-name": "c", "file": {"driver": "null-co"}},
    )
    assert desc == "Compression is not supported for underlying format: null-co"
    assert daemon.graph.find("c") is None and len(daemon.graph) == 0


async def test_preallocate_grows_ahead_and_truncates_on_close(scratch: Path) -> None:
    path = scratch / "img.qcow2"
    await qemu_img("create", "-f", "qcow2", str(path), "16M")
    before = await asyncio.to_thread(os.path.getsize, path)
    daemon = Daemon()
    await run(
        daemon,
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "q",
            "file": {
                "driver": "preallocate",
                "node-name": "pre",
                "prealloc-align": 65536,
                "prealloc-size": 1 << 20,
                "file": {"driver": "file", "filename": str(path)},
            },
        },
    )
    graph = await run(daemon, "x-debug-query-block-graph")
    ids = {n["name"]: n["id"] for n in graph["nodes"]}
    pre_edge = next(e for e in graph["edges"] if e["parent"] == ids["pre"])
    assert "resize" in pre_edge["perm"] and "write" in pre_edge["perm"]
    edge = attach(daemon, "q")
    await io.pwrite(edge, 0, b"z" * 65536)
    await io.flush(edge)
    grown = await asyncio.to_thread(os.path.getsize, path)
    data_end = daemon.graph.lookup("pre").driver.getlength()
    assert grown >= data_end + (1 << 20) - 65536 and grown % 65536 == 0
    assert data_end > before
    daemon.graph.detach(edge)
    await run(daemon, "blockdev-del", {"node-name": "q"})
    assert await asyncio.to_thread(os.path.getsize, path) == data_end
    await qemu_img("check", str(path))
