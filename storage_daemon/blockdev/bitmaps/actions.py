"""The dirty bitmap transaction actions, with qsd's prepare/commit/abort split.

Domain ring. As in qsd, add, clear, enable, disable and merge act in `prepare` and undo in
`abort`; remove only marks the bitmap busy in `prepare` (so later actions of the same
transaction cannot use it) and drops it in `commit`. Invariant: `abort` restores exactly the
state `prepare` found, and is a no-op when `prepare` failed before changing anything.
"""

from __future__ import annotations

from storage_daemon.blockdev.bitmaps import registry
from storage_daemon.blockdev.bitmaps.core import Bits
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.transaction import Action, register_action


class _BitmapAction(Action):
    node: BlockNode | None = None
    bitmap: registry.DirtyBitmap | None = None

    def _lookup(self) -> registry.DirtyBitmap:
        self.node, self.bitmap = registry.lookup(
            self.ctx.daemon.graph, self.data.node, self.data.name
        )
        return self.bitmap


@register_action
class AddAction(_BitmapAction):
    kind = "block-dirty-bitmap-add"

    async def prepare(self) -> None:
        self.check_completion_mode()
        d = self.data
        self.node, self.bitmap = registry.create(
            self.ctx.daemon.graph,
            d.node,
            d.name,
            d.granularity,
            bool(d.persistent),
            bool(d.disabled),
        )

    async def abort(self) -> None:
        if self.node is not None and self.bitmap is not None:
            registry.release(self.node, self.bitmap)


@register_action
class RemoveAction(_BitmapAction):
    kind = "block-dirty-bitmap-remove"
    _held = False

    async def prepare(self) -> None:
        self.check_completion_mode()
        bitmap = self._lookup()
        bitmap.check_usable(allow_inconsistent=True)
        if bitmap.persistent and self.node is not None:
            # qsd drops a stored bitmap from the image here; an abort does not bring it back.
            await self.node.driver.remove_stored_bitmap(bitmap.name)
        bitmap.busy = True
        self._held = True

    async def commit(self) -> None:
        if self.node is not None and self.bitmap is not None:
            self.bitmap.busy = False
            registry.release(self.node, self.bitmap)

    async def abort(self) -> None:
        if self._held and self.bitmap is not None:
            self.bitmap.busy = False


@register_action
class ClearAction(_BitmapAction):
    kind = "block-dirty-bitmap-clear"
    backup: Bits | None = None

    async def prepare(self) -> None:
        self.check_completion_mode()
        bitmap = self._lookup()
        bitmap.check_usable()
        self.backup = bitmap.bits.copy()
        bitmap.bits.clear()

    async def abort(self) -> None:
        if self.bitmap is not None and self.backup is not None:
            self.bitmap.bits.restore(self.backup)


class _SwitchAction(_BitmapAction):
    enable = True
    was_enabled: bool | None = None

    async def prepare(self) -> None:
        self.check_completion_mode()
        bitmap = self._lookup()
        bitmap.check_usable(allow_ro=True)
        self.was_enabled = bitmap.enabled
        bitmap.enabled = self.enable

    async def abort(self) -> None:
        if self.bitmap is not None and self.was_enabled is not None:
            self.bitmap.enabled = self.was_enabled


@register_action
class EnableAction(_SwitchAction):
    kind = "block-dirty-bitmap-enable"
    enable = True


@register_action
class DisableAction(_SwitchAction):
    kind = "block-dirty-bitmap-disable"
    enable = False


@register_action
class MergeAction(_BitmapAction):
    kind = "block-dirty-bitmap-merge"
    backup: Bits | None = None

    async def prepare(self) -> None:
        self.check_completion_mode()
        d = self.data
        self.bitmap, self.backup = registry.merge(
            self.ctx.daemon.graph, d.node, d.target, list(d.bitmaps)
        )

    async def abort(self) -> None:
        if self.bitmap is not None and self.backup is not None:
            self.bitmap.bits.restore(self.backup)
