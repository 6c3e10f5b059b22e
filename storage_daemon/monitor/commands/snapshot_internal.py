"""QMP handlers for qcow2 internal snapshots: blockdev-snapshot-internal-sync (a transaction
of one action, as in qsd) and blockdev-snapshot-delete-internal-sync.

Domain ring. Thin: the checks and the action live in blockdev/snapshot_internal.py, the image
work in drivers/qcow2/snapshot_internal.py. Invariant: handlers only translate arguments.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev.snapshot_internal import ACTION, delete_internal
from storage_daemon.blockdev.transaction import run_transaction
from storage_daemon.monitor.dispatch import CommandContext, command


@command("blockdev-snapshot-internal-sync")
async def blockdev_snapshot_internal_sync(ctx: CommandContext, args: Any) -> None:
    await run_transaction(ctx.daemon, [(ACTION, args)])


@command("blockdev-snapshot-delete-internal-sync")
async def blockdev_snapshot_delete_internal_sync(
    ctx: CommandContext, args: Any
) -> dict[str, object]:
    return await delete_internal(ctx.daemon.graph, args.device, args.id, args.name)


__all__ = ["blockdev_snapshot_delete_internal_sync", "blockdev_snapshot_internal_sync"]
