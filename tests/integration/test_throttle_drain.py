"""Drained sections and throttle filters, in process: what qsd's drain of a throttle node does.

Integration ring (the daemon's graph, QMP handlers and throttle groups together, on a fake
clock that never advances, so a throttled request can only go through a drain). A drain that
reaches a throttle node lets every request that node queued in its group go at once and lets
new ones pass while it lasts; all are charged to the group, so later requests wait for them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import storage_daemon.monitor.commands  # noqa: F401  (handlers imported before any loop runs)
from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.throttle import ThrottleDriver
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.blockdev.transaction import DrainedSection, nodes_above
from storage_daemon.clock import FakeClock
from storage_daemon.daemon import Daemon

KiB = 1024


class User:
    """A non-node parent, as an export attaches."""

    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


async def throttled_pair() -> tuple[Daemon, BdrvChild, BdrvChild]:
    """Two throttle nodes of one group (64 KiB/s of writes) over one null node, each with a
    user; the group's burst allowance already used up."""
    daemon = Daemon(FakeClock())
    await daemon.run_command(
        "object-add",
        {"qom-type": "throttle-group", "id": "tg0", "limits": {"bps-write": 64 * KiB}},
    )
    await daemon.run_command("blockdev-add", {"driver": "null-co", "node-name": "null0"})
    edges = []
    for name in ("th1", "th2"):
        spec = {"driver": "throttle", "node-name": name, "throttle-group": "tg0", "file": "null0"}
        await daemon.run_command("blockdev-add", spec)
        node = daemon.graph.lookup(name)
        perm = Perm.CONSISTENT_READ | Perm.WRITE
        edges.append(daemon.graph.attach(User(), node, "root", ChildRole.PRIMARY, perm, PERM_ALL))
    await io.pwrite(edges[0], 0, bytes(64 * KiB))  # passes: the buckets were empty
    return daemon, edges[0], edges[1]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def write(edge: BdrvChild) -> asyncio.Future[Any]:
    return asyncio.ensure_future(io.pwrite(edge, 0, bytes(64 * KiB)))


def write_level(daemon: Daemon) -> float:
    return daemon.objects.throttle_group("tg0").state.cfg.buckets["bps-write"].level


async def test_drained_section_releases_only_the_drained_member() -> None:
    daemon, e1, e2 = await throttled_pair()
    queued1, queued2 = write(e1), write(e2)
    await settle()
    assert not queued1.done() and not queued2.done()
    level = write_level(daemon)

    section = DrainedSection(daemon.graph.lookup("th1"))
    await section.begin()
    await settle()
    assert queued1.done() and queued1.exception() is None
    assert not queued2.done()  # th2 is not drained: its request keeps waiting
    # While drained, th1's new requests pass at once; all of them are charged.
    await asyncio.wait_for(io.pwrite(e1, 0, bytes(64 * KiB)), 5)
    assert write_level(daemon) == level + 2 * 64 * KiB
    await section.end()

    again = write(e1)  # drained no more: the limits hold it (behind th2's request)
    await settle()
    assert not again.done()
    # A drain of the node below reaches both throttle nodes (its parents).
    below = DrainedSection(daemon.graph.lookup("null0"))
    await below.begin()
    await settle()
    assert queued2.done() and again.done()
    await below.end()
    driver = daemon.graph.lookup("th1").driver
    assert isinstance(driver, ThrottleDriver) and driver.drained == 0
    for edge in (e1, e2):
        daemon.graph.detach(edge)


async def test_transaction_drain_releases_queued_writes() -> None:
    daemon, e1, e2 = await throttled_pair()
    queued = [write(e1), write(e2), write(e1)]
    await settle()
    assert not any(f.done() for f in queued)
    await daemon.run_command("transaction", {"actions": []})
    await settle()
    assert all(f.done() and f.exception() is None for f in queued)
    # The drain ended: the requests it let go were charged, so the next one waits.
    late = write(e2)
    await settle()
    assert not late.done()
    late.cancel()
    await asyncio.gather(late, return_exceptions=True)
    assert not daemon.objects.throttle_group("tg0")._queues[True]
    for edge in (e1, e2):
        daemon.graph.detach(edge)


async def test_nodes_above_is_the_node_and_its_parent_nodes() -> None:
    daemon, e1, e2 = await throttled_pair()
    names = {node.name for node in nodes_above(daemon.graph.lookup("null0"))}
    assert names == {"null0", "th1", "th2"}
    assert [n.name for n in nodes_above(daemon.graph.lookup("th2"))] == ["th2"]
    for edge in (e1, e2):
        daemon.graph.detach(edge)
