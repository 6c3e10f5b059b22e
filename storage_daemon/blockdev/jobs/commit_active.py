"""block-commit of the active layer: the mirror job in QEMU's commit mode.

Domain ring. The top's users move onto a `mirror_top` filter, which marks every client write
dirty; the job copies what the layers from the top down to just above the base hold into the
base (grown first if smaller), becomes READY, and on job-complete converges and moves every
user of the top onto the base (qsd's pivot). A cancel in READY, soft or forced, leaves the
chain as it was. The links from the filter down to the base are frozen while the job runs.
Invariant: the base is made writable before anything else and stays so
afterwards (as qsd), unless the job never started: then it is read-only again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev import chain, io
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.jobs.mirror import MirrorJob
from storage_daemon.blockdev.jobs.stream import allocated_above
from storage_daemon.blockdev.perm import PERM_NONE, Perm

if TYPE_CHECKING:
    from storage_daemon.blockdev.node import BlockNode
    from storage_daemon.daemon import Daemon

# What the job lets others do with the nodes between the top and the base: nobody may read
# them consistently (their data is being moved), and writes must be allowed or the job would
# block itself at the base; filters right above the base may be read.
INTERMEDIATE_SHARED = Perm.WRITE_UNCHANGED | Perm.WRITE
TARGET_SHARED = Perm.WRITE_UNCHANGED | Perm.CONSISTENT_READ | Perm.WRITE


@dataclass
class CommitMirrorArgs:
    """block-commit's arguments as the mirror job reads them (QEMU's commit_active_start:
    full sync from the top, default granularity and buffer, one error policy for both)."""

    job_id: str | None
    speed: int | None
    on_source_error: Any
    on_target_error: Any
    auto_finalize: bool | None
    auto_dismiss: bool | None
    sync: str = "full"
    granularity: int | None = None
    buf_size: int | None = None
    replaces: str | None = None
    copy_mode: str | None = None

    @classmethod
    def of(cls, args: Any) -> CommitMirrorArgs:
        return cls(
            job_id=args.job_id,
            speed=args.speed,
            on_source_error=args.on_error,
            on_target_error=args.on_error,
            auto_finalize=args.auto_finalize,
            auto_dismiss=args.auto_dismiss,
        )


class ActiveCommitJob(MirrorJob):
    """Commit of `top` (the active layer, or a top someone writes) into `base`."""

    job_type = "commit"
    is_commit = True

    def __init__(self, daemon: Daemon, args: Any, top: BlockNode, base: BlockNode) -> None:
        # A read-only base is reopened read-write in `setup`, before the job takes it.
        self.grant = chain.WritableGrant(daemon.graph, base)
        self.layers: list[BdrvChild] = []  # the job's edges on the images above the base
        super().__init__(
            daemon,
            CommitMirrorArgs.of(args),
            top,
            base,
            zero_target=False,
            filter_node_name=args.filter_node_name,
        )

    # --- graph --------------------------------------------------------------------------

    def release(self) -> None:
        """As qsd: an implicit top (a blockdev-snapshot-sync overlay) that the completed
        commit replaced by the base is freed with the job's last reference to it."""
        held = [self.source] + [
            edge.node for edge in self.edges if edge.node not in (self.source, self.target)
        ]
        super().release()
        self.graph.free_orphans(held)

    def _target_perms(self) -> tuple[Perm, Perm]:
        perm = Perm.WRITE
        if self.source.driver.getlength() > self.target.driver.getlength():
            perm |= Perm.RESIZE  # the base grows to the top's size first
        return perm, TARGET_SHARED

    async def setup(self) -> None:
        await self.grant.grant()  # qsd reopens a read-only base read-write (drained)
        try:
            await self._take_nodes()
        except BaseException:
            # As qsd: the job lets go of the base, then the base is read-only again.
            self._drop_target_edge()
            await self.grant.restore()
            raise
        self.grant.keep()  # qsd leaves the base read-write, completed or not

    async def _take_nodes(self) -> None:
        await super().setup()
        source_edge = next(edge for edge in self.edges if edge.name == "source")
        if not chain.is_filter(self.source):
            self.layers.append(source_edge)
        # From the node right under the lowest image above the base on, only filters of
        # the base remain: those may be read.
        last_image = self.source
        for image in chain.walk(self.source):
            if image is self.target:
                break
            if not chain.is_filter(image):
                last_image = image
        readable_from = chain.below(last_image)
        shared = INTERMEDIATE_SHARED
        node: BlockNode | None = chain.below(self.source)
        while node is not None and node is not self.target:
            if node is readable_from:
                shared |= Perm.CONSISTENT_READ
            edge = self.add_node("intermediate node", node, PERM_NONE, shared)
            if not chain.is_filter(node):
                self.layers.append(edge)
            node = chain.below(node)
        # As qsd: the links from the filter down to the base stay as they are until the
        # job's exit (MirrorJob.prepare/abort unfreeze them before any pivot).
        assert self.filter_node is not None
        self.frozen = self.graph.freeze_chain(self.filter_node, self.target)

    async def _check_target_length(self, target: BdrvChild, length: int) -> None:
        if io.length(target) < length:
            await io.truncate(target, length)

    async def _scan(self) -> None:
        """The first dirty bitmap: what the layers above the base hold."""
        length = self.bitmap.length
        pos = 0
        while pos < length:
            await self.pause_point()
            allocated, n = await allocated_above(self.layers, pos, length - pos)
            if allocated:
                self.bitmap.set(pos, n)
            pos += n
