"""Character device commands: chardev-add/change/remove/send-break, queries, ring buffers.

Domain ring: handlers over `daemon.chardevs`; construction is `chardevs.add_chardev()`, the
path the typed --chardev takes too. Invariant: a chardev a monitor uses (`frontend` set) is
never removed or replaced; every error text is qsd 7.2's, compared live in
tests/compat/test_chardev_compat.py.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from storage_daemon.chardevs import BACKENDS, RingbufChardev, add_chardev, create_chardev
from storage_daemon.errors import QmpError
from storage_daemon.monitor.chardev import Chardev
from storage_daemon.monitor.dispatch import CommandContext, command


@command("query-chardev")
async def query_chardev(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    return [
        {"label": c.id, "filename": c.filename, "frontend-open": c.frontend_open}
        for c in ctx.daemon.chardevs.values()
    ]


@command("query-chardev-backends")
async def query_chardev_backends(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    return [{"name": name} for name in BACKENDS]


@command("chardev-add")
async def chardev_add(ctx: CommandContext, args: Any) -> dict[str, Any]:
    await add_chardev(ctx.daemon.chardevs, args.id, args.backend)
    return {}


@command("chardev-change")
async def chardev_change(ctx: CommandContext, args: Any) -> dict[str, Any]:
    chardevs = ctx.daemon.chardevs
    old = chardevs.get(args.id)
    if old is None:
        raise QmpError(f"Chardev '{args.id}' does not exist")
    if old.frontend is not None:
        raise QmpError("Chardev user does not support chardev hotswap")
    others = {k: v for k, v in chardevs.items() if k != args.id}
    new = await create_chardev(others, args.id, args.backend)
    chardevs[args.id] = new  # same key: query-chardev keeps its place
    await old.close()
    return {}


def _find(ctx: CommandContext, chardev_id: str) -> Chardev:
    chardev = ctx.daemon.chardevs.get(chardev_id)
    if chardev is None:
        raise QmpError(f"Chardev '{chardev_id}' not found")
    return chardev


@command("chardev-remove")
async def chardev_remove(ctx: CommandContext, args: Any) -> None:
    chardev = _find(ctx, args.id)
    if chardev.frontend is not None:
        raise QmpError(f"Chardev '{args.id}' is busy")
    del ctx.daemon.chardevs[args.id]
    await chardev.close()


@command("chardev-send-break")
async def chardev_send_break(ctx: CommandContext, args: Any) -> None:
    _find(ctx, args.id)  # a break means nothing to the backends we have (as with qsd's)


def _ringbuf(ctx: CommandContext, device: str) -> RingbufChardev:
    chardev = ctx.daemon.chardevs.get(device)
    if chardev is None:
        raise QmpError(f"Device '{device}' not found")
    if not isinstance(chardev, RingbufChardev):
        raise QmpError(f"{device} is not a ringbuf device")
    return chardev


def _is_base64(args: Any) -> bool:
    return str(getattr(args.format, "value", args.format)) == "base64"


@command("ringbuf-write")
async def ringbuf_write(ctx: CommandContext, args: Any) -> None:
    ring = _ringbuf(ctx, args.device)
    if _is_base64(args):
        try:
            data = base64.b64decode(args.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise QmpError("Base64 data contains invalid characters") from exc
    else:
        data = args.data.encode("utf-8", "surrogatepass")
    ring.write(data)


@command("ringbuf-read")
async def ringbuf_read(ctx: CommandContext, args: Any) -> str:
    ring = _ringbuf(ctx, args.device)
    if args.size <= 0:
        raise QmpError("size must be greater than zero")
    data = ring.read(args.size)
    if _is_base64(args):
        return base64.b64encode(data).decode("ascii")
    # qsd hands the bytes out as a C string: it ends at the first NUL
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")
