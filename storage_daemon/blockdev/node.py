"""A block node: a driver instance plus the options every driver shares (domain ring).

The node owns its edges to children and lists the edges of its users (parents, newest first,
as QEMU keeps them). Its name is unique in the graph; nodes created implicitly for inline
child definitions get qsd-style `#blockNNN` names and are deleted with their parent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.io_align import IoState
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm
from storage_daemon.blockdev.stats import IoStats
from storage_daemon.qdict import qdict_ordered

if TYPE_CHECKING:
    from storage_daemon.blockdev.driver import BlockDriver


@dataclass
class NodeOptions:
    """The options of BlockdevOptions' base that apply to every driver."""

    read_only: bool = False
    auto_read_only: bool = False
    force_share: bool = False
    detect_zeroes: str = "off"  # off | on | unmap
    discard: str = "ignore"  # ignore | unmap
    cache_direct: bool = False
    cache_no_flush: bool = False
    # QEMU 10.0 `active` (not inherited by inline children); flipped by blockdev/activity.py.
    active: bool = True


@dataclass(eq=False)
class BlockNode:
    name: str
    driver: BlockDriver
    options: NodeOptions
    serial: int  # creation order; x-debug-query-block-graph numbers nodes by it
    implicit: bool = False
    monitor_owned: bool = False
    parents: list[BdrvChild] = field(default_factory=list)
    children: list[BdrvChild] = field(default_factory=list)
    perm: Perm = PERM_NONE
    shared: Perm = PERM_ALL
    stats: IoStats = field(default_factory=IoStats)
    # The generic I/O path's per-node state (request tracker, flush generation): io.py only.
    io_state: IoState = field(default_factory=IoState, repr=False)
    # The graph holding the node (set by BlockGraph.add): drivers reach the daemon's event
    # hook and the corruption swap through it. None for nodes outside any graph (tests).
    graph: Any = field(default=None, repr=False)
    # The typed BlockdevOptions the node was opened with (x-query-block-node reports them).
    open_options: Any = field(default=None, repr=False)
    # QEMU's auto_backing_file: the backing name the image header gives (the opened file's
    # name when the format driver opened it itself). A backing child named otherwise, or
    # none where the header names one, "overrides" it and makes the filename a json: one.
    auto_backing_file: str = ""
    # References held without an edge (QEMU's bdrv_ref by an operation, e.g. an amend job
    # until it is dismissed): blockdev-del refuses the node while any is held.
    held: int = 0

    def __hash__(self) -> int:
        return id(self)

    @property
    def read_only(self) -> bool:
        return self.options.read_only

    def child(self, name: str) -> BdrvChild | None:
        for edge in self.children:
            if edge.name == name:
                return edge
        return None

    @property
    def primary(self) -> BdrvChild | None:
        """The child that filters and `raw` pass requests and filenames through."""
        from storage_daemon.blockdev.child import ChildRole

        for edge in self.children:
            if edge.role & ChildRole.PRIMARY:
                return edge
        return None

    def parent_description(self, child: BdrvChild) -> str:
        return f"node '{self.name}' (uses node '{child.node.name}' as '{child.name}' child)"

    # --- naming the image, as query-named-block-nodes shows it -------------------------

    def backing_overridden(self) -> bool:
        """Whether the graph's backing differs from what the image header says."""
        backing = self.child("backing")
        if backing is not None:
            return self.auto_backing_file != backing.node.filename()
        return bool(self.auto_backing_file)

    def full_options(self) -> dict[str, Any]:
        """The driver name, its strong options and its children's, as in `json:{...}`;
        the backing child only where it overrides the header (then `null` for none)."""
        options: dict[str, Any] = {"driver": self.driver.name}
        # Like `driver`, a `filename` the node was opened with is always a strong option.
        filename = getattr(self.open_options, "filename", None)
        if isinstance(filename, str):
            options["filename"] = filename
        options.update(self.driver.strong_options())
        overridden = self.backing_overridden()
        for edge in self.children:
            if edge.name == "backing" and not overridden:
                continue
            options[edge.name] = edge.node.full_options()
        if overridden and self.child("backing") is None:
            options["backing"] = None
        return options

    def filename(self) -> str:
        """A plain filename when one describes the node fully, else a `json:` pseudo-name.

        Filters that pass filenames through are named after their child, whatever it is
        called. Formats take their protocol child's name when neither their strong options
        nor a backing override would be lost by it; `raw` is such a format.
        """
        driver = self.driver
        primary = self.primary
        if driver.passes_filename and primary is not None and driver.name not in _FORMATS:
            return primary.node.filename()
        if not driver.strong_options() and not self.backing_overridden():
            if driver.name in _FORMATS and primary is not None:
                if not primary.node.children:  # a protocol node
                    inner = primary.node.filename()
                    if not inner.startswith("json:"):
                        return inner
            else:
                exact = driver.exact_filename()
                if exact is not None:
                    return exact
        return "json:" + json.dumps(qdict_ordered(self.full_options()))


# Format drivers that pass their filename through (QEMU's generic rule for formats).
_FORMATS = frozenset({"raw"})
