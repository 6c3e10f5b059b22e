"""Block export and NBD server commands: nbd-server-start/stop, block-export-add/del, ...

Domain ring (the listening itself is the NBD server edge's). Checks run in qsd 7.2's order with
its texts, measured against the reference: export id, node, read-only node as writable,
iothread, permissions (the graph), then the NBD server's own checks (running, name and
description length, duplicate name, bitmaps). `--nbd-server` and `--export` reach the same
handlers with the flat socket address and keyval-typed options.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev import activity, chain, io
from storage_daemon.blockdev.bitmaps import registry as bitmap_registry
from storage_daemon.blockdev.bitmaps.registry import DirtyBitmap
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.transaction import drain_twice
from storage_daemon.errors import QmpError
from storage_daemon.export.nbd.handshake import ExportInfo
from storage_daemon.export.nbd.listen import Endpoint
from storage_daemon.export.nbd.server import (
    DEFAULT_MAX_CONNECTIONS,
    NbdExport,
    NbdServer,
    check_export_strings,
)
from storage_daemon.monitor.dispatch import CommandContext, command


def _wire(value: Any) -> Any:
    return getattr(value, "value", value)


def endpoint_of(addr: Any) -> Endpoint:
    """SocketAddressLegacy (members under `.data`) or flat SocketAddress -> Endpoint."""
    kind = str(_wire(addr.type))
    data = getattr(addr, "data", addr)
    if kind == "unix":
        return Endpoint("unix", path=data.path, abstract=bool(data.abstract))
    if kind == "inet":
        return Endpoint(
            "inet", host=data.host, port=data.port, to=data.to, ipv4=data.ipv4, ipv6=data.ipv6
        )
    if kind == "vsock":
        return Endpoint("vsock", cid=data.cid, port=data.port)
    return Endpoint("fd", fd=data.str_)


@command("nbd-server-start")
async def nbd_server_start(ctx: CommandContext, args: Any) -> None:
    daemon = ctx.daemon
    if daemon.nbd_server is not None:
        raise QmpError("NBD server already running")
    # `--nbd-server` gives the flat SocketAddress (no `.data`); only QMP can pass fds by name.
    from_monitor = hasattr(args.addr, "data")
    max_connections = args.max_connections
    if max_connections is None:
        max_connections = DEFAULT_MAX_CONNECTIONS
    server = NbdServer(max_connections=max_connections, started=ctx.daemon.started)
    await server.start(endpoint_of(args.addr), from_monitor=from_monitor)
    try:
        if args.tls_creds is not None:
            _check_tls_creds(ctx, args.tls_creds)
    except BaseException:
        await server.stop()
        raise
    daemon.nbd_server = server


def _check_tls_creds(ctx: CommandContext, creds_id: str) -> None:
    if creds_id not in ctx.daemon.objects.objects:
        raise QmpError(f"No TLS credentials with id '{creds_id}'")
    # No TLS credential object types exist yet: any other object is the wrong kind.
    raise QmpError(f"Object with id '{creds_id}' is not TLS credentials")


@command("nbd-server-stop")
async def nbd_server_stop(ctx: CommandContext, args: Any) -> None:
    server = ctx.daemon.nbd_server
    if server is None:
        raise QmpError("NBD server not running")
    ctx.daemon.nbd_server = None
    await server.stop()


@command("block-export-add")
async def block_export_add(ctx: CommandContext, options: Any) -> None:
    await add_nbd_export(
        ctx,
        export_id=options.id,
        node_name=options.node_name,
        writable=bool(options.writable),
        writethrough=bool(options.writethrough),
        iothread=options.iothread,
        name=options.name,
        description=options.description,
        bitmaps=list(options.bitmaps or []),
        allocation_depth=bool(options.allocation_depth),
        allow_inactive=bool(getattr(options, "allow_inactive", None)),
    )


async def add_nbd_export(
    ctx: CommandContext,
    *,
    export_id: str,
    node_name: str,
    writable: bool,
    writethrough: bool,
    iothread: str | None,
    name: str | None,
    description: str | None,
    bitmaps: list[Any],
    allocation_depth: bool,
    allow_inactive: bool = False,
) -> None:
    daemon = ctx.daemon
    daemon.exports.check_new_id(export_id)
    node = daemon.graph.lookup_node_name(node_name)
    if not allow_inactive:
        # QEMU 10.0: an export activates its node (errors ignored, as there; a node that
        # stays inactive then refuses the export's permissions).
        try:
            await activity.activate(daemon.graph, node)
        except QmpError:
            pass
    if writable and node.read_only:
        raise QmpError("Cannot export read-only node as writable")
    if iothread is not None and daemon.objects.type_of(iothread) != "iothread":
        raise QmpError(f'iothread "{iothread}" not found')
    server = daemon.nbd_server
    export = NbdExport(
        export_id,
        node,
        writable=writable,
        writethrough=writethrough,
        server=server,  # type: ignore[arg-type]  # checked below, after the permissions
    )
    export.allow_inactive = allow_inactive
    export.attach(daemon.graph)
    try:
        if server is None:
            raise QmpError("NBD server not running")
        # C strings end at the first NUL; so do qsd's names.
        name = (node_name if name is None else name).split("\0", 1)[0]
        text = (description or "").split("\0", 1)[0]
        check_export_strings(name, text)
        if server.find_export(name) is not None:
            raise QmpError(f"NBD server already has export named '{name}'")
        export.forbid_resize(daemon.graph)
        found = [_find_bitmap(ctx, node, bitmap, writable) for bitmap in bitmaps]
        assert export.edge is not None
        info = ExportInfo(
            name=name,
            size=io.length(export.edge),
            description=text,
            read_only=not writable,
            can_multi_conn=server.max_connections != 1,
            allocation_depth=allocation_depth,
            bitmaps=tuple(b.name for b in found),
        )
    except BaseException:
        if export.edge is not None:
            daemon.graph.detach(export.edge)
            export.edge = None
        raise
    daemon.exports.register(export)
    export.hold_bitmaps(found)
    export.publish(info)


def _find_bitmap(ctx: CommandContext, node: BlockNode, bitmap: Any, writable: bool) -> DirtyBitmap:
    """An exported bitmap, with qsd's checks and texts: a bare name is looked for on the
    node and down its filters and backing files; a {node, name} pair names it directly."""
    if isinstance(bitmap, str):
        owner: BlockNode | None = node
        found = None
        while owner is not None and found is None:
            found = bitmap_registry.find(owner, bitmap)
            if found is None:
                owner = chain.below(owner)
        if found is None or owner is None:
            raise QmpError(f"Bitmap '{bitmap}' is not found")
        # qsd checks this for a name found on a writable node only, never for a pair.
        if not writable and not owner.read_only and found.enabled:
            raise QmpError(f"Enabled bitmap '{found.name}' incompatible with readonly export")
    else:
        found = bitmap_registry.lookup(ctx.daemon.graph, bitmap.node, bitmap.name)[1]
    found.check_usable(allow_ro=True)
    return found


@command("block-export-del")
async def block_export_del(ctx: CommandContext, args: Any) -> None:
    hard = args.mode is not None and str(_wire(args.mode)) == "hard"
    exports = ctx.daemon.exports
    export = exports.find(args.id)
    if (
        export is not None
        and export.edge is not None
        and not export.shutting_down
        and export.clients == 0
    ):
        # Deleted at once: as qsd's removal of the export's backend, the jobs above the node
        # pause and resume twice first. (With clients, qsd drains when the last one leaves;
        # not modelled.)
        await drain_twice(export.edge.node)
    exports.delete(args.id, hard)


@command("query-block-exports")
async def query_block_exports(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    return ctx.daemon.exports.query()


@command("nbd-server-add")
async def nbd_server_add(ctx: CommandContext, args: Any) -> None:
    """Deprecated: an NBD export whose id is its name; a read-only node is exported read-only."""
    node = ctx.daemon.graph.lookup(args.device)
    name = args.device if args.name is None else args.name
    await add_nbd_export(
        ctx,
        export_id=name,
        node_name=node.name,
        writable=bool(args.writable) and not node.read_only,
        writethrough=False,
        iothread=None,
        name=name,
        description=args.description,
        bitmaps=[] if args.bitmap is None else [args.bitmap],
        allocation_depth=False,
    )


@command("nbd-server-remove")
async def nbd_server_remove(ctx: CommandContext, args: Any) -> None:
    export = ctx.daemon.exports.find(args.name)
    if export is None:
        raise QmpError(f"Export '{args.name}' is not found")
    if not isinstance(export, NbdExport):
        raise QmpError(f"Export '{args.name}' is not an NBD export")
    hard = args.mode is not None and str(_wire(args.mode)) == "hard"
    ctx.daemon.exports.delete(args.name, hard)
