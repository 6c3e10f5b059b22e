"""Block-core commands: blockdev-add/del and the graph queries (domain ring)."""

from __future__ import annotations

import os
from typing import Any

from storage_daemon.blockdev import activity, io
from storage_daemon.blockdev.backend import UnnamedBackend
from storage_daemon.blockdev.child import ChildRole
from storage_daemon.blockdev.graph import USER_ADD, op_blocker
from storage_daemon.blockdev.info import block_stats, debug_block_graph, named_block_nodes
from storage_daemon.blockdev.node_query import query_block_node
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import CommandContext, command


@command("blockdev-add")
async def blockdev_add(ctx: CommandContext, options: Any) -> None:
    if options.node_name is None:
        raise QmpError("'node-name' must be specified for the root node")
    token = USER_ADD.set(True)
    try:
        await ctx.daemon.graph.add(options, monitor_owned=True)
    finally:
        USER_ADD.reset(token)


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


@command("block_resize")
async def block_resize(ctx: CommandContext, args: Any) -> None:
    """Resize through a temporary unnamed backend holding RESIZE, as qsd does."""
    graph = ctx.daemon.graph
    node = graph.find(args.node_name) if args.node_name is not None else None
    if node is None:
        raise QmpError(
            f"Cannot find device='{args.device or ''}' nor node-name='{args.node_name or ''}'"
        )
    if args.size < 0:
        raise QmpError("Parameter 'size' expects a >0 size")
    if op_blocker(node) is not None:  # a backing node, a job's: qsd names the device (NULL)
        device = args.device if args.device is not None else "(null)"
        raise QmpError(f"Device '{device}' is in use")
    edge = graph.attach(UnnamedBackend(), node, "root", ChildRole.PRIMARY, Perm.RESIZE, PERM_ALL)
    try:
        await io.settled(node)  # (qsd drains the node first) no write lands past a new end
        await io.truncate(edge, args.size)
    except OSError as err:
        raise QmpError(err.strerror or os.strerror(err.errno or 0)) from err
    finally:
        graph.detach(edge)


@command("query-blockstats")
async def query_blockstats(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    query_nodes = bool(args is not None and args.query_nodes)
    return block_stats(ctx.daemon.graph, query_nodes)


@command("query-block")
async def query_block(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    # Like qsd: there are no guest devices, so no BlockInfo entries.
    return []


@command("blockdev-set-active")
async def blockdev_set_active(ctx: CommandContext, args: Any) -> None:
    await activity.set_active(ctx.daemon.graph, args.node_name, bool(args.active))


@command("x-query-block-node")
async def x_query_block_node(ctx: CommandContext, args: Any) -> dict[str, Any]:
    return query_block_node(ctx.daemon.graph, args.node_name)
