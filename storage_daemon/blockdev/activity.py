"""Activating and inactivating nodes: QEMU 10.0's `blockdev-set-active` (domain ring).

An inactive node is one another process may take over (migration hand-over): this module only
flips `NodeOptions.active` in QEMU's order and asks non-node parents (exports) to give up or
take back their permissions. What "inactive" means is enforced in one place, the permission
transaction in graph.py: an inactive node grants nothing but consistent-read, an active node
may not get an inactive child, and an inactive node asks its children only for reads.
Invariant: a node is inactive only while every parent node of it is inactive too.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import Perm
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph

_WRITERS = Perm.WRITE | Perm.WRITE_UNCHANGED


@runtime_checkable
class ActivityAware(Protocol):
    """A non-node parent (an export) that takes part in (in)activation of its node."""

    def inactivate_edge(self, graph: BlockGraph, edge: BdrvChild) -> None:
        """Drop the edge's permissions, or raise OSError(EPERM) when the user cannot."""
        ...

    def activate_edge(self, graph: BlockGraph, edge: BdrvChild) -> None:
        """Take back the permissions dropped by `inactivate_edge` (QmpError on conflict)."""
        ...


def is_active(node: BlockNode) -> bool:
    return node.options.active


def has_active_node_parent(node: BlockNode, *, only_active: bool = True) -> bool:
    """True when a parent *node* (not an export or job) uses `node` (and is active)."""
    for edge in node.parents:
        parent = edge.parent_node
        if parent is not None and (parent.options.active or not only_active):
            return True
    return False


def _strerror(err: OSError) -> str:
    code = err.errno or errno.EIO
    return os.strerror(code)


# --- activation ------------------------------------------------------------------------


async def activate(graph: BlockGraph, node: BlockNode) -> None:
    """Activate `node`, its children first; then let its users take their permissions back.

    A failure (a lock another user holds) leaves `node` inactive and the children that were
    activated before it active, as QEMU does.
    """
    for edge in list(node.children):
        await activate(graph, edge.node)
    if not node.options.active:
        node.options.active = True
        try:
            graph.refresh_perms(node)
        except BaseException:
            node.options.active = False  # the transaction changed nothing
            raise
        await node.driver.activate()
    for edge in list(node.parents):
        parent = edge.parent
        if isinstance(parent, ActivityAware):
            parent.activate_edge(graph, edge)


async def activate_all(graph: BlockGraph) -> None:
    """Every monitor-owned node in creation order (QEMU walks its monitor list); stop at the
    first failure."""
    for node in graph:
        if node.monitor_owned and graph.find(node.name) is node:
            await activate(graph, node)


# --- inactivation ----------------------------------------------------------------------


async def _inactivate_recurse(graph: BlockGraph, node: BlockNode, top_level: bool) -> None:
    if not node.options.active:
        return
    # A child still used by another active node stays active.
    if not top_level and has_active_node_parent(node):
        return
    # Write cached metadata back before another process may take the image over, once the
    # writes still in flight have landed.
    await io.settled(node)
    if not node.read_only:
        await node.driver.flush()
    for edge in list(node.parents):
        parent = edge.parent
        if isinstance(parent, ActivityAware):
            parent.inactivate_edge(graph, edge)
    if any(edge.perm & _WRITERS for edge in node.parents):
        # A user that cannot give up writing (a job, a resize in progress).
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
    # Only once nothing refuses: the driver hands the image over (qcow2 stores its bitmaps).
    await node.driver.inactivate()
    node.options.active = False
    try:
        graph.refresh_perms(node)
    except QmpError as err:
        node.options.active = True  # the transaction changed nothing
        await node.driver.activate()  # take the image back as the driver left it
        raise OSError(errno.EPERM, os.strerror(errno.EPERM)) from err
    for edge in list(node.children):
        await _inactivate_recurse(graph, edge.node, False)


async def inactivate(graph: BlockGraph, node: BlockNode) -> None:
    """Inactivate `node` and the children no other active node uses (qsd's texts)."""
    if has_active_node_parent(node):
        raise QmpError("Node has active parent node")
    try:
        await _inactivate_recurse(graph, node, True)
    except OSError as err:
        raise QmpError(f"Failed to inactivate node: {_strerror(err)}") from err


async def inactivate_all(graph: BlockGraph) -> None:
    """Every node without a parent node, recursively (nodes below go with their parents)."""
    try:
        for node in graph:
            if graph.find(node.name) is not node:
                continue
            if has_active_node_parent(node, only_active=False):
                continue
            await _inactivate_recurse(graph, node, True)
    except OSError as err:
        raise QmpError(f"Failed to inactivate all nodes: {_strerror(err)}") from err


async def set_active(graph: BlockGraph, node_name: str | None, active: bool) -> None:
    """blockdev-set-active: one node (and what only it uses), or every node."""
    if node_name is None:
        if active:
            await activate_all(graph)
        else:
            await inactivate_all(graph)
        return
    node = graph.find(node_name)
    if node is None:
        raise QmpError(f"Failed to find node with node-name='{node_name}'")
    if active:
        await activate(graph, node)
    else:
        await inactivate(graph, node)
