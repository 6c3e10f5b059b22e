"""Block-core commands: blockdev-add/del and the graph queries (domain ring)."""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev.info import debug_block_graph, named_block_nodes
from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import CommandContext, command


@command("blockdev-add")
async def blockdev_add(ctx: CommandContext, options: Any) -> None:
    if options.node_name is None:
        raise QmpError("'node-name' must be specified for the root node")
    await ctx.daemon.graph.add(options, monitor_owned=True)


@command("blockdev-del")
async def blockdev_del(ctx: CommandContext, args: Any) -> None:
    await ctx.daemon.graph.delete(args.node_name)


@command("query-named-block-nodes")
async def query_named_block_nodes(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    flat = bool(args.flat) if args is not None and args.flat is not None else False
    return await named_block_nodes(ctx.daemon.graph, flat)


@command("x-debug-query-block-graph")
async def x_debug_query_block_graph(ctx: CommandContext, args: Any) -> dict[str, Any]:
    return debug_block_graph(ctx.daemon.graph)
