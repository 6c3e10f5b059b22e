"""Block exports: the generic, reference-counted user of a node, and the export registry.

Domain ring (no sockets: the NBD server edge subclasses `BlockExport`). An export holds its
node through one 'root' edge, so it takes part in permission checks and is named in conflict
messages as qsd names it. Invariant: the export is deleted (edge detached, id freed,
BLOCK_EXPORT_DELETED emitted) exactly once, when its last reference goes; the registry holds
one reference until shutdown is requested, and each client holds one until its requests end.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from typing import Any

from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.graph import BlockGraph
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm
from storage_daemon.errors import QmpError

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")

# qsd's exports use the node for reading (and writing). They attach sharing everything and
# stop sharing resize once the export type agreed (NBD: "don't allow resize while the server
# runs"); both steps show in conflict messages. Measured: a writable raw-over-file export
# holds lock bytes 100-101 and 203, a read-only one 100 and 203.
EXPORT_SHARED = PERM_ALL & ~Perm.RESIZE


def export_perm(writable: bool) -> Perm:
    return Perm.CONSISTENT_READ | Perm.WRITE if writable else Perm.CONSISTENT_READ


class BlockExport:
    """One export of `node`; subclasses close their clients in `_close_clients`."""

    type_name = "none"

    def __init__(self, export_id: str, node: BlockNode, *, writable: bool, writethrough: bool):
        self.id = export_id
        self.node = node
        self.writable = writable
        self.writethrough = writethrough
        self.edge: BdrvChild | None = None
        self.refcount = 1  # the registry's ("user-owned") reference
        self.shutting_down = False
        self.deleted = False
        self._on_delete: list[Callable[[BlockExport], None]] = []
        # Inactive nodes (QEMU 10.0): with allow-inactive the export keeps working (reads
        # only) while its node is inactive; its permissions are then "disabled" (the edge
        # holds none) and taken back when the node is activated.
        self.allow_inactive = False
        self.perm_disabled = False
        self._want: tuple[Perm, Perm] = (export_perm(writable), PERM_ALL)

    # --- the block graph sees the export as a parent ------------------------------------

    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"

    def attach(self, graph: BlockGraph) -> None:
        """Take the node, sharing everything (QmpError with qsd's conflict text)."""
        self._want = (export_perm(self.writable), PERM_ALL)
        perm, shared = self._want
        if not self.node.options.active and self._can_inactivate():
            self.perm_disabled = True
            perm, shared = PERM_NONE, PERM_ALL
        self.edge = graph.attach(self, self.node, "root", ChildRole.PRIMARY, perm, shared)

    def forbid_resize(self, graph: BlockGraph) -> None:
        """Stop sharing resize (QmpError naming the node that resizes)."""
        assert self.edge is not None
        self._want = (export_perm(self.writable), EXPORT_SHARED)
        if not self.perm_disabled:
            graph.set_edge_perm(self.edge, *self._want)

    # --- inactive nodes (blockdev/activity.py calls these) ------------------------------

    def _can_inactivate(self) -> bool:
        return self.allow_inactive or not self._want[0] & ~Perm.CONSISTENT_READ

    def inactivate_edge(self, graph: BlockGraph, edge: BdrvChild) -> None:
        if self.perm_disabled:
            return
        if not self._can_inactivate():
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        self.perm_disabled = True
        graph.set_edge_perm(edge, PERM_NONE, PERM_ALL)

    def activate_edge(self, graph: BlockGraph, edge: BdrvChild) -> None:
        if not self.perm_disabled:
            return
        graph.set_edge_perm(edge, *self._want)
        self.perm_disabled = False

    # --- lifetime ---------------------------------------------------------------------

    def on_delete(self, callback: Callable[[BlockExport], None]) -> None:
        self._on_delete.append(callback)

    def ref(self) -> None:
        if self.deleted:
            raise RuntimeError(f"export {self.id} used after deletion")
        self.refcount += 1

    def unref(self) -> None:
        if self.refcount <= 0:
            raise RuntimeError(f"export {self.id}: reference count underflow")
        self.refcount -= 1
        if self.refcount == 0:
            self.deleted = True
            for callback in self._on_delete:
                callback(self)

    @property
    def clients(self) -> int:
        """References held by users other than the registry."""
        return self.refcount - (0 if self.shutting_down else 1)

    def request_shutdown(self) -> None:
        """Close every client and drop the registry's reference (once)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self.ref()  # keep the export alive while the clients are being closed
        try:
            self._close_clients()
        finally:
            self.unref()  # the temporary reference
        self.unref()  # the registry's

    def _close_clients(self) -> None:
        """Hook: disconnect every client (they unref as their requests finish)."""


class ExportRegistry:
    """Every export by id, in creation order, with qsd's checks and texts."""

    def __init__(self, graph: BlockGraph, emit: Callable[[str, dict[str, Any]], None]) -> None:
        self._graph = graph
        self._emit = emit
        self._exports: dict[str, BlockExport] = {}

    def __iter__(self) -> Any:
        return iter(list(self._exports.values()))

    def __len__(self) -> int:
        return len(self._exports)

    def find(self, export_id: str) -> BlockExport | None:
        return self._exports.get(export_id)

    def check_new_id(self, export_id: str) -> None:
        if not _ID.match(export_id):
            raise QmpError("Invalid block export id")
        if export_id in self._exports:
            raise QmpError(f"Block export id '{export_id}' is already in use")

    def register(self, export: BlockExport) -> None:
        """Take over an attached export; it leaves the registry when it is deleted."""
        self._exports[export.id] = export
        export.on_delete(self._deleted)

    def _deleted(self, export: BlockExport) -> None:
        if export.edge is not None:
            self._graph.detach(export.edge)
            export.edge = None
        if self._exports.get(export.id) is export:
            del self._exports[export.id]
        self._emit("BLOCK_EXPORT_DELETED", {"id": export.id})

    def delete(self, export_id: str, hard: bool) -> None:
        """block-export-del: refuse (safe mode) while clients are connected."""
        export = self._exports.get(export_id)
        if export is None:
            raise QmpError(f"Export '{export_id}' is not found")
        if export.shutting_down:
            raise QmpError(f"Export '{export_id}' is already shutting down")
        if not hard and export.clients > 0:
            raise QmpError(
                f"export '{export_id}' still in use",
                hint="Use mode='hard' to force client disconnect\n",
            )
        export.request_shutdown()

    def query(self) -> list[dict[str, Any]]:
        """query-block-exports: newest first, as qsd lists them."""
        return [
            {
                "id": e.id,
                "type": e.type_name,
                "node-name": (e.edge.node if e.edge is not None else e.node).name,
                "shutting-down": e.shutting_down,
            }
            for e in reversed(list(self._exports.values()))
        ]
