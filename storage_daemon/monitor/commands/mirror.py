"""blockdev-mirror and drive-mirror.

Domain ring. The checks qsd makes before its job exists run here and in MirrorJob's
constructor, in qsd's order, so their errors come without job events; drive-mirror first
creates (or opens) the target image, and closes it again if the job cannot start.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev.graph import check_not_blocked
from storage_daemon.blockdev.jobs.mirror import MirrorJob, root_node, wire
from storage_daemon.blockdev.jobs.mirror_drive import open_drive_target
from storage_daemon.monitor.dispatch import CommandContext, command


@command("blockdev-mirror")
async def blockdev_mirror(ctx: CommandContext, args: Any) -> None:
    graph = ctx.daemon.graph
    source = root_node(graph, args.device)
    target = graph.lookup(args.target)
    check_not_blocked(target)  # qsd's op blockers: held by a job, or a backing file
    job = MirrorJob(
        ctx.daemon,
        args,
        source,
        target,
        zero_target=wire(args.sync) == "full",
        filter_node_name=args.filter_node_name,
    )
    await ctx.daemon.jobs.launch(job)


@command("drive-mirror")
async def drive_mirror(ctx: CommandContext, args: Any) -> None:
    graph = ctx.daemon.graph
    source = root_node(graph, args.device)
    target, zero_target, backing = await open_drive_target(ctx.daemon, source, args)
    try:
        job = MirrorJob(
            ctx.daemon,
            args,
            source,
            target,
            zero_target=zero_target,
            unmap=args.unmap is not False,
            owned_target=True,
            target_backing=backing,
        )
        await ctx.daemon.jobs.launch(job)
    except BaseException:
        if not target.parents:
            await graph.remove(target)
        raise
