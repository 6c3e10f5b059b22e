"""block-commit: merge the images from `top` down to just above `base` into `base`.

Domain ring. Committing an intermediate image copies, then (in prepare) relinks the overlay of
`top` onto `base` and rewrites its header. Committing the active layer (or a top someone
writes) is the mirror job in commit mode (commit_active.py). Invariants: a read-only base is
made writable for an intermediate commit only and read-only again after it; the links from the
job's filter down to the base stay frozen from the job's setup until prepare or abort.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev import chain, io
from storage_daemon.blockdev.backend import UnnamedBackend
from storage_daemon.blockdev.child import ROLE_FILTERED, BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.mirror_top import CommitTopDriver
from storage_daemon.blockdev.jobs.block_job import BlockJob
from storage_daemon.blockdev.jobs.commit_active import ActiveCommitJob
from storage_daemon.blockdev.jobs.filters import check_not_busy, drained, move_parents
from storage_daemon.blockdev.jobs.stream import (
    CHUNK,
    allocated_above,
    copy_with_policy,
    overlay_of,
)
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm
from storage_daemon.blockdev.transaction import drain_twice
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph, FrozenLinks
    from storage_daemon.blockdev.node import BlockNode
    from storage_daemon.daemon import Daemon

INTERMEDIATE_SHARED = Perm.WRITE | Perm.WRITE_UNCHANGED
BASE_PERM = Perm.CONSISTENT_READ | Perm.WRITE
# What an intermediate commit's backend on the base lets others do (qsd's).
BLK_BASE_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


def wire(value: Any) -> Any:
    return getattr(value, "value", value)


def insert_commit_top(graph: BlockGraph, name: str | None, top: BlockNode) -> BlockNode:
    """Put a `commit_top` filter (implicit `#blockNNN` unless named) above `top`; the users
    of `top` (its overlay) move onto it, as QEMU's bdrv_append."""
    node = graph.add_internal(name, CommitTopDriver)
    driver = node.driver
    assert isinstance(driver, CommitTopDriver)
    try:
        edge = graph.attach(node, top, "backing", ROLE_FILTERED)
        driver.set_child(edge)
        move_parents(graph, top, node, lambda other: other is edge)
    except BaseException:
        graph.remove_internal(node)
        raise
    node.options.read_only = top.read_only
    return node


def resolve(daemon: Daemon, args: Any) -> tuple[BlockNode, BlockNode, BlockNode, bool]:
    """(device, top, base, active) with qsd's checks and texts, in qsd's order."""
    graph = daemon.graph
    device = graph.find(args.device)
    if device is None:
        raise QmpError(f"Device '{args.device}' not found", error_class="DeviceNotFound")
    if any(
        edge.parent_node is not None or isinstance(edge.parent, BlockJob) for edge in device.parents
    ):
        raise QmpError("Need a root block node")  # qsd's: a node or a job uses it
    check_not_busy(device)  # qsd's COMMIT_SOURCE op blocker
    top: BlockNode | None
    if args.top_node is not None and args.top is not None:
        raise QmpError("'top-node' and 'top' are mutually exclusive")
    if args.top_node is not None:
        top = graph.lookup_node_name(args.top_node)
        if not chain.contains(device, top):
            raise QmpError(f"'{args.top_node}' is not in this backing file chain")
    elif args.top is not None:
        top = device if device.filename() == args.top else chain.find_by_filename(device, args.top)
        if top is None:
            raise QmpError(f"Top image file {args.top} not found")
    else:
        top = device
    base: BlockNode | None
    if args.base_node is not None and args.base is not None:
        raise QmpError("'base-node' and 'base' are mutually exclusive")
    if args.base_node is not None:
        base = graph.lookup_node_name(args.base_node)
        if not chain.contains(top, base):
            raise QmpError(f"'{args.base_node}' is not in this backing file chain")
    elif args.base is not None:
        base = chain.find_by_filename(top, args.base)
        if base is None:
            raise QmpError(f"Can't find '{args.base}' in the backing chain")
    else:
        base = chain.find_base(top)
    # qsd's COMMIT_TARGET op blockers: every node from the top down to (not) the base.
    node: BlockNode | None = top
    while node is not None and node is not base:
        check_not_busy(node)
        node = chain.below(node)
    if top is base:
        raise QmpError("cannot commit an image into itself")
    # As qsd: active commit is needed for the active layer and for a top someone writes.
    is_active_layer = chain.skip_filters(top) is chain.skip_filters(device)
    active = is_active_layer or bool(top.perm & Perm.WRITE)
    if active and args.backing_file is not None:
        if is_active_layer:
            raise QmpError("'backing-file' specified, but 'top' is the active layer")
        raise QmpError("'backing-file' specified, but 'top' has a writer on it")
    return device, top, base, active


