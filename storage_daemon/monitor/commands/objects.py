"""User-creatable objects: object-add and object-del (domain ring)."""

from __future__ import annotations

from typing import Any

from storage_daemon.monitor.dispatch import CommandContext, command


@command("object-add")
async def object_add(ctx: CommandContext, options: Any) -> None:
    ctx.daemon.objects.add(options)


@command("object-del")
async def object_del(ctx: CommandContext, args: Any) -> None:
    ctx.daemon.objects.delete(args.id)
