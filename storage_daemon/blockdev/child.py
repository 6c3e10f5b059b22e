"""Edges of the block graph (`BdrvChild`) and the parents that hold them (domain ring).

Every user of a node, whether a parent node, an export or a job, holds it through a
`BdrvChild` carrying the permissions it uses and shares, so every user takes part in the same
permission checks and is named the same way in conflict messages.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import IntFlag
from typing import TYPE_CHECKING, Protocol

from storage_daemon.blockdev.perm import PERM_NONE, Perm

if TYPE_CHECKING:
    from storage_daemon.blockdev.node import BlockNode


class ChildRole(IntFlag):
    DATA = 0x1
    METADATA = 0x2
    FILTERED = 0x4
    COW = 0x8
    PRIMARY = 0x10


ROLE_FILE_OF_FORMAT = ChildRole.DATA | ChildRole.METADATA | ChildRole.PRIMARY
ROLE_FILTERED = ChildRole.DATA | ChildRole.FILTERED | ChildRole.PRIMARY
ROLE_BACKING = ChildRole.DATA | ChildRole.COW


_edge_serials = itertools.count()


class BlockParent(Protocol):
    """Anything that holds a node through an edge."""

    def parent_description(self, child: BdrvChild) -> str:
        """How conflict messages name this user, e.g. "node 'q0' (uses ... as 'file' child)"."""
        ...


@dataclass(eq=False)
class BdrvChild:
    """One edge: `parent` uses `node` as its child `name` with these permissions."""

    parent: BlockParent
    node: BlockNode
    name: str
    role: ChildRole
    perm: Perm = PERM_NONE
    shared: Perm = PERM_NONE
    # Creation order of edges: queries list non-node parents in the order they appeared.
    serial: int = field(default_factory=_edge_serials.__next__, compare=False)

    @property
    def parent_node(self) -> BlockNode | None:
        from storage_daemon.blockdev.node import BlockNode

        return self.parent if isinstance(self.parent, BlockNode) else None

    def describe(self) -> str:
        return self.parent.parent_description(self)
