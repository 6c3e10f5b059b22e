"""x-blockdev-amend and x-blockdev-change, the unstable node-changing commands of qsd 7.2.

Domain ring. Both make qsd's checks in qsd's order with its texts. Invariant: x-blockdev-change
never changes the graph: only quorum nodes accept it in qsd, and this daemon has none.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev.jobs.amend import AmendJob, check_amend
from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import CommandContext, command


@command("x-blockdev-amend")
async def x_blockdev_amend(ctx: CommandContext, args: Any) -> None:
    node = ctx.daemon.graph.lookup_node_name(args.node_name)
    amender = check_amend(node, args.options)
    jobs = ctx.daemon.jobs
    job = AmendJob(jobs, args.job_id, node, args.options, amender, bool(args.force))
    await jobs.launch(job)


@command("x-blockdev-change")
async def x_blockdev_change(ctx: CommandContext, args: Any) -> None:
    graph = ctx.daemon.graph
    parent = graph.lookup(args.parent)
    if (args.child is None) == (args.node is None):
        if args.child is not None:
            raise QmpError("The parameters child and node are in conflict")
        raise QmpError("Either child or node must be specified")
    if args.child is not None:
        if parent.child(args.child) is None:
            raise QmpError(f"Node '{args.parent}' does not have child '{args.child}'")
        raise QmpError(f"The node {parent.name} does not support removing a child")
    if graph.find(args.node) is None:
        raise QmpError(f"Node '{args.node}' not found")
    raise QmpError(f"The node {parent.name} does not support adding a child")
