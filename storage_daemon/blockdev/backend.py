"""Anonymous block backends: short-lived users of a node that are not nodes themselves.

Domain ring. QEMU wraps a node in an unnamed BlockBackend for operations such as block_resize;
conflict messages name it "an unnamed block device". Exports and jobs describe themselves.
"""

from __future__ import annotations

from storage_daemon.blockdev.child import BdrvChild


class UnnamedBackend:
    """A parent that holds a node for the duration of one operation."""

    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as '{child.name}' child)"
