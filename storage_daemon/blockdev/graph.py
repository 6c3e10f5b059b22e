"""The block graph: every node, the edges between them, and permission transactions.

Domain ring. All changes to edges go through `attach`/`detach`/`set_edge_perm`, which check
the permissions of every affected node first and commit only if all agree, so a failed change
leaves the graph as it was. Node names follow qsd's rules; implicit children get `#blockNNN`.
Jobs freeze the links of the chain they work on (`freeze_chain`, QEMU's BdrvChild.frozen):
whatever would point a frozen edge elsewhere checks `check_link_change`/`check_links_movable`
first and gets qsd's refusal.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from enum import Enum
from typing import Any

from storage_daemon.blockdev import chain
from storage_daemon.blockdev.child import BdrvChild, BlockParent, ChildRole
from storage_daemon.blockdev.driver import BlockDriver
from storage_daemon.blockdev.drivers import DRIVERS
from storage_daemon.blockdev.jobs.fsm import JobStatus
from storage_daemon.blockdev.jobs.job import Job
from storage_daemon.blockdev.node import BlockNode, NodeOptions
from storage_daemon.blockdev.perm import (
    PERM_ALL,
    PERM_NONE,
    Perm,
    PermUser,
    cumulative,
    find_conflict,
    perm_words,
)
from storage_daemon.errors import QmpError

_log = logging.getLogger(__name__)
# Set while blockdev-add runs: an existing node it names as a child is drained (qsd's attach).
USER_ADD: ContextVar[bool] = ContextVar("user_add", default=False)
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
NODE_NAME_MAX = 31
_INT64_MAX = (1 << 63) - 1


def wire(value: Any) -> Any:
    """An enum member's wire value; anything else unchanged."""
    return value.value if isinstance(value, Enum) else value


def node_options(
    options: Any, inherited: NodeOptions | None, *, inactive: bool = False, cow: bool = False
) -> NodeOptions:
    """The base BlockdevOptions members, with defaults inherited from a parent node.

    A backing (`cow`) child is read-only and not auto-read-only unless its options say
    otherwise, whatever its parent is (QEMU's defaults for backing files).

    `active` is not inherited (qsd 10.0: an inline file child of an inactive node stays
    active); `inactive` is the default for backing files an inactive node opens itself.
    """
    base = NodeOptions()
    # --- activity (blockdev/activity.py) ---
    base.active = not inactive
    if getattr(options, "active", None) is not None:
        base.active = bool(options.active)
    # --- end activity ---
    if inherited is not None:
        # Children inherit read-only-ness and caching; lower layers may always discard.
        base.read_only = inherited.read_only
        base.auto_read_only = inherited.auto_read_only
        base.force_share = inherited.force_share
        base.cache_direct = inherited.cache_direct
        base.cache_no_flush = inherited.cache_no_flush
        base.discard = "unmap"
        if cow:
            base.read_only = True
            base.auto_read_only = False
    if options.read_only is not None:
        base.read_only = bool(options.read_only)
    if options.auto_read_only is not None:
        base.auto_read_only = bool(options.auto_read_only)
    if options.force_share is not None:
        base.force_share = bool(options.force_share)
    if options.detect_zeroes is not None:
        base.detect_zeroes = wire(options.detect_zeroes)
    if options.discard is not None:
        base.discard = wire(options.discard)
    if options.cache is not None:
        if options.cache.direct is not None:
            base.cache_direct = bool(options.cache.direct)
        if options.cache.no_flush is not None:
            base.cache_no_flush = bool(options.cache.no_flush)
    return base


def op_blocker(node: BlockNode) -> str | None:
    """Why qsd's op blockers refuse to touch `node` (blockdev-del, external snapshots), or
    None. A node is blocked by each overlay using it as a COW backing child and by each job
    holding it; QEMU reports the newest blocker, and parents are kept newest first."""
    for edge in node.parents:
        parent = edge.parent_node
        if parent is not None and edge.role & ChildRole.COW:
            return f"node is used as backing hd of '{parent.name}'"
        if isinstance(edge.parent, Job):
            return f"block device is in use by block job: {edge.parent.job_type}"
    return None


