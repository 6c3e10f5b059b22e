"""External snapshots: put an overlay on top of a node, in the node's place (blockdev-snapshot
and blockdev-snapshot-sync, as transaction actions; the commands are one-action transactions).

Domain ring. `append_overlay` is QEMU's bdrv_append: the overlay gets the node as its backing
and takes over the node's users (exports, parent nodes; jobs stay), all or nothing; the
returned `Appended` undoes exactly that. Invariant: image files are only created, never
changed, before the transaction commits, so an abort needs to undo nothing on disk (qsd
leaves a created overlay file behind too).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from storage_daemon.blockdev import chain
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.graph import check_not_blocked, op_blocker
from storage_daemon.blockdev.jobs.job import Job
from storage_daemon.blockdev.perm import Perm
from storage_daemon.blockdev.transaction import Action, register_action
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph
    from storage_daemon.blockdev.jobs.create import CreateJob
    from storage_daemon.blockdev.node import BlockNode

ABSOLUTE_PATHS = "absolute-paths"
EXISTING = "existing"
DEFAULT_FORMAT = "qcow2"

# Formats qsd can create but whose images cannot have a backing file.
_NO_BACKING_FORMATS = frozenset({"file", "raw"})


def _wire(value: Any) -> Any:
    return getattr(value, "value", value)


# --- looking nodes up and op blockers ----------------------------------------------------


def lookup_bs(graph: BlockGraph, device: str | None, node_name: str | None) -> BlockNode:
    """QEMU's bdrv_lookup_bs. `device` names a block backend, and qsd has no named
    backends, so only `node_name` can match."""
    if node_name is not None:
        node = graph.find(node_name)
        if node is not None:
            return node
    raise QmpError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


def snapshot_blocker(node: BlockNode) -> str | None:
    """Why an external snapshot of `node` is refused (qsd's op blockers), or None."""
    return op_blocker(node)


# --- bdrv_append --------------------------------------------------------------------------


def _subtree(node: BlockNode) -> Iterator[BlockNode]:
    seen: set[int] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        yield n
        todo.extend(edge.node for edge in n.children)


@dataclass
class Appended:
    """What `append_overlay` changed: the moved edges (with their old places) and the
    parents whose `node` attribute pointed at the old node."""

    graph: BlockGraph
    overlay: BlockNode
    node: BlockNode
    moved: list[BdrvChild] = field(default_factory=list)
    old_order: list[BdrvChild] = field(default_factory=list)
    retargeted: list[Any] = field(default_factory=list)

    async def undo(self) -> None:
        """Give the users back to the node and drop the overlay's backing edge."""
        for edge in self.moved:
            if edge in self.overlay.parents:
                self.overlay.parents.remove(edge)
            edge.node = self.node
        current = [e for e in self.node.parents if e not in self.old_order]
        self.node.parents[:] = current + [e for e in self.old_order if e.node is self.node]
        for parent in self.retargeted:
            parent.node = self.node
        self.graph.refresh_perms(self.overlay)
        self.graph.refresh_perms(self.node)
        await chain.set_backing(self.graph, self.overlay, None)
        self.moved.clear()
        self.retargeted.clear()


async def append_overlay(graph: BlockGraph, overlay: BlockNode, node: BlockNode) -> Appended:
    """QEMU's bdrv_append: `node` becomes the backing of `overlay`, and the users of `node`
    that are not jobs and not below `overlay` use `overlay` instead. A frozen link among those
    users (qsd: "Cannot change 'file' link to 'X'") and permission conflicts raise QmpError
    and change nothing."""
    if any(n is overlay for n in _subtree(node)):
        raise QmpError(
            f"Making '{node.name}' a backing child of '{overlay.name}' would create a cycle"
        )
    await chain.set_backing(graph, overlay, node)
    state = Appended(graph, overlay, node, old_order=list(node.parents))
    below = {id(n) for n in _subtree(overlay)}
    for edge in list(node.parents):
        parent = edge.parent_node
        if isinstance(edge.parent, Job) or (parent is not None and id(parent) in below):
            continue
        state.moved.append(edge)
    try:
        graph.check_links_movable(state.moved, node)
    except QmpError:
        state.moved.clear()
        await state.undo()
        raise
    for edge in state.moved:
        node.parents.remove(edge)
        edge.node = overlay
    overlay.parents[:0] = state.moved
    for edge in state.moved:
        holder: Any = edge.parent
        if edge.parent_node is None and getattr(holder, "node", None) is node:
            holder.node = overlay
            state.retargeted.append(holder)
    try:
        graph.refresh_perms(overlay)
        graph.refresh_perms(node)
    except BaseException:
        await state.undo()
        raise
    return state


# --- creating the overlay image ----------------------------------------------------------


class _InlineCreation:
    """Stands in for a CreateJob when an image is created inside a command (no job)."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph

    def release_start(self) -> None:
        pass


def _opts_value(value: str) -> str:
    # QemuOpts printing doubles commas inside values.
    return value.replace(",", ",,")


def check_create_format(fmt: str) -> None:
    """bdrv_img_create's format checks for an overlay with a backing file."""
    from storage_daemon.blockdev.drivers import DRIVERS
    from storage_daemon.blockdev.jobs.create import creator_for

    if fmt not in DRIVERS:
        raise QmpError(f"Unknown file format '{fmt}'")
    if fmt in _NO_BACKING_FORMATS:
        raise QmpError(f"Backing file not supported for file format '{fmt}'")
    try:
        creator_for(fmt)
    except QmpError as err:
        raise QmpError(f"Format driver '{fmt}' does not support image creation") from err


async def create_overlay_image(
    graph: BlockGraph, filename: str, fmt: str, size: int, backing: str, backing_fmt: str
) -> None:
    """Create a `fmt` image of `size` bytes recording `backing` (qsd's bdrv_img_create with
    absolute paths). Only qcow2 gets here (see check_create_format)."""
    from storage_daemon.blockdev.jobs.create import creator_for
    from storage_daemon.qapi.runtime import visit_input

    check_create_format(fmt)
    if filename == backing:
        raise QmpError(
            "Error: Trying to create an image with the same filename as the backing file"
        )
    if not backing:
        raise QmpError("Expected backing file name, got empty string")
    # qsd prints this line on its standard output when it creates an image.
    print(
        f"Formatting '{filename}', fmt={fmt} cluster_size=65536 extended_l2=off "
        f"compression_type=zlib size={size} backing_file={_opts_value(backing)} "
        f"backing_fmt={_opts_value(backing_fmt)} lazy_refcounts=off refcount_bits=16",
        flush=True,
    )
    job = cast("CreateJob", _InlineCreation(graph))
    file_options = visit_input(
        "BlockdevCreateOptions", {"driver": "file", "filename": filename, "size": 0}
    )
    await creator_for("file")(job, file_options)
    options = visit_input(
        "BlockdevCreateOptions",
        {
            "driver": fmt,
            "file": {"driver": "file", "filename": filename},
            "size": size,
            "backing-file": backing,
            "backing-fmt": backing_fmt,
        },
    )
    await creator_for(fmt)(job, options)


async def open_overlay(
    graph: BlockGraph, filename: str, fmt: str, node_name: str | None, like: BlockNode
) -> BlockNode:
    """Open the new overlay without its backing (it gets the snapshotted node), with the
    open flags of the node `like` (qsd copies them): read-only, caching, discard."""
    from storage_daemon.blockdev.drivers import DRIVERS
    from storage_daemon.qapi.runtime import visit_input

    if fmt not in DRIVERS:
        raise QmpError(f"Unknown driver '{fmt}'")
    flags = like.options
    options: dict[str, Any] = {
        "driver": fmt,
        "file": {"driver": "file", "filename": filename},
        "read-only": flags.read_only,
        "cache": {"direct": flags.cache_direct, "no-flush": flags.cache_no_flush},
    }
    if flags.auto_read_only:
        options["auto-read-only"] = True
    if flags.discard == "unmap":
        options["discard"] = "unmap"
    if node_name is not None:
        options["node-name"] = node_name
    if DRIVERS[fmt].supports_backing:
        options["backing"] = None
    return await graph.add(visit_input("BlockdevOptions", options), monitor_owned=False)


# --- the actions ----------------------------------------------------------------------------


class ExternalSnapshot(Action):
    """Both external snapshot actions (QEMU's external_snapshot_* phases)."""

    def __init__(self, ctx: Any, data: Any) -> None:
        super().__init__(ctx, data)
        self.old: BlockNode | None = None
        self.new: BlockNode | None = None
        self.appended: Appended | None = None

    @property
    def graph(self) -> BlockGraph:
        return self.ctx.daemon.graph

    def find_old(self) -> BlockNode:
        raise NotImplementedError

    async def open_new(self, old: BlockNode) -> BlockNode:
        raise NotImplementedError

    async def prepare(self) -> None:
        self.check_completion_mode()
        old = self.find_old()
        self.old = old
        await self.ctx.drain(old)  # qsd keeps the snapshotted node drained until clean
        check_not_blocked(old)
        if not old.read_only:
            try:
                await old.driver.flush()
            except OSError as err:
                raise QmpError("An IO error has occurred") from err
        new = await self.open_new(old)
        self.new = new
        # As qsd: "in use" means some user reads the overlay (it would see the image change
        # under it); one only written to, such as a mirror target, may get its backing now.
        if new.perm & Perm.CONSISTENT_READ:
            raise QmpError("The overlay is already in use")
        if new.driver.is_filter:
            raise QmpError("Filters cannot be used as overlays")
        if chain.cow_child(new) is not None:
            raise QmpError("The overlay already has a backing image")
        if not new.driver.supports_backing:
            raise QmpError("The overlay does not support backing images")
        self.appended = await append_overlay(self.graph, new, old)

    async def commit(self) -> None:
        # qsd switches the old active layer to read-only; a failure there is not reported.
        assert self.old is not None
        try:
            await chain.make_read_only(self.graph, self.old)
        except (QmpError, OSError):
            pass

    async def abort(self) -> None:
        if self.appended is not None:
            await self.appended.undo()
            self.appended = None

    async def clean(self) -> None:
        # qsd drops the transaction's reference to the overlay: one nobody uses is closed.
        new = self.new
        if new is None or new.monitor_owned or new.parents:
            return
        if self.graph.find(new.name) is new:
            await self.graph.remove(new)


@register_action
class BlockdevSnapshotAction(ExternalSnapshot):
    """blockdev-snapshot: the overlay is an existing node (added with backing null)."""

    kind = "blockdev-snapshot"

    def find_old(self) -> BlockNode:
        return lookup_bs(self.graph, self.data.node, self.data.node)

    async def open_new(self, old: BlockNode) -> BlockNode:
        return self.graph.lookup(self.data.overlay)


@register_action
class BlockdevSnapshotSyncAction(ExternalSnapshot):
    """blockdev-snapshot-sync: the overlay image is created (or opened) here."""

    kind = "blockdev-snapshot-sync"

    def find_old(self) -> BlockNode:
        return lookup_bs(self.graph, self.data.device, self.data.node_name)

    async def open_new(self, old: BlockNode) -> BlockNode:
        args = self.data
        mode = _wire(args.mode) or ABSOLUTE_PATHS
        fmt = args.format if args.format is not None else DEFAULT_FORMAT
        if args.node_name is not None and args.snapshot_node_name is None:
            raise QmpError("New overlay node-name missing")
        if args.snapshot_node_name is not None and self.graph.find(args.snapshot_node_name):
            raise QmpError("New overlay node-name already in use")
        if mode != EXISTING:
            await create_overlay_image(
                self.graph,
                args.snapshot_file,
                fmt,
                old.driver.getlength(),
                old.filename(),
                old.driver.format_name(),
            )
        return await open_overlay(self.graph, args.snapshot_file, fmt, args.snapshot_node_name, old)


__all__ = [
    "Appended",
    "BlockdevSnapshotAction",
    "BlockdevSnapshotSyncAction",
    "append_overlay",
    "check_not_blocked",
    "create_overlay_image",
    "lookup_bs",
    "snapshot_blocker",
]
