"""Block job and backing-chain commands: block-stream, block-commit, blockdev-snapshot,
change-backing-file.

Domain ring. The jobs check their arguments before they exist (no events for those errors);
graph changes go through chain.py, which keeps the image header and the graph in step.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev import chain
from storage_daemon.blockdev.jobs.commit import CommitJob
from storage_daemon.blockdev.jobs.stream import StreamJob
from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import CommandContext, command


@command("block-stream")
async def block_stream(ctx: CommandContext, args: Any) -> None:
    await ctx.daemon.jobs.launch(StreamJob(ctx.daemon, args))


@command("block-commit")
async def block_commit(ctx: CommandContext, args: Any) -> None:
    await ctx.daemon.jobs.launch(CommitJob(ctx.daemon, args))


@command("blockdev-snapshot")
async def blockdev_snapshot(ctx: CommandContext, args: Any) -> None:
    """Put `overlay` (a node without backing) on top of `node`, recording it in its header."""
    graph = ctx.daemon.graph
    node = graph.lookup(args.node)
    overlay = graph.lookup(args.overlay)
    for edge in node.parents:
        if edge.name == "backing" and edge.parent_node is not None:
            raise QmpError(
                f"Node '{node.name}' is busy: node is used as backing hd of "
                f"'{edge.parent_node.name}'"
            )
    if any(edge.parent_node is None for edge in overlay.parents):
        raise QmpError("The overlay is already in use")
    if not overlay.driver.supports_backing:
        raise QmpError("The overlay does not support backing images")
    if chain.cow_child(overlay) is not None:
        raise QmpError("The overlay already has a backing image")
    name, fmt = chain.backing_name_for(node)
    try:
        await chain.write_backing_name(overlay, name, fmt)
    except OSError as err:
        raise QmpError(f"Could not change the backing file: {err.strerror}") from err
    await chain.set_backing(graph, overlay, node)
    await chain.make_read_only(graph, node)


@command("change-backing-file")
async def change_backing_file(ctx: CommandContext, args: Any) -> None:
    graph = ctx.daemon.graph
    device = graph.lookup(args.device)
    image = graph.lookup_node_name(args.image_node_name)
    if not chain.contains(device, image):
        raise QmpError(f"Image '{args.image_node_name}' not found")
    if image.read_only:
        raise QmpError(f"Could not reopen '{image.name}' read-write")
    backing = chain.cow_child(image)
    fmt = backing.node.driver.format_name() if backing is not None else None
    try:
        await chain.write_backing_name(image, args.backing_file, fmt)
    except OSError as err:
        raise QmpError(f"Could not change the backing file to '{args.backing_file}'") from err
