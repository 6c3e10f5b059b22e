"""blockdev-reopen: new options for existing nodes, applied to all of them or to none.

Domain ring. Every entry is first checked against its node with qsd's texts (the driver, options
the driver cannot change or reset, a missing backing, unknown nodes); then all changes are
applied together: options, permissions (parents first), new backing links. Invariant: when
`reopen` raises, every node has its old options, links and permissions again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.driver import ReopenChange
from storage_daemon.blockdev.graph import BlockGraph, node_options, wire
from storage_daemon.blockdev.node import BlockNode, NodeOptions
from storage_daemon.blockdev.node_query import set_members
from storage_daemon.blockdev.perm import Perm
from storage_daemon.blockdev.transaction import DrainedSection
from storage_daemon.errors import QmpError
from storage_daemon.qdict import qdict_order

# BlockdevOptions' base members: every driver takes their new values (or defaults).
_BASE = frozenset(
    {
        "driver",
        "node-name",
        "discard",
        "cache",
        "read-only",
        "auto-read-only",
        "force-share",
        "detect-zeroes",
        "active",
    }
)
_WRITERS = Perm.WRITE | Perm.WRITE_UNCHANGED
# The children that follow their parent's read-only flag in `set_read_only`.
_INHERITING = ("file", "data-file")
_UNSET = object()


@dataclass(eq=False)
class _Plan:
    """One node's reopen: checked, not applied yet."""

    node: BlockNode
    options: Any
    new: NodeOptions
    old: NodeOptions
    # The backing link's new node (None: no backing) when it changes, else _UNSET.
    backing: Any = _UNSET
    old_edge: BdrvChild | None = None
    new_edge: BdrvChild | None = None
    change: ReopenChange = field(init=False)  # what the driver's reopen hooks see

    def __post_init__(self) -> None:
        self.change = ReopenChange(old=self.old, new=self.new, options=self.options)


async def reopen(graph: BlockGraph, entries: list[Any]) -> None:
    """Reopen every node `entries` names (typed BlockdevOptions) with its new options."""
    named: list[tuple[BlockNode, Any]] = []
    # Like qsd 7.2, each named node's subtree is drained until the end.
    drained: list[DrainedSection] = []
    try:
        for entry in entries:
            if entry.node_name is None:
                raise QmpError("node-name not specified")
            node = graph.find(entry.node_name)
            if node is None:
                raise QmpError(f"Failed to find node with node-name='{entry.node_name}'")
            await _drain_subtree(node, drained)
            named.append((node, entry))
        plans: dict[BlockNode, _Plan] = {}
        for node, entry in named:
            if node not in plans:  # qsd merges repeated entries, the first one's values win
                _prepare(graph, node, entry, plans)
        if plans:
            await _apply(graph, _parents_first(list(plans.values())))
    finally:
        for section in drained:
            await section.end()


async def set_read_only(graph: BlockGraph, node: BlockNode, read_only: bool) -> None:
    """qsd's bdrv_reopen_set_read_only: `node`, drained, reopened with its options as they
    are but `read_only`, through the same checks, hooks and rollback as blockdev-reopen. The
    protocol children the node opened itself (inline) inherit the new value, as in qsd;
    children added on their own keep theirs. QmpError leaves everything as it was."""
    if node.options.read_only == read_only:
        return
    drained: list[DrainedSection] = []
    try:
        await _drain_subtree(node, drained)
        plans = [_flip(node, read_only)]
        for edge in node.children:
            child = edge.node
            if _inherits(node, edge.name) and child.options.read_only != read_only:
                plans.append(_flip(child, read_only))
        await _apply(graph, plans)
    finally:
        for section in drained:
            await section.end()


async def _drain_subtree(node: BlockNode, drained: list[DrainedSection]) -> None:
    """qsd 7.2's bdrv_subtree_drained_begin: `node` and every node under it drained, so the
    jobs above any of them pause; the sections go to the front of `drained` (ended in
    that order)."""
    for below in _subtree(node):
        section = DrainedSection(below)
        await section.begin()
        drained.insert(0, section)


def _subtree(node: BlockNode) -> list[BlockNode]:
    """`node` and every node under it, each once, parents before their children."""
    found: list[BlockNode] = []
    todo = [node]
    while todo:
        current = todo.pop(0)
        if current not in found:
            found.append(current)
            todo.extend(edge.node for edge in current.children)
    return found


