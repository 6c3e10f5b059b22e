"""Implicit filter nodes that block jobs put above a node while they run (copy-on-read for
stream, copy-before-write for backup, mirror_top for mirror), and qsd's "busy" op blockers.

Domain ring. Inserting a filter moves every user of the node below onto the filter, in place
(an NBD connection holding an edge goes on using it); dropping it moves them back. Invariant:
moving users is all or nothing: on a permission conflict every edge is back where it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph
    from storage_daemon.blockdev.node import BlockNode

Keep = Callable[[BdrvChild], bool]


def check_not_busy(node: BlockNode, me: object = None) -> None:
    """qsd's op blockers: a node a block job (other than `me`) holds is refused."""
    from storage_daemon.blockdev.jobs.block_job import BlockJob

    for edge in node.parents:
        if isinstance(edge.parent, BlockJob) and edge.parent is not me:
            raise QmpError(
                f"Node '{node.name}' is busy: block device is in use by block job: "
                f"{edge.parent.job_type}"
            )


def _reachable_below(node: BlockNode) -> set[BlockNode]:
    below: set[BlockNode] = set()
    queue = [node]
    while queue:
        current = queue.pop()
        for child in current.children:
            if child.node not in below:
                below.add(child.node)
                queue.append(child.node)
    return below


def move_parents(
    graph: BlockGraph,
    old: BlockNode,
    new: BlockNode,
    keep: Keep,
    *,
    refresh_old: bool = True,
    old_first: bool = True,
) -> None:
    """Point every user of `old` but those `keep` selects at `new` (QEMU's bdrv_replace_node
    minus the filter's own edge). A parent that `new` reaches through its own children keeps
    its edge (moving it would make a loop). With `refresh_old` false, `old` keeps the
    permissions it had (a filter whose held writes must still finish). `old` is refreshed
    first (it has fewer users now) unless `old_first` is false. All or nothing."""
    below = _reachable_below(new)
    edges = [
        edge
        for edge in old.parents
        if not keep(edge) and (edge.parent_node is None or edge.parent_node not in below)
    ]
    graph.check_links_movable(edges, old)  # qsd: "Cannot change 'backing' link to 'X'"
    old_users = list(old.parents)
    for edge in edges:
        old.parents.remove(edge)
        edge.node = new
    new.parents[:0] = edges
    refresh = [new]
    if refresh_old:
        refresh.insert(0 if old_first else 1, old)
    try:
        # One transaction: when it fails nothing was committed, so putting the edges back
        # is the whole rollback (a second permission update could fail the same way).
        graph.refresh_perms(*refresh)
    except BaseException:
        for edge in edges:
            new.parents.remove(edge)
            edge.node = old
        old.parents[:] = old_users
        raise
    for edge in edges:
        parent: Any = edge.parent
        if edge.parent_node is None and getattr(parent, "node", None) is old:
            parent.node = new  # an export names the node it serves


async def insert_filter(
    graph: BlockGraph, spec: dict[str, Any], below: BlockNode, keep: Keep
) -> BlockNode:
    """Open the filter node `spec` describes (its primary child must be `below`) and move the
    users of `below` that `keep` does not select onto it; qsd's error prefixes."""
    from storage_daemon.qapi.runtime import visit_input

    try:
        node = await graph.add(visit_input("BlockdevOptions", spec), monitor_owned=False)
    except QmpError as err:
        raise QmpError(f"Could not create node: {err.desc}", err.error_class) from err
    try:
        move_parents(graph, below, node, lambda edge: edge.parent is node or keep(edge))
    except QmpError as err:
        await graph.remove(node)
        raise QmpError(f"Could not replace node: {err.desc}", err.error_class) from err
    return node


async def drop_filter(graph: BlockGraph, node: BlockNode, keep: Keep) -> None:
    """Move the users of filter `node` (but those `keep` selects) back to the node below it,
    then close the filter once nobody uses it (QEMU's bdrv_cor_filter_drop)."""
    below = node.primary
    if below is not None:
        move_parents(graph, node, below.node, keep)
    if not node.parents:
        await graph.remove(node)


@contextlib.asynccontextmanager
async def drained(node: BlockNode) -> AsyncIterator[None]:
    """One drained section on `node` around a graph change (QEMU's bdrv_drained_begin/end in
    bdrv_replace_node, bdrv_drop_intermediate, bdrv_set_backing_hd, blk_remove_bs, ...): the
    jobs above the node pause, and resume once the change is made."""
    from storage_daemon.blockdev.transaction import DrainedSection

    section = DrainedSection(node)
    await section.begin()
    try:
        yield
    finally:
        await section.end()


__all__ = [
    "check_not_busy",
    "drained",
    "drop_filter",
    "insert_filter",
    "move_parents",
]
