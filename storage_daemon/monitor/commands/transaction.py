"""The transaction and blockdev-snapshot-sync commands.

Domain ring. As in qsd, blockdev-snapshot-sync (like blockdev-snapshot, registered with the
block job commands) is a transaction of one action, so the command and the action share every
check and every error text. Invariant: handlers only translate arguments; the phases live in
blockdev/transaction.py and the actions in their own modules.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev.transaction import INDIVIDUAL, action_list, run_transaction
from storage_daemon.monitor.dispatch import CommandContext, command


@command("transaction")
async def transaction(ctx: CommandContext, args: Any) -> None:
    mode = INDIVIDUAL
    props = args.properties
    if props is not None and props.completion_mode is not None:
        mode = getattr(props.completion_mode, "value", props.completion_mode)
    await run_transaction(ctx.daemon, action_list(args.actions), mode)


@command("blockdev-snapshot-sync")
async def blockdev_snapshot_sync(ctx: CommandContext, args: Any) -> None:
    await run_transaction(ctx.daemon, [("blockdev-snapshot-sync", args)])