def _inherits(node: BlockNode, name: str) -> bool:
    """Whether the node's `name` child is a protocol child it opened inline (given by options,
    not by a node name), which follows the parent's read-only flag as in qsd."""
    if name not in _INHERITING or node.open_options is None:
        return False
    return isinstance(set_members(node.open_options).get(name), dict)


def _flip(node: BlockNode, read_only: bool) -> _Plan:
    new = replace(node.options, read_only=read_only)
    return _Plan(node=node, options=node.open_options, new=new, old=replace(node.options))


# --- checks --------------------------------------------------------------------------------


def _prepare(
    graph: BlockGraph,
    node: BlockNode,
    entry: Any,
    plans: dict[BlockNode, _Plan],
    inherited: NodeOptions | None = None,
    cow: bool = False,
) -> None:
    """Check `entry` against `node` and add its plan (and its inline children's) to `plans`.

    A child the node opened itself (inline, or a backing file named by the header) given
    inline again is reopened with those options, inheriting from the node's new ones."""
    drv = node.driver
    new = node_options(entry, inherited, cow=cow)
    new.active = node.options.active  # activity belongs to blockdev-set-active
    if entry.discard is None and inherited is None:
        new.discard = node.options.discard  # qsd keeps it, unlike every other base option
    if new.detect_zeroes == "unmap" and new.discard != "unmap":
        raise QmpError(
            "setting detect-zeroes to unmap is not allowed without setting discard "
            "operation to unmap"
        )
    if new.force_share != node.options.force_share:
        raise QmpError("Cannot change the option 'force-share'")
    if new.force_share and not new.read_only:
        raise QmpError("force-share=on can only be used with read-only images")
    children = {edge.name for edge in node.children}
    if drv.supports_backing:
        children.add("backing")
    mutable = drv.reopen_mutable
    old_given = set_members(node.open_options) if node.open_options is not None else {}
    given = set_members(entry)
    for key in qdict_order(old_given):
        if key in _BASE or key in children or key in mutable or key in given:
            continue
        raise QmpError(f"Option '{key}' cannot be reset to its default value")
    _check_driver_options(node, entry)
    has_backing = node.child("backing") is not None or bool(node.auto_backing_file)
    if drv.supports_backing and "backing" not in entry.model_fields_set and has_backing:
        raise QmpError(f"backing is missing for '{node.name}'")
    nested: list[tuple[BlockNode, Any, bool]] = []
    flat: dict[str, Any] = {}
    for key, value in given.items():
        edge = node.child(key) if key in children else None
        if edge is not None and edge.node.implicit and isinstance(value, dict):
            sub = getattr(entry, key.replace("-", "_"))
            nested.append((edge.node, sub, bool(edge.role & ChildRole.COW)))
        elif key in children and isinstance(value, dict):
            flat.update({f"{key}.{sub}": item for sub, item in _flatten(value).items()})
        else:
            flat[key] = value
    for key in qdict_order(flat):
        if key == "driver" and flat[key] != drv.name:
            raise QmpError("Cannot change the option 'driver'")
        if key in _BASE or key in mutable or key in children:
            continue
        if "." in key or flat[key] != old_given.get(key):
            raise QmpError(f"Cannot change the option '{key}'")
    plan = _Plan(node=node, options=entry, new=new, old=replace(node.options))
    for name in sorted(children & set(given)):
        if not any(child is _child_node(node, name) for child, _, _ in nested):
            _plan_child(graph, plan, name, given[name])
    plans.setdefault(node, plan)
    for child, sub, child_cow in nested:
        if child not in plans:
            _prepare(graph, child, sub, plans, new, child_cow)


def _child_node(node: BlockNode, name: str) -> BlockNode | None:
    edge = node.child(name)
    return None if edge is None else edge.node