class FrozenLinks:
    """The links one freeze made frozen (`BlockGraph.freeze_chain`), given back to
    `BlockGraph.unfreeze`; unfreezing twice is harmless."""

    def __init__(self, edges: list[BdrvChild]) -> None:
        self.edges = edges


def chain_links(top: BlockNode, base: BlockNode | None) -> list[tuple[BlockNode, BdrvChild]]:
    """(node, its filtered child) for every node from `top` down to `base` (exclusive; None:
    to the bottom): the links QEMU's bdrv_freeze_backing_chain(top, base) covers."""
    links: list[tuple[BlockNode, BdrvChild]] = []
    node: BlockNode | None = top
    while node is not None and node is not base:
        edge = chain.filtered_child(node)
        if edge is None:
            break
        links.append((node, edge))
        node = edge.node
    return links


def _never_freeze(node: BlockNode) -> bool:
    """QEMU's never_freeze: a mirror's filter may go away at any time, so no link to it may
    be frozen (active commit freezes the links below it, not the one to it)."""
    from storage_daemon.blockdev.drivers.mirror_top import MirrorTopDriver

    return isinstance(node.driver, MirrorTopDriver)


def check_not_blocked(node: BlockNode) -> None:
    """Raise qsd's "Node 'X' is busy: ..." when an op blocker holds `node`."""
    reason = op_blocker(node)
    if reason is not None:
        raise QmpError(f"Node '{node.name}' is busy: {reason}")


