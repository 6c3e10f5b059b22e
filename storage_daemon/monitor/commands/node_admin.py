"""Node administration commands: blockdev-reopen, block-set-write-threshold and
x-blockdev-set-iothread (domain ring).

Thin handlers: the work is in blockdev/reopen.py, write_threshold.py and iothread_binding.py.
Checks run in qsd's order, so that the first error a client sees is qsd's.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev import iothread_binding, write_threshold
from storage_daemon.blockdev.reopen import reopen
from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import CommandContext, command


@command("blockdev-reopen")
async def blockdev_reopen(ctx: CommandContext, args: Any) -> None:
    await reopen(ctx.daemon.graph, list(args.options))


@command("block-set-write-threshold")
async def block_set_write_threshold(ctx: CommandContext, args: Any) -> None:
    node = ctx.daemon.graph.find(args.node_name)
    if node is None:
        raise QmpError(f"Device '{args.node_name}' not found")
    write_threshold.set_threshold(node, args.write_threshold)


@command("x-blockdev-set-iothread")
async def x_blockdev_set_iothread(ctx: CommandContext, args: Any) -> None:
    node = ctx.daemon.graph.find(args.node_name)
    if node is None:
        raise QmpError(f"Failed to find node with node-name='{args.node_name}'")
    iothread_binding.check_movable(node, force=bool(args.force))
    iothread: str | None = args.iothread
    # qsd resolves "" to the objects container itself and takes it: so do we.
    if iothread and ctx.daemon.objects.type_of(iothread) != "iothread":
        raise QmpError(f"Cannot find iothread {iothread}")
    iothread_binding.bind(node, iothread)
