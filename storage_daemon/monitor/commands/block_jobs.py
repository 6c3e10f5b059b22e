"""Block job and backing-chain commands: block-stream, block-commit, blockdev-snapshot,
change-backing-file.

Domain ring. The jobs check their arguments before they exist (no events for those errors);
graph changes go through chain.py, which keeps the image header and the graph in step.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev import chain
from storage_daemon.blockdev.jobs.commit import new_commit_job
from storage_daemon.blockdev.jobs.stream import StreamJob
from storage_daemon.blockdev.transaction import run_transaction
from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import CommandContext, command


@command("block-stream")
async def block_stream(ctx: CommandContext, args: Any) -> None:
    await ctx.daemon.jobs.launch(await StreamJob.create(ctx.daemon, args))


@command("block-commit")
async def block_commit(ctx: CommandContext, args: Any) -> None:
    await ctx.daemon.jobs.launch(new_commit_job(ctx.daemon, args))


@command("blockdev-snapshot")
async def blockdev_snapshot(ctx: CommandContext, args: Any) -> None:
    """Put `overlay` (a node without backing) on top of `node`, in its place: a transaction of
    one action, as in qsd (blockdev/snapshot.py). Like qsd, the overlay's header is not
    changed: the backing link lives in the graph only."""
    await run_transaction(ctx.daemon, [("blockdev-snapshot", args)])


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