class BlockGraph:
    """The daemon's nodes, by name, in creation order."""

    def __init__(
        self,
        rng: random.Random | None = None,
        emit: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self._nodes: dict[str, BlockNode] = {}
        self._serial = 0
        self._auto_counter = 0
        self._rng = rng or random.Random()
        # The daemon's event hook (EventBus.emit); drivers reach it through `node.graph`.
        self.emit_hook = emit
        # Every job that has held a node, in the order they first did: queries list a block
        # job until it is dismissed, even once it has let go of all its nodes.
        self._jobs: dict[Job, None] = {}
        # Closing nodes freed by `detach` (their last user, an export, went away).
        self._closing: set[asyncio.Task[None]] = set()
        # Frozen links (QEMU's BdrvChild.frozen): no command may point them elsewhere.
        self._frozen: set[BdrvChild] = set()

    # --- events and failures reported by nodes -----------------------------------------

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Send a QMP event from a node to the daemon's monitors (dropped without a hook)."""
        if self.emit_hook is not None:
            self.emit_hook(name, data)

    async def fence(self, node: BlockNode, reason: str) -> BlockNode | None:
        """`node` became unusable (fatal corruption): its users get an `error` node instead.

        Returns the replacement, or None when the node is no longer in the graph.
        """
        from storage_daemon.blockdev.drivers.error import swap_in_error_node

        return await swap_in_error_node(self, node, reason)

    # --- lookup -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[BlockNode]:
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)

    def block_jobs(self) -> list[Job]:
        """The jobs that have used nodes of this graph and still exist (not dismissed)."""
        for job in [job for job in self._jobs if job.status == JobStatus.NULL]:
            del self._jobs[job]
        return list(self._jobs)

    def find(self, name: str) -> BlockNode | None:
        return self._nodes.get(name)

    def lookup(self, name: str) -> BlockNode:
        """A node by name, with qsd's message for references that name nothing."""
        node = self._nodes.get(name)
        if node is None:
            raise QmpError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def lookup_node_name(self, node_name: str) -> BlockNode:
        """For commands taking only a node name (no device): qsd's device='' message."""
        node = self._nodes.get(node_name)
        if node is None:
            raise QmpError(f"Cannot find device='' nor node-name='{node_name}'")
        return node

    # --- creating and deleting nodes --------------------------------------------------

    def _check_name(self, name: str) -> None:
        if not _NODE_NAME.match(name):
            raise QmpError(f"Invalid node-name: '{name}'")
        if name in self._nodes:
            raise QmpError(f"Duplicate nodes with node-name='{name}'")
        if len(name) > NODE_NAME_MAX:
            raise QmpError("Node name too long")

    def _auto_name(self) -> str:
        # qsd: '#block' + a counter + two random digits, never valid as a user name.
        self._auto_counter += 1
        while True:
            name = f"#block{self._auto_counter}{self._rng.randrange(100):02d}"
            if name not in self._nodes:
                return name

    async def add(
        self,
        options: Any,
        *,
        monitor_owned: bool,
        inherited: NodeOptions | None = None,
        inactive: bool = False,
        cow: bool = False,
    ) -> BlockNode:
        """Open a node (and its inline children) from typed BlockdevOptions.

        The node joins the graph's creation order once its driver opens a backing child
        (`register_early`), else when it is open, as QEMU names a node after opening its
        file child and before its backing child.
        """
        opts = node_options(options, inherited, inactive=inactive, cow=cow)
        # qsd's order: a format or filter node's `file` reference is looked up first (its
        # file is opened before the node itself), then force-share, then detect-zeroes,
        # then the node name, then the driver's own options.
        file_ref = getattr(options, "file", None)
        if isinstance(file_ref, str):
            self.lookup(file_ref)
        if opts.force_share and not opts.read_only:
            raise QmpError("force-share=on can only be used with read-only images")
        if opts.detect_zeroes == "unmap" and opts.discard != "unmap":
            raise QmpError(
                "setting detect-zeroes to unmap is not allowed without setting discard "
                "operation to unmap"
            )
        driver_name = wire(options.driver)
        if options.node_name is not None:
            name = options.node_name
            self._check_name(name)
            implicit = False
        else:
            name = self._auto_name()
            implicit = True
        driver_cls: type[BlockDriver] = DRIVERS[driver_name]
        self._serial += 1
        node = BlockNode(
            name=name,
            driver=None,  # type: ignore[arg-type]  # set just below; the driver needs the node
            options=opts,
            serial=self._serial,
            implicit=implicit,
        )
        node.graph = self
        node.open_options = options
        node.driver = driver_cls(node)
        try:
            await node.driver.open(options, self._opener(opts))
        except BaseException:
            self._forget(node)
            await self._discard_children(node)
            raise
        # Children may have claimed the name meanwhile (an inline child with the same name).
        if self._nodes.get(name, node) is not node:
            await node.driver.close()
            await self._discard_children(node)
            raise QmpError(f"Duplicate nodes with node-name='{name}'")
        if -(-node.driver.getlength() // 512) * 512 > _INT64_MAX:
            self._forget(node)
            await node.driver.close()
            await self._discard_children(node)
            raise QmpError("Could not refresh total sector count: File too large")
        node.monitor_owned = monitor_owned
        self._nodes.setdefault(name, node)
        return node

    def register_early(self, node: BlockNode) -> None:
        """Put a node being opened into the creation order (before its backing child)."""
        existing = self._nodes.setdefault(node.name, node)
        if existing is not node:
            raise QmpError(f"Duplicate nodes with node-name='{node.name}'")

    def _forget(self, node: BlockNode) -> None:
        if self._nodes.get(node.name) is node:
            del self._nodes[node.name]

    def add_internal(self, node_name: str | None, driver_cls: type[BlockDriver]) -> BlockNode:
        """Register a node a job makes itself, with a driver no blockdev-add can name
        (mirror_top): `node_name` is checked as blockdev-add checks it, None gives an
        implicit `#blockNNN`. The caller attaches its children; `remove()` drops it."""
        if node_name is not None:
            self._check_name(node_name)
        name = node_name if node_name is not None else self._auto_name()
        self._serial += 1
        node = BlockNode(
            name=name,
            driver=None,  # type: ignore[arg-type]  # set just below; the driver needs the node
            options=NodeOptions(),
            serial=self._serial,
            implicit=node_name is None,
        )
        node.graph = self
        node.driver = driver_cls(node)
        self._nodes[name] = node
        return node

    def remove_internal(self, node: BlockNode) -> None:
        """Forget a node from `add_internal` (its users gone), detaching its children."""
        if self._nodes.get(node.name) is node:
            del self._nodes[node.name]
        for edge in list(node.children):
            self.detach(edge)

    def _opener(self, opts: NodeOptions) -> _Opener:
        return _Opener(self, opts)

    async def _discard_children(self, node: BlockNode) -> None:
        for edge in list(node.children):
            child = edge.node
            self.detach(edge)
            if not child.monitor_owned and not child.parents:
                await self.remove(child)

    async def remove(self, node: BlockNode) -> None:
        """Close a node nobody uses, and its implicit children that become unused."""
        self._nodes.pop(node.name, None)
        await node.driver.close()
        await self._discard_children(node)

    async def delete(self, node_name: str) -> None:
        """blockdev-del, with qsd's checks in qsd's order."""
        node = self._nodes.get(node_name)
        if node is None:
            raise QmpError(f"Failed to find node with node-name='{node_name}'")
        # qsd's order: a block backend (export, temporary user; jobs hold no backend), then
        # the node's op blockers, then monitor ownership, then any other reference.
        if any(
            edge.parent_node is None and not isinstance(edge.parent, Job) for edge in node.parents
        ):
            raise QmpError(f"Node {node_name} is in use")
        check_not_blocked(node)
        if not node.monitor_owned:
            raise QmpError(f"Node {node_name} is not owned by the monitor")
        if node.parents or node.held:
            raise QmpError(f"Block device {node_name} is in use")
        await self.remove(node)

    # --- edges and permissions --------------------------------------------------------

    def attach(
        self,
        parent: BlockParent,
        node: BlockNode,
        name: str,
        role: ChildRole,
        perm: Perm = PERM_NONE,
        shared: Perm = PERM_ALL,
    ) -> BdrvChild:
        """Add an edge; for node parents the parent's driver decides its permissions."""
        edge = BdrvChild(parent=parent, node=node, name=name, role=role)
        parent_node = edge.parent_node
        if parent_node is not None:
            perm, shared = _child_perm(parent_node, edge)
        self._transaction({edge: (perm, shared)}, added=[edge])
        if isinstance(parent, Job):
            self._jobs.setdefault(parent)
        node.parents.insert(0, edge)
        if parent_node is not None:
            parent_node.children.append(edge)
        return edge

    def detach(self, edge: BdrvChild) -> None:
        """Remove an edge; dropping permissions cannot fail, so this always succeeds.

        When an export or another backend lets go of a node the monitor does not own (a
        blockdev-snapshot-sync overlay) and nobody else uses it, the node is freed, as
        QEMU's reference counting frees it: gone from the graph at once, closed soon after.
        Node parents and jobs free their children themselves (`remove`).
        """
        if edge in edge.node.parents:
            edge.node.parents.remove(edge)
        if edge in self._frozen:
            # QEMU asserts a removed link is not frozen; a freezer that went away without
            # unfreezing must not keep the edge (and its nodes) alive here.
            _log.warning("frozen link '%s' of '%s' removed", edge.name, edge.describe())
            self._frozen.discard(edge)
        parent_node = edge.parent_node
        if parent_node is not None and edge in parent_node.children:
            parent_node.children.remove(edge)
        try:
            self._transaction({}, touched=[edge.node])
        except QmpError:
            pass  # fewer users can always coexist; nothing to undo
        if parent_node is None and not isinstance(edge.parent, Job):
            self._free_if_orphan(edge.node)

    def free_orphans(self, held: list[BlockNode]) -> None:
        """Free, top-down, the nodes of `held` nobody uses any more (implicit nodes a job let
        go of after dropping them from a chain): gone from the list at once, with their own
        implicit nodes, as qsd frees a node whose last reference goes; closed in the
        background."""
        for node in held:
            if node.monitor_owned or node.parents or self._nodes.get(node.name) is not node:
                continue
            for edge in [e for e in node.children if e.role & ChildRole.COW]:
                self.detach(edge)  # the next layer goes with it, not after its close
            self._free_if_orphan(node)

    def _free_if_orphan(self, node: BlockNode) -> None:
        if node.monitor_owned or node.parents or self._nodes.get(node.name) is not node:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop to close it on: left for the owner to remove
        del self._nodes[node.name]
        # Monitor-owned children (the overlay's backing) are free for blockdev-del at once;
        # implicit ones stay attached until the node is closed (it may flush through them),
        # but leave the node list now, as qsd frees them with it.
        for child in list(node.children):
            if child.node.monitor_owned:
                self.detach(child)
            else:
                self._hide_implicit(child.node, node)
        task = loop.create_task(self._close_freed(node))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _hide_implicit(self, node: BlockNode, parent: BlockNode) -> None:
        """An implicit node only `parent` (being freed) uses, and its own: out of the list."""
        if node.monitor_owned or any(e.parent_node is not parent for e in node.parents):
            return
        if self._nodes.get(node.name) is node:
            del self._nodes[node.name]
        for edge in node.children:
            self._hide_implicit(edge.node, node)

    async def _close_freed(self, node: BlockNode) -> None:
        try:
            await self.remove(node)
        except Exception:  # nobody awaits this close: report, as QEMU would only warn
            _log.exception("closing node '%s' failed", node.name)

    async def settle(self) -> None:
        """Wait until the nodes `detach` freed are closed (daemon shutdown, tests)."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    # --- frozen links -----------------------------------------------------------------

    def is_frozen(self, edge: BdrvChild) -> bool:
        return edge in self._frozen

    def check_chain_not_frozen(self, top: BlockNode, base: BlockNode | None) -> None:
        """QEMU's bdrv_is_backing_chain_frozen: qsd's refusal naming the first frozen link
        from `top` down to `base` (exclusive)."""
        for node, edge in chain_links(top, base):
            if edge in self._frozen:
                raise QmpError(
                    f"Cannot change '{edge.name}' link from '{node.name}' to '{edge.node.name}'"
                )

    def freeze_chain(self, top: BlockNode, base: BlockNode | None) -> FrozenLinks:
        """Freeze the links from `top` down to `base` (exclusive), as QEMU's
        bdrv_freeze_backing_chain: refused, and nothing frozen, when one already is or one
        leads to a mirror's filter."""
        links = chain_links(top, base)
        self.check_chain_not_frozen(top, base)
        for _node, edge in links:
            if _never_freeze(edge.node):
                raise QmpError(f"Cannot freeze '{edge.name}' link to '{edge.node.name}'")
        edges = [edge for _node, edge in links]
        self._frozen.update(edges)
        return FrozenLinks(edges)

    def unfreeze(self, frozen: FrozenLinks | None) -> None:
        if frozen is None:
            return
        for edge in frozen.edges:
            self._frozen.discard(edge)
        frozen.edges = []

    def check_link_change(self, edge: BdrvChild | None) -> None:
        """Before a parent's child link is pointed at another node or dropped (QEMU's
        bdrv_set_file_or_backing_noperm)."""
        if edge is not None and edge in self._frozen:
            parent = edge.parent_node
            parent_name = parent.name if parent is not None else ""
            raise QmpError(
                f"Cannot change frozen '{edge.name}' link from '{parent_name}' to "
                f"'{edge.node.name}'"
            )

    def check_links_movable(self, edges: list[BdrvChild], old: BlockNode) -> None:
        """Before the users `edges` of `old` are moved onto another node (QEMU's
        bdrv_replace_node: an external snapshot, a job's filter going in or a pivot)."""
        for edge in edges:
            if edge in self._frozen:
                raise QmpError(f"Cannot change '{edge.name}' link to '{old.name}'")

    def set_edge_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> None:
        """Change what a non-node parent (export, job) uses; all-or-nothing."""
        self._transaction({edge: (perm, shared)})

    def replace_node(self, old: BlockNode, new: BlockNode) -> None:
        """Point every edge using `old` at `new` (the corruption swap); all or nothing."""
        edges = list(old.parents)
        for edge in edges:
            edge.node = new
        new.parents[:0] = edges
        old.parents.clear()
        try:
            self._transaction({}, touched=[new, old])
        except BaseException:
            for edge in edges:
                edge.node = old
            del new.parents[: len(edges)]
            old.parents[:] = edges
            raise

    def refresh_perms(self, *nodes: BlockNode) -> None:
        """Recompute the permissions of `nodes` and their children (after their users or
        activity changed), in that order, as one transaction: all or nothing."""
        self._transaction({}, touched=list(nodes))

    def _transaction(
        self,
        changes: dict[BdrvChild, tuple[Perm, Perm]],
        *,
        added: list[BdrvChild] | None = None,
        touched: list[BlockNode] | None = None,
    ) -> None:
        """Check every node below the changed edges, then commit all or nothing."""
        added = added or []
        # --- activity (blockdev/activity.py): an active node may not use an inactive one ---
        for edge in added:
            parent = edge.parent_node
            if parent is not None and parent.options.active and not edge.node.options.active:
                raise QmpError(
                    f"Inactive '{edge.node.name}' can't be a {edge.name} child of "
                    f"active '{parent.name}'"
                )
        # --- end activity ---
        proposed = dict(changes)
        queue: list[BlockNode] = [edge.node for edge in changes] + list(touched or [])
        new_perms: dict[BlockNode, tuple[Perm, Perm]] = {}
        checked: list[BlockNode] = []
        try:
            while queue:
                node = queue.pop(0)
                users = [edge for edge in added if edge.node is node] + node.parents
                perm_users = [
                    PermUser(edge.describe(), *proposed.get(edge, (edge.perm, edge.shared)))
                    for edge in users
                ]
                # --- activity: an inactive node grants nothing but consistent-read ---
                if not node.options.active:
                    for user in perm_users:
                        if user.perm & ~Perm.CONSISTENT_READ:
                            raise QmpError(
                                f"Permission '{perm_words(user.perm)}' unavailable on inactive node"
                            )
                # --- end activity ---
                conflict = find_conflict(node.name, perm_users)
                if conflict is not None:
                    raise QmpError(conflict)
                perm, shared = cumulative(perm_users)
                if perm & (Perm.WRITE | Perm.WRITE_UNCHANGED) and node.read_only:
                    raise QmpError("Block node is read-only")
                node.driver.check_perm(perm, shared)
                checked.append(node)
                new_perms[node] = (perm, shared)
                for edge in node.children:
                    wanted = _child_perm(node, edge, perm, shared)
                    if wanted != proposed.get(edge, (edge.perm, edge.shared)):
                        proposed[edge] = wanted
                        queue.append(edge.node)
        except BaseException:
            for node in checked:
                node.driver.abort_perm()
            raise
        for edge, (perm, shared) in proposed.items():
            edge.perm, edge.shared = perm, shared
        for node, (perm, shared) in new_perms.items():
            node.perm, node.shared = perm, shared
            node.driver.set_perm(perm, shared)


def _child_perm(
    parent: BlockNode, edge: BdrvChild, perm: Perm | None = None, shared: Perm | None = None
) -> tuple[Perm, Perm]:
    """What `parent` needs on `edge`; a force-share child lets everyone else in."""
    wanted, sharing = parent.driver.child_perm(
        edge,
        parent.perm if perm is None else perm,
        parent.shared if shared is None else shared,
    )
    if edge.node.options.force_share:
        sharing = PERM_ALL
    return _inactive_mask(parent, wanted, sharing)


def _inactive_mask(parent: BlockNode, wanted: Perm, sharing: Perm) -> tuple[Perm, Perm]:
    """Activity: an inactive node only reads its children and lets others write them."""
    if parent.options.active:
        return wanted, sharing
    return wanted & Perm.CONSISTENT_READ, sharing | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE


class _Opener:
    """Opens a driver's children: references by name, or inline options as new nodes."""

    def __init__(self, graph: BlockGraph, parent_opts: NodeOptions) -> None:
        self._graph = graph
        self._parent_opts = parent_opts

    async def open_child(
        self, parent: BlockNode, ref: Any, name: str, role: ChildRole
    ) -> BdrvChild:
        cow = bool(role & ChildRole.COW)
        if cow and parent.graph is self._graph:
            self._graph.register_early(parent)
        if isinstance(ref, str):
            child = self._graph.lookup(ref)
            if USER_ADD.get():
                from storage_daemon.blockdev.transaction import drain_twice

                await drain_twice(child)  # as qsd's attach: the jobs above pause twice
            return self._graph.attach(parent, child, name, role)
        # qsd 10.0: a backing file an inactive node opens comes up inactive, and so does
        # everything below a node that was made inactive that way; an inline child of a node
        # the user made inactive explicitly stays active.
        given = parent.open_options
        explicit = given is not None and "active" in getattr(given, "model_fields_set", ())
        inactive = not self._parent_opts.active and (bool(role & ChildRole.COW) or not explicit)
        child = await self._graph.add(
            ref, monitor_owned=False, inherited=self._parent_opts, inactive=inactive, cow=cow
        )
        try:
            return self._graph.attach(parent, child, name, role)
        except BaseException:
            await self._graph.remove(child)
            raise
