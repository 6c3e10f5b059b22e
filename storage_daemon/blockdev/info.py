"""What query-named-block-nodes and x-debug-query-block-graph say about the graph.

Domain ring. Plain JSON-able dicts, members in schema order (the QMP encoder puts keys in
qsd's order). Sizes are whole 512-byte sectors, as qsd reports node lengths.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev import write_threshold
from storage_daemon.blockdev.bitmaps import registry as bitmap_registry
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.driver import BlockDriver
from storage_daemon.blockdev.drivers.throttle import FilterDriver
from storage_daemon.blockdev.graph import BlockGraph
from storage_daemon.blockdev.jobs.job import Job
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import perm_list

SECTOR = 512


def node_length(node: BlockNode) -> int:
    """The length qsd reports: the driver's length rounded up to whole sectors."""
    length = node.driver.getlength()
    return -(-length // SECTOR) * SECTOR


# Children whose bytes count towards a node's allocated size; never a backing (COW) child.
_SIZE_ROLES = ChildRole.DATA | ChildRole.METADATA | ChildRole.FILTERED


def _generic_actual_size(driver: BlockDriver) -> bool:
    """Whether the driver keeps the base class's placeholder (or a filter's pass-through)."""
    return type(driver).actual_size in (BlockDriver.actual_size, FilterDriver.actual_size)


async def allocated_size(node: BlockNode) -> int | None:
    """ImageInfo's `actual-size`, worked out as qsd does; None where qsd leaves it out.

    A driver with its own answer gives it (OSError: unknown, e.g. blkdebug); otherwise a
    filter reports its filtered child's size, any other node the sum over its data and
    metadata children, and a node without children 0.
    """
    driver = node.driver
    if not _generic_actual_size(driver):
        try:
            return await driver.actual_size()
        except OSError:
            return None
    primary = node.primary
    if driver.is_filter and primary is not None:
        return await allocated_size(primary.node)
    total = 0
    for edge in node.children:
        if edge.role & _SIZE_ROLES and not edge.role & ChildRole.COW:
            size = await allocated_size(edge.node)
            if size is None:
                return None
            total += size
    return total


async def image_info(node: BlockNode, flat: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {
        "filename": node.filename(),
        "format": node.driver.format_name(),
    }
    extra = node.driver.image_info_extra()
    if "dirty-flag" in extra:
        info["dirty-flag"] = extra.pop("dirty-flag")
    actual = await allocated_size(node)
    if actual is not None:
        info["actual-size"] = actual
    info["virtual-size"] = node_length(node)
    info.update(extra)
    if "snapshots" not in info and node.children:
        # qsd lists the snapshots a node would take through its primary child (filters,
        # raw over qcow2), as blockdev-snapshot-internal-sync falls back to them.
        from storage_daemon.blockdev.snapshot_internal import snapshot_driver

        holder = snapshot_driver(node)
        if holder is not None and holder.snapshots:
            info["snapshots"] = [snap.info() for snap in holder.snapshots]
    below = filtered_or_cow(node)
    if below is not None and not flat:
        info["backing-image"] = await image_info(below)
    return info


def filtered_or_cow(node: BlockNode) -> BlockNode | None:
    """The node below `node` in its chain: a filter's filtered child, a format's backing.

    qsd's nested image info and backing_file_depth follow these, filters included.
    """
    if node.driver.is_filter:
        primary = node.primary
        return primary.node if primary is not None else None
    for edge in node.children:
        if edge.role & ChildRole.COW:
            return edge.node
    return None


def backing_depth(node: BlockNode) -> int:
    """How many filtered or backing nodes hang below `node` (qsd's backing_file_depth)."""
    depth = 0
    below = filtered_or_cow(node)
    while below is not None and depth < 1000:
        depth += 1
        below = filtered_or_cow(below)
    return depth


async def block_device_info(node: BlockNode, flat: bool = False) -> dict[str, Any]:
    """One BlockDeviceInfo entry."""
    opts = node.options
    filename = node.filename()
    backing = node.child("backing")
    info: dict[str, Any] = {
        "file": filename,
        "node-name": node.name,
        "ro": opts.read_only,
        "drv": node.driver.name,
        # qsd counts the chain only while it builds the nested image info: 0 when flat.
        "backing_file_depth": 0 if flat else backing_depth(node),
        "active": node.options.active,
        "encrypted": False,
        "detect_zeroes": opts.detect_zeroes,
        "bps": 0,
        "bps_rd": 0,
        "bps_wr": 0,
        "iops": 0,
        "iops_rd": 0,
        "iops_wr": 0,
        "image": await image_info(node, flat),
        "cache": {
            "writeback": True,
            "direct": opts.cache_direct,
            "no-flush": opts.cache_no_flush,
        },
        "write_threshold": write_threshold.threshold(node),
    }
    if backing is not None and not node.driver.is_filter:
        # A filter's "backing" child (mirror_top's) is no backing file named in a header.
        info["backing_file"] = backing.node.filename()
    # Named and anonymous (jobs', filters') bitmaps, newest first.
    bitmaps = bitmap_registry.infos(node)
    if bitmaps:
        info["dirty-bitmaps"] = bitmaps
    return info


async def named_block_nodes(graph: BlockGraph, flat: bool) -> list[dict[str, Any]]:
    """Every node, newest first, as qsd lists them."""
    # `flat` only drops nested backing-image chains, which appear with backing files.
    return [await block_device_info(node, flat) for node in reversed(list(graph))]


def debug_block_graph(graph: BlockGraph) -> dict[str, Any]:
    """x-debug-query-block-graph, numbered and ordered as qsd does it.

    qsd visits backends (exports, temporary users), then every node, then jobs; an object gets
    its id when first seen (as a visited node or as an edge's end), and both lists are built
    by prepending, so they come out newest first.
    """
    ids: dict[object, int] = {}
    nodes_out: list[dict[str, Any]] = []
    edges_out: list[dict[str, Any]] = []

    def number(obj: object) -> int:
        return ids.setdefault(obj, len(ids) + 1)

    def visit(obj: object, kind: str, name: str, edges: list[BdrvChild]) -> None:
        nodes_out.insert(0, {"id": number(obj), "type": kind, "name": name})
        for edge in edges:
            edges_out.insert(
                0,
                {
                    "parent": number(obj),
                    "child": number(edge.node),
                    "name": edge.name,
                    "perm": perm_list(edge.perm),
                    "shared-perm": perm_list(edge.shared),
                },
            )

    nodes = list(graph)
    outside: dict[object, list[BdrvChild]] = {}
    for edge in sorted(
        (edge for node in nodes for edge in node.parents if edge.parent_node is None),
        key=lambda edge: edge.serial,
    ):
        outside.setdefault(edge.parent, []).append(edge)
    # A job stays listed until dismissed, also once it holds no node any more (concluded).
    jobs: dict[object, list[BdrvChild]] = {job: [] for job in graph.block_jobs()}
    for parent, edges in outside.items():
        if isinstance(parent, Job):
            jobs[parent] = edges
    for parent, edges in outside.items():
        if parent not in jobs:
            visit(parent, "block-backend", "", edges)
    for node in nodes:
        visit(node, "block-driver", node.name, node.children)
    for job, edges in jobs.items():
        visit(job, "block-job", str(getattr(job, "id", "")), edges)
    return {"nodes": nodes_out, "edges": edges_out}


def _device_stats(node: BlockNode) -> dict[str, Any]:
    """BlockDeviceStats from the node's counters (qsd keeps these at zero for exports;
    we count every request that passes through the node)."""
    st = node.stats
    return {
        "rd_bytes": st.rd_bytes,
        "wr_bytes": st.wr_bytes,
        "unmap_bytes": st.unmap_bytes,
        "rd_operations": st.rd_operations,
        "wr_operations": st.wr_operations,
        "unmap_operations": st.unmap_operations,
        "flush_operations": st.flush_operations,
        "rd_merged": 0,
        "wr_merged": 0,
        "unmap_merged": 0,
        "rd_total_time_ns": st.rd_total_time_ns,
        "wr_total_time_ns": st.wr_total_time_ns,
        "unmap_total_time_ns": st.unmap_total_time_ns,
        "flush_total_time_ns": st.flush_total_time_ns,
        "wr_highest_offset": st.wr_highest_offset,
        "failed_rd_operations": st.failed_rd_operations,
        "failed_wr_operations": st.failed_wr_operations,
        "failed_unmap_operations": st.failed_unmap_operations,
        "failed_flush_operations": st.failed_flush_operations,
        "invalid_rd_operations": st.invalid_rd_operations,
        "invalid_wr_operations": st.invalid_wr_operations,
        "invalid_unmap_operations": st.invalid_unmap_operations,
        "invalid_flush_operations": st.invalid_flush_operations,
        "account_invalid": False,
        "account_failed": False,
        "timed_stats": [],
    }


def node_block_stats(node: BlockNode) -> dict[str, Any]:
    """One BlockStats entry; `parent` holds the file child's entry, as qsd names it."""
    entry: dict[str, Any] = {"node-name": node.name, "stats": _device_stats(node)}
    specific = node.driver.driver_specific_stats()
    if specific is not None:
        entry["driver-specific"] = specific
    file_child = node.child("file")
    if file_child is not None:
        entry["parent"] = node_block_stats(file_child.node)
    backing = node.child("backing")
    if backing is not None:
        entry["backing"] = node_block_stats(backing.node)
    return entry


def block_stats(graph: BlockGraph, query_nodes: bool) -> list[dict[str, Any]]:
    """query-blockstats: qsd has no named devices, so only `query-nodes` lists anything."""
    if not query_nodes:
        return []
    return [node_block_stats(node) for node in graph]
