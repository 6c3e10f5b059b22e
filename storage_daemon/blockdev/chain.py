"""Backing chains: walking them through filters, and relinking a node onto another backing.

Domain ring. A chain goes down from a node through its "filtered" child: a filter's primary
child, or a format's `backing` child (QEMU's bdrv_filter_or_cow_child). `set_backing` changes
the graph and the image header together. Invariant: a node has at most one `backing` edge,
and a backing node opened implicitly (not monitor-owned) is closed once nobody uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev.child import ROLE_BACKING, BdrvChild, ChildRole
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph
    from storage_daemon.blockdev.node import BlockNode


def is_filter(node: BlockNode) -> bool:
    return node.driver.is_filter


def cow_child(node: BlockNode) -> BdrvChild | None:
    """The node's backing edge, if it has one (filters have none)."""
    return node.child("backing")


def filtered_child(node: BlockNode) -> BdrvChild | None:
    """The edge a chain continues through: a filter's primary child, else the backing."""
    if is_filter(node):
        for edge in node.children:
            if edge.role & ChildRole.FILTERED or edge.role & ChildRole.PRIMARY:
                return edge
        return None
    return cow_child(node)


def below(node: BlockNode) -> BlockNode | None:
    edge = filtered_child(node)
    return edge.node if edge is not None else None


def skip_filters(node: BlockNode | None) -> BlockNode | None:
    """The first node from `node` down that is not a filter (QEMU's bdrv_skip_filters)."""
    while node is not None and is_filter(node):
        node = below(node)
    return node


def walk(node: BlockNode) -> Iterator[BlockNode]:
    """`node` and every node below it in its chain, top to bottom."""
    current: BlockNode | None = node
    while current is not None:
        yield current
        current = below(current)


def contains(top: BlockNode, node: BlockNode) -> bool:
    """Whether `node` is `top` or below it (QEMU's bdrv_chain_contains)."""
    return any(n is node for n in walk(top))


def is_below(top: BlockNode, node: BlockNode) -> bool:
    """Whether `node` is strictly below `top` in its chain."""
    return node is not top and contains(top, node)


def find_overlay(top: BlockNode, node: BlockNode) -> BlockNode | None:
    """The node in `top`'s chain whose filtered child is `node`."""
    for n in walk(top):
        if below(n) is node:
            return n
    return None


def bottom(node: BlockNode) -> BlockNode:
    """The last node of the chain (whatever has no filtered child)."""
    last = node
    for n in walk(node):
        last = n
    return last


def find_base(node: BlockNode) -> BlockNode:
    """The lowest non-filter image of the chain, as block-commit's default base."""
    last = node
    for n in walk(node):
        if not is_filter(n):
            last = n
    return last


def find_by_filename(top: BlockNode, filename: str) -> BlockNode | None:
    """A node strictly below `top` whose image filename is `filename` (QEMU compares the
    backing file name as written and the resolved name)."""
    for n in walk(top):
        if n is top:
            continue
        if n.filename() == filename:
            return n
        drv: Any = n.driver
        file_edge = n.child("file")
        if file_edge is not None and file_edge.node.filename() == filename and not drv.is_filter:
            return n
    return None


def backing_name_for(node: BlockNode | None) -> tuple[str | None, str | None]:
    """The (file name, format) to record in a header for backing `node` (filters skipped)."""
    real = skip_filters(node)
    if real is None:
        return None, None
    # qsd records the node's filename as query-named-block-nodes shows it: a json:
    # pseudo-name for a node opened with an explicit backing reference (verified live).
    return real.filename(), real.driver.format_name()


async def set_backing(graph: BlockGraph, node: BlockNode, new: BlockNode | None) -> None:
    """Make `new` the backing child of `node` (None: no backing); the old backing node is
    closed when it was implicit and nobody else uses it. A frozen backing link (a job works
    on the chain) and permission conflicts raise QmpError and change nothing."""
    old = cow_child(node)
    if old is not None and old.node is new:
        return
    graph.check_link_change(old)
    edge = graph.attach(node, new, "backing", ROLE_BACKING) if new is not None else None
    if old is not None:
        # The new edge was inserted last among the children; drop the old one.
        graph.detach(old)
    node.driver.backing_changed(edge)
    if old is not None:
        victim = old.node
        if not victim.monitor_owned and not victim.parents:
            await graph.remove(victim)


async def write_backing_name(node: BlockNode, name: str | None, backing_fmt: str | None) -> None:
    """Rewrite the header's backing file name (drivers with a `set_backing`, i.e. qcow2)."""
    setter = getattr(node.driver, "set_backing", None)
    if setter is None:
        return
    await setter(name, backing_fmt)


# --- read-write access changed by a reopen (block-commit's base, blockdev-snapshot) ------
# reopen.py is imported where it is used: it needs the graph, which needs this module.


class WritableGrant:
    """A read-only image node made writable for a job, as qsd reopens a commit base or a
    stream top read-write (reopen.set_read_only) and, when the job is over, read-only again."""

    def __init__(self, graph: BlockGraph, node: BlockNode) -> None:
        self.graph = graph
        self.node = node
        self.granted = False  # the node was reopened read-write and not back yet

    async def grant(self) -> None:
        """Reopen the node read-write when it is read-only (QmpError: it stays as it was)."""
        from storage_daemon.blockdev.reopen import set_read_only

        if not self.node.read_only:
            return
        await set_read_only(self.graph, self.node, False)
        self.granted = True

    def keep(self) -> None:
        """Leave the node read-write for good (qsd's active commit, once started)."""
        self.granted = False

    async def restore(self) -> None:
        """Back to read-only once the job no longer holds WRITE on the node; as in qsd, a
        failure there is not reported (the node stays read-write)."""
        from storage_daemon.blockdev.reopen import set_read_only

        if not self.granted:
            return
        self.granted = False
        try:
            await set_read_only(self.graph, self.node, True)
        except QmpError:
            pass


async def make_read_only(graph: BlockGraph, node: BlockNode) -> None:
    """Reopen a writable image node read-only (qsd does this to the old active layer after
    blockdev-snapshot); QmpError when that cannot be done (a writer above, ...)."""
    from storage_daemon.blockdev.reopen import set_read_only

    await set_read_only(graph, node, True)
