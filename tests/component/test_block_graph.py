"""The node graph through the QMP handlers, in process: names, children, permissions."""

from __future__ import annotations

from typing import Any

import pytest

from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError


async def run(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> Any:
    return await daemon.run_command(name, args)


async def error(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> str:
    with pytest.raises(QmpError) as info:
        await daemon.run_command(name, args)
    return info.value.desc


class FakeExport:
    """A non-node parent, as an export or a job attaches."""

    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


async def test_node_names_follow_qsd_rules() -> None:
    daemon = Daemon()
    await run(daemon, "blockdev-add", {"driver": "null-co", "node-name": "a-b.c_d"})
    await run(daemon, "blockdev-add", {"driver": "null-co", "node-name": "n" * 31})
    assert await error(daemon, "blockdev-add", {"driver": "null-co", "node-name": "n" * 32}) == (
        "Node name too long"
    )
    for bad in ("1bad", "#x", "", "a:b", "bad name"):
        desc = await error(daemon, "blockdev-add", {"driver": "null-co", "node-name": bad})
        assert desc == f"Invalid node-name: '{bad}'"
    assert await error(daemon, "blockdev-add", {"driver": "null-co", "node-name": "a-b.c_d"}) == (
        "Duplicate nodes with node-name='a-b.c_d'"
    )
    assert await error(daemon, "blockdev-add", {"driver": "null-co"}) == (
        "'node-name' must be specified for the root node"
    )


async def test_inline_children_get_auto_names_and_go_with_their_parent() -> None:
    daemon = Daemon()
    await run(
        daemon,
        "blockdev-add",
        {"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "size": 1024}},
    )
    names = [info["node-name"] for info in await run(daemon, "query-named-block-nodes")]
    assert names[0] == "r" and names[1].startswith("#block")
    await run(daemon, "blockdev-del", {"node-name": "r"})
    assert await run(daemon, "query-named-block-nodes") == []


async def test_blockdev_del_checks_in_qsd_order() -> None:
    daemon = Daemon()
    assert await error(daemon, "blockdev-del", {"node-name": "nosuch"}) == (
        "Failed to find node with node-name='nosuch'"
    )
    await run(daemon, "blockdev-add", {"driver": "null-co", "node-name": "n0"})
    await run(daemon, "blockdev-add", {"driver": "raw", "node-name": "r0", "file": "n0"})
    await run(
        daemon,
        "blockdev-add",
        {"driver": "raw", "node-name": "r1", "file": {"driver": "null-co", "node-name": "in"}},
    )
    assert await error(daemon, "blockdev-del", {"node-name": "n0"}) == "Block device n0 is in use"
    assert await error(daemon, "blockdev-del", {"node-name": "in"}) == (
        "Node in is not owned by the monitor"
    )
    export_edge = daemon.graph.attach(
        FakeExport(), daemon.graph.lookup("r0"), "root", ChildRole.PRIMARY
    )
    assert await error(daemon, "blockdev-del", {"node-name": "r0"}) == "Node r0 is in use"
    daemon.graph.detach(export_edge)
    await run(daemon, "blockdev-del", {"node-name": "r0"})
    await run(daemon, "blockdev-del", {"node-name": "n0"})


async def test_json_filenames_and_sector_rounded_sizes() -> None:
    daemon = Daemon()
    await run(
        daemon,
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "r",
            "offset": 1,
            "file": {"driver": "null-co", "size": 1024},
        },
    )
    info = (await run(daemon, "query-named-block-nodes"))[0]
    assert info["file"] == (
        'json:{"offset": 1, "driver": "raw", "file": {"driver": "null-co", "size": 1024}}'
    )
    assert info["image"]["virtual-size"] == 1024  # 1023 bytes, reported in whole sectors
    graph = await run(daemon, "x-debug-query-block-graph")
    # A window into the child does not let anyone resize the child.
    assert graph["edges"][0]["shared-perm"] == ["write-unchanged", "write", "consistent-read"]


async def test_raw_window_errors() -> None:
    daemon = Daemon()
    child = {"driver": "null-co", "size": 1024}
    cases = [
        (
            {"offset": 2048},
            "Offset (2048) cannot be greater than size of the containing file (1024)",
        ),
        (
            {"offset": 512, "size": 1024},
            "The sum of offset (512) and size (1024) has to be smaller or equal to the  "
            "actual size of the containing file (1024)",
        ),
        ({"offset": 512, "size": 100}, "Specified size is not multiple of 512"),
    ]
    for extra, message in cases:
        args = {"driver": "raw", "node-name": "r", "file": dict(child), **extra}
        assert await error(daemon, "blockdev-add", args) == message
    assert await run(daemon, "query-named-block-nodes") == []  # nothing left behind


async def test_permission_conflicts_roll_back() -> None:
    daemon = Daemon()
    await run(daemon, "blockdev-add", {"driver": "null-co", "node-name": "n0"})
    node = daemon.graph.lookup("n0")
    writer = daemon.graph.attach(
        FakeExport(), node, "root", ChildRole.PRIMARY, Perm.WRITE, PERM_ALL & ~Perm.RESIZE
    )
    with pytest.raises(QmpError) as info:
        daemon.graph.attach(FakeExport(), node, "root", ChildRole.PRIMARY, Perm.RESIZE, PERM_ALL)
    assert "permissions 'resize' are both required by" in info.value.desc
    assert len(node.parents) == 1 and node.perm == Perm.WRITE
    daemon.graph.detach(writer)
    assert node.perm == Perm(0)


async def test_read_only_node_refuses_writers_through_raw() -> None:
    daemon = Daemon()
    await run(
        daemon,
        "blockdev-add",
        {"driver": "raw", "node-name": "r", "read-only": True, "file": {"driver": "null-co"}},
    )
    with pytest.raises(QmpError, match="Block node is read-only"):
        daemon.graph.attach(
            FakeExport(), daemon.graph.lookup("r"), "root", ChildRole.PRIMARY, Perm.WRITE
        )


async def test_detect_zeroes_unmap_needs_discard_unmap() -> None:
    daemon = Daemon()
    args = {"driver": "null-co", "node-name": "n", "detect-zeroes": "unmap"}
    assert await error(daemon, "blockdev-add", args) == (
        "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
    )
    await run(daemon, "blockdev-add", {**args, "discard": "unmap"})


async def test_null_negative_size_is_an_error_not_an_abort() -> None:
    daemon = Daemon()
    desc = await error(daemon, "blockdev-add", {"driver": "null-co", "node-name": "n", "size": -1})
    assert desc == "Parameter 'size' expects a non-negative number below 2^64"


async def test_a_node_the_monitor_does_not_own_goes_with_its_last_user() -> None:
    """As a blockdev-snapshot-sync overlay goes when its export is deleted."""
    from storage_daemon.qapi.runtime import visit_input

    daemon = Daemon()
    await run(daemon, "blockdev-add", {"driver": "null-co", "node-name": "base"})
    spec = {"driver": "raw", "node-name": "ov", "file": "base"}
    overlay = await daemon.graph.add(visit_input("BlockdevOptions", spec), monitor_owned=False)
    edge = daemon.graph.attach(FakeExport(), overlay, "root", ChildRole.PRIMARY)
    assert await error(daemon, "blockdev-del", {"node-name": "base"}) == (
        "Block device base is in use"
    )
    daemon.graph.detach(edge)
    assert daemon.graph.find("ov") is None
    assert not daemon.graph.lookup("base").parents
    await daemon.graph.settle()
    await run(daemon, "blockdev-del", {"node-name": "base"})
    assert await run(daemon, "query-named-block-nodes") == []