def new_commit_job(daemon: Daemon, args: Any) -> BlockJob:
    """block-commit's job, checked as qsd checks it: an ActiveCommitJob (a mirror) when the
    top is the active layer or has a writer, else an IntermediateCommitJob."""
    device, top, base, active = resolve(daemon, args)
    if active:
        return ActiveCommitJob(daemon, args, top, base)
    overlay = overlay_of(device, top)
    if overlay is not None:
        check_not_busy(overlay)  # qsd's COMMIT_TARGET op blocker of the overlay
    return IntermediateCommitJob(daemon, args, device, top, base)


class IntermediateCommitJob(BlockJob):
    """Commit of an intermediate image: copy, then relink the overlay of `top` onto `base`."""

    job_type = "commit"

    def __init__(
        self, daemon: Daemon, args: Any, device: BlockNode, top: BlockNode, base: BlockNode
    ) -> None:
        self.device = device
        self.top = top
        self.base = base
        self.backing_file: str | None = args.backing_file
        self.on_error: str = wire(args.on_error) or "report"
        self.layers: list[BdrvChild] = []
        self.top_edge: BdrvChild | None = None
        self.base_edge: BdrvChild | None = None
        self.grant = chain.WritableGrant(daemon.graph, base)
        self.backends: list[BdrvChild] = []  # the job's own backends (base, top)
        self.filter: BlockNode | None = None
        self.filter_node_name: str | None = args.filter_node_name
        self.frozen: FrozenLinks | None = None  # commit_top down to the base, while it runs
        super().__init__(
            daemon.jobs,
            args.job_id,
            daemon.graph,
            device,
            perm=PERM_NONE,
            shared=PERM_ALL,
            speed=args.speed or 0,
            auto_finalize=args.auto_finalize is not False,
            auto_dismiss=args.auto_dismiss is not False,
        )

    async def setup(self) -> None:
        try:
            self._take_nodes()
            # qsd reopens a read-only base read-write (drained) before it takes the base.
            await self.grant.grant()
            try:
                self._take_base()
            except BaseException:
                self._drop_backends()  # the job lets go of the base, then it is read-only
                await self.grant.restore()
                raise
        except BaseException:
            self.graph.unfreeze(self.frozen)
            self._drop_filter()
            raise

    def _take_nodes(self) -> None:
        # qsd's commit_top filter goes in above the top once the job exists.
        self.filter = insert_commit_top(self.graph, self.filter_node_name, self.top)
        node: BlockNode | None = self.top
        while node is not None and node is not self.base:
            edge = self.add_node("intermediate node", node, PERM_NONE, INTERMEDIATE_SHARED)
            if node is self.top:
                self.top_edge = edge
            if not chain.is_filter(node):
                self.layers.append(edge)
            node = chain.below(node)
        # qsd freezes the chain from its filter down to the base until the job ends.
        assert self.filter is not None
        self.frozen = self.graph.freeze_chain(self.filter, self.base)

    def _take_base(self) -> None:
        # As qsd: the job holds the base without permissions and writes it through a
        # backend of its own; another backend holds the top.
        self.add_node("base", self.base, PERM_NONE, PERM_ALL)
        self.base_edge = self._backend(self.base, BASE_PERM, BLK_BASE_SHARED)
        self._backend(self.top, PERM_NONE, PERM_ALL)

    def _backend(self, node: BlockNode, perm: Perm, shared: Perm) -> BdrvChild:
        edge = self.graph.attach(UnnamedBackend(), node, "root", ChildRole(0), perm, shared)
        self.backends.append(edge)
        return edge

    def _drop_backends(self) -> None:
        for edge in self.backends:
            self.graph.detach(edge)
        self.backends = []

    def _drop_filter(self) -> None:
        """The filter's users back onto the top, the filter gone (success or failure)."""
        node, self.filter = self.filter, None
        if node is None:
            return
        with contextlib.suppress(QmpError):
            move_parents(self.graph_of(node), node, self.top, lambda edge: False)
        if not node.parents:
            self.graph_of(node).remove_internal(node)

    @staticmethod
    def graph_of(node: BlockNode) -> BlockGraph:
        graph: BlockGraph = node.graph
        return graph

    async def run(self) -> None:
        """Copy every range some layer above the base holds into the base."""
        top_edge, base_edge = self.top_edge, self.base_edge
        assert top_edge is not None and base_edge is not None
        length = io.length(top_edge)
        if io.length(base_edge) < length:
            raise QmpError("Top image is larger than the base image")
        self.progress_set_remaining(length)
        offset = 0
        while offset < length:
            await self.ratelimit_sleep_once()
            copy, n = await allocated_above(self.layers, offset, min(CHUNK, length - offset))
            if copy:
                if not await copy_with_policy(self, self.on_error, top_edge, base_edge, offset, n):
                    continue  # retried after the pause the policy asked for
                self.ratelimit_account(n)
            offset += n
            self.progress_update(n)

    async def prepare(self) -> None:
        self.graph.unfreeze(self.frozen)
        # As qsd: the job's backend on the base goes first (blk_unref drains the base, and
        # blk_remove_bs once more), then the intermediate nodes are dropped in a drained
        # section of their own (bdrv_drop_intermediate).
        await drain_twice(self.base)
        async with drained(self.base):
            await self._drop_intermediate()

    async def _drop_intermediate(self) -> None:
        self.remove_all_nodes()
        self._drop_backends()
        if self.filter is not None:
            # qsd's bdrv_drop_intermediate moves the commit filter's users onto the base: a
            # filter above it (a backup's copy-before-write on the top) goes straight there,
            # its link never back onto the read-only top; image overlays follow below.
            move_parents(
                self.graph,
                self.filter,
                self.base,
                lambda edge: edge.parent_node is None or not edge.parent_node.driver.is_filter,
            )
        self._drop_filter()
        overlay = chain.find_overlay(self.device, self.top)
        if overlay is None:
            return
        name, fmt = chain.backing_name_for(self.base)
        if self.backing_file is not None:
            name = self.backing_file
        try:
            await chain.write_backing_name(overlay, name, fmt)
        except OSError as err:
            raise QmpError(f"Could not change the backing file: {err.strerror}") from err
        await chain.set_backing(self.graph, overlay, self.base)

    async def abort(self) -> None:
        self.graph.unfreeze(self.frozen)

    async def clean(self) -> None:
        if self.base_edge is not None and self.grant.granted:
            try:
                await io.flush(self.base_edge)
            except OSError:
                pass
        self._drop_backends()
        self._drop_filter()
        await self.grant.restore()  # qsd's commit_clean: the base read-only again
        await drain_twice(self.top)  # then its backend on the top goes

    def release(self) -> None:
        self.graph.unfreeze(self.frozen)
        super().release()
        self._drop_backends()
        self._drop_filter()
