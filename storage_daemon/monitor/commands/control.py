"""Control commands: version, command list, introspection, quit (domain ring).

`qmp_capabilities` is protocol state and is answered by the QMP session itself; its handler
here only runs when the session delegates it.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.monitor.dispatch import CommandContext, command
from storage_daemon.qapi.introspection import schema_payload
from storage_daemon.qapi_generated.commands import COMMANDS


@command("query-version")
async def query_version(ctx: CommandContext, args: Any) -> dict[str, Any]:
    return ctx.daemon.version_info()


@command("query-commands")
async def query_commands(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    # qsd lists commands newest-registered first.
    return [{"name": name} for name in reversed(list(COMMANDS))]


@command("query-qmp-schema")
async def query_qmp_schema(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    return schema_payload()


@command("quit")
async def quit_(ctx: CommandContext, args: Any) -> None:
    """The reply waits for the end of the exit (the jobs' cancel events come first), as qsd's."""
    ctx.daemon.request_exit()
    await ctx.daemon.wait_monitor_cleanup()
