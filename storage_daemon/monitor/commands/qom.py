"""QOM introspection: qom-list, qom-get, qom-set, qom-list-types, qom-list-properties.

Domain ring. The tree is qsd's: `/` holds the `objects` and `chardevs` containers, user objects
live at `/objects/ID`, chardevs at `/chardevs/ID`. Partial paths (`tg0`) name the one object
with that name. Invariant: unknown paths fail with DeviceNotFound `Device 'PATH' not found`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import CommandContext, command
from storage_daemon.qom.base import UserObject
from storage_daemon.qom.types import class_properties, list_types

if TYPE_CHECKING:
    from storage_daemon.daemon import Daemon


@dataclass
class _Container:
    path: str
    children: list[tuple[str, str]]  # (name, child QOM type)


def _chardev_type(chardev: Any) -> str:
    kind = getattr(chardev, "kind", None)
    if isinstance(kind, str):
        return f"chardev-{kind}"
    name = type(chardev).__name__.removesuffix("Chardev").lower()
    return f"chardev-{name or 'null'}"


def _objects(daemon: Daemon) -> _Container:
    return _Container(
        "/objects", [(oid, obj.qom_type) for oid, obj in daemon.objects.objects.items()]
    )


def _chardevs(daemon: Daemon) -> _Container:
    return _Container(
        "/chardevs", [(cid, _chardev_type(dev)) for cid, dev in daemon.chardevs.items()]
    )


def _root(daemon: Daemon) -> _Container:
    children = []
    if daemon.objects.container_created:
        children.append(("objects", "container"))
    if daemon.chardevs:
        children.append(("chardevs", "container"))
    return _Container("", children)


def _resolve(daemon: Daemon, path: str) -> _Container | UserObject | tuple[str, Any]:
    parts = [p for p in path.split("/") if p]
    if path.startswith("/"):
        if not parts:
            return _root(daemon)
        if parts[0] == "objects" and any(n == "objects" for n, _ in _root(daemon).children):
            if len(parts) == 1:
                return _objects(daemon)
            if len(parts) == 2 and parts[1] in daemon.objects.objects:
                return daemon.objects.objects[parts[1]]
        if parts[0] == "chardevs" and daemon.chardevs:
            if len(parts) == 1:
                return _chardevs(daemon)
            if len(parts) == 2 and parts[1] in daemon.chardevs:
                return (parts[1], daemon.chardevs[parts[1]])
    elif len(parts) == 1:
        return _resolve(daemon, _partial(daemon, parts[0], path))
    raise QmpError(f"Device '{path}' not found", error_class="DeviceNotFound")


def _partial(daemon: Daemon, name: str, path: str) -> str:
    hits = [f"/{c}" for c, _ in _root(daemon).children if c == name]
    if name in daemon.objects.objects:
        hits.append(f"/objects/{name}")
    if name in daemon.chardevs:
        hits.append(f"/chardevs/{name}")
    if len(hits) != 1:
        raise QmpError(f"Device '{path}' not found", error_class="DeviceNotFound")
    return hits[0]


@command("qom-list")
async def qom_list(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    target = _resolve(ctx.daemon, args.path)
    if isinstance(target, _Container):
        return [{"name": "type", "type": "string"}] + [
            {"name": name, "type": f"child<{kind}>"} for name, kind in target.children
        ]
    if isinstance(target, UserObject):
        return [{"name": n, "type": t} for n, t in target.property_names()]
    return [{"name": "type", "type": "string"}]


@command("qom-get")
async def qom_get(ctx: CommandContext, args: Any) -> Any:
    target = _resolve(ctx.daemon, args.path)
    prop = args.property
    if isinstance(target, UserObject):
        return target.get_property(prop)
    if isinstance(target, _Container):
        if prop == "type":
            return "container"
        for name, _ in target.children:
            if name == prop:
                return f"{target.path}/{name}"
        raise QmpError(f"Property 'container.{prop}' not found")
    kind = _chardev_type(target[1])
    if prop == "type":
        return kind
    raise QmpError(f"Property '{kind}.{prop}' not found")


@command("qom-set")
async def qom_set(ctx: CommandContext, args: Any) -> None:
    target = _resolve(ctx.daemon, args.path)
    prop = args.property
    if isinstance(target, UserObject):
        target.set_property(prop, args.value)
        return
    kind = "container" if isinstance(target, _Container) else _chardev_type(target[1])
    if prop == "type":
        raise QmpError(f"Property '{kind}.type' is not writable")
    if isinstance(target, _Container) and any(n == prop for n, _ in target.children):
        raise QmpError(f"Property '{kind}.{prop}' is not writable")
    raise QmpError(f"Property '{kind}.{prop}' not found")


@command("qom-list-types")
async def qom_list_types(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    return list_types(args.implements, bool(args.abstract))


@command("qom-list-properties")
async def qom_list_properties(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    return class_properties(args.typename)