def _flatten(value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update({f"{key}.{sub}": inner for sub, inner in _flatten(item).items()})
        else:
            out[key] = item
    return out


def _check_driver_options(node: BlockNode, entry: Any) -> None:
    """The driver's own checks of its changeable options (qcow2's cache sizes)."""
    if wire(entry.driver) == node.driver.name:  # else: "Cannot change the option 'driver'"
        node.driver.reopen_check(entry)


def _plan_child(graph: BlockGraph, plan: _Plan, name: str, ref: Any) -> None:
    node = plan.node
    edge = node.child(name)
    target: BlockNode | None = None
    if isinstance(ref, str):
        target = graph.find(ref)
        if target is None:
            raise QmpError(f"Cannot find device='' nor node-name='{ref}'")
    elif ref is not None or name != "backing":
        raise QmpError(f"Cannot change the option '{name}'")
    if (edge.node if edge is not None else None) is target:
        return
    if name != "backing":
        # qsd can point a format at another file node; not done here yet.
        raise QmpError(f"Cannot change the option '{name}'")
    graph.check_link_change(edge)
    if target is not None and _is_below(target, node):
        raise QmpError(
            f"Making '{target.name}' a backing child of '{node.name}' would create a cycle"
        )
    plan.backing = target
    plan.old_edge = edge


def _is_below(top: BlockNode, node: BlockNode) -> bool:
    """Whether `node` is `top` or one of the nodes under it (a link to it would loop)."""
    todo = [top]
    while todo:
        current = todo.pop()
        if current is node:
            return True
        todo.extend(edge.node for edge in current.children)
    return False


def _parents_first(plans: list[_Plan]) -> list[_Plan]:
    """The plans ordered so that a node comes after every planned node above it."""
    remaining = list(plans)
    ordered: list[_Plan] = []
    while remaining:
        nodes = {plan.node for plan in remaining}
        for plan in remaining:
            if not _ancestors(plan.node) & nodes:
                ordered.append(plan)
                remaining.remove(plan)
                break
        else:  # a cycle cannot happen in the graph; keep the given order
            ordered.extend(remaining)
            break
    return ordered


def _ancestors(node: BlockNode) -> set[BlockNode]:
    seen: set[BlockNode] = set()
    todo = [node]
    while todo:
        for edge in todo.pop().parents:
            parent = edge.parent_node
            if parent is not None and parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


# --- applying ------------------------------------------------------------------------------


async def _apply(graph: BlockGraph, plans: list[_Plan]) -> None:
    flushed: list[_Plan] = []
    try:
        for plan in plans:
            if plan.new.read_only and not plan.old.read_only:
                # Its caches (and qcow2's bitmaps) go out while it may still write.
                await io.flush_node(plan.node)
                flushed.append(plan)
                await plan.node.driver.reopen_flush(plan.change)
    except BaseException:
        for plan in flushed:
            plan.node.driver.reopen_flush_abort(plan.change)
        raise
    for plan in plans:
        plan.node.options = plan.new
        plan.node.driver.reopen_prepare(plan.change)
    try:
        for plan in plans:
            _check_writers(plan)
            graph.refresh_perms(plan.node)
        for plan in plans:
            await plan.node.driver.reopen_ready(plan.change)
        for plan in plans:
            if plan.backing is not _UNSET and plan.backing is not None:
                plan.new_edge = graph.attach(plan.node, plan.backing, "backing", ChildRole.COW)
    except BaseException:
        _rollback(graph, plans)
        raise
    for plan in plans:
        await _commit(graph, plan)


def _check_writers(plan: _Plan) -> None:
    """qsd's refusal to make a node read-only under a writer (its parents come first, so
    their new permissions are known)."""
    node = plan.node
    if not plan.new.read_only:
        return
    for edge in node.parents:
        parent = edge.parent_node
        perm = (
            edge.perm
            if parent is None
            else parent.driver.child_perm(edge, parent.perm, parent.shared)[0]
        )
        if perm & _WRITERS:
            if plan.old.read_only:
                raise QmpError("Block node is read-only")
            raise QmpError(f"Read-only block node '{node.name}' cannot support read-write users")


def _rollback(graph: BlockGraph, plans: list[_Plan]) -> None:
    for plan in plans:
        if plan.new_edge is not None:
            graph.detach(plan.new_edge)
            plan.new_edge = None
        plan.node.options = plan.old
    for plan in plans:
        try:
            graph.refresh_perms(plan.node)
        except QmpError:
            pass  # the old permissions held before; nothing better to restore
        plan.node.driver.reopen_abort(plan.change)


async def _commit(graph: BlockGraph, plan: _Plan) -> None:
    node = plan.node
    node.driver.reopen_commit(plan.change)
    if plan.backing is not _UNSET:
        old = plan.old_edge
        if old is not None:
            graph.detach(old)
        node.driver.backing_changed(plan.new_edge)
        if old is not None and old.node.implicit and not old.node.parents:
            await graph.remove(old.node)  # opened for this node alone: closed with the link
    node.open_options = plan.options
