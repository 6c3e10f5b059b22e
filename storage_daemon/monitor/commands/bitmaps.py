"""The dirty bitmap commands: block-dirty-bitmap-add/remove/clear/enable/disable/merge and
x-debug-block-dirty-bitmap-sha256.

Domain ring. Thin handlers over blockdev/bitmaps/registry.py, in qsd's check order; the
transaction actions of the same names (blockdev/bitmaps/actions.py) share those checks.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev.bitmaps import registry
from storage_daemon.monitor.dispatch import CommandContext, command


@command("block-dirty-bitmap-add")
async def block_dirty_bitmap_add(ctx: CommandContext, args: Any) -> None:
    registry.create(
        ctx.daemon.graph,
        args.node,
        args.name,
        args.granularity,
        bool(args.persistent),
        bool(args.disabled),
    )


@command("block-dirty-bitmap-remove")
async def block_dirty_bitmap_remove(ctx: CommandContext, args: Any) -> None:
    node, bitmap = registry.lookup(ctx.daemon.graph, args.node, args.name)
    bitmap.check_usable(allow_inconsistent=True)
    if bitmap.persistent:
        await node.driver.remove_stored_bitmap(bitmap.name)
    registry.release(node, bitmap)


@command("block-dirty-bitmap-clear")
async def block_dirty_bitmap_clear(ctx: CommandContext, args: Any) -> None:
    bitmap = registry.lookup(ctx.daemon.graph, args.node, args.name)[1]
    bitmap.check_usable()
    bitmap.bits.clear()


@command("block-dirty-bitmap-enable")
async def block_dirty_bitmap_enable(ctx: CommandContext, args: Any) -> None:
    bitmap = registry.lookup(ctx.daemon.graph, args.node, args.name)[1]
    bitmap.check_usable(allow_ro=True)
    bitmap.enabled = True


@command("block-dirty-bitmap-disable")
async def block_dirty_bitmap_disable(ctx: CommandContext, args: Any) -> None:
    bitmap = registry.lookup(ctx.daemon.graph, args.node, args.name)[1]
    bitmap.check_usable(allow_ro=True)
    bitmap.enabled = False


@command("block-dirty-bitmap-merge")
async def block_dirty_bitmap_merge(ctx: CommandContext, args: Any) -> None:
    registry.merge(ctx.daemon.graph, args.node, args.target, list(args.bitmaps))


@command("x-debug-block-dirty-bitmap-sha256")
async def x_debug_block_dirty_bitmap_sha256(ctx: CommandContext, args: Any) -> dict[str, Any]:
    bitmap = registry.lookup(ctx.daemon.graph, args.node, args.name)[1]
    return {"sha256": bitmap.bits.sha256()}
