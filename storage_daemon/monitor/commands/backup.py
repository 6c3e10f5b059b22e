"""Backup commands: blockdev-backup and drive-backup (domain ring).

As in qsd, each is a transaction of one action (blockdev/transaction_backup.py), so the
command and the action share every check, and the drained section around the job's start
(its `paused`/`running` events, and those of the jobs it touches) is the same.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev.transaction import run_transaction
from storage_daemon.monitor.dispatch import CommandContext, command


@command("blockdev-backup")
async def blockdev_backup(ctx: CommandContext, args: Any) -> None:
    await run_transaction(ctx.daemon, [("blockdev-backup", args)])


@command("drive-backup")
async def drive_backup(ctx: CommandContext, args: Any) -> None:
    await run_transaction(ctx.daemon, [("drive-backup", args)])
