"""Chardev QMP commands in process: add/change/remove/send-break, queries, ring buffers.

Component ring: a real Daemon, commands through its dispatcher (schema-checked arguments);
each test shuts its daemon down, closing every chardev it made.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.monitor.dispatch import load_handlers
from storage_daemon.qapi.runtime import command_args, to_wire

# Import the handlers and build the lazily made models now, at collection, not inside the
# first test's event loop (which would trip the slow-callback detector).
load_handlers()
to_wire(command_args("chardev-add", {"id": "w", "backend": {"type": "null", "data": {}}}))


def backend(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def unix(path: Path | str) -> dict[str, Any]:
    return {"type": "unix", "data": {"path": str(path)}}


async def error(daemon: Daemon, name: str, args: dict[str, Any]) -> str:
    with pytest.raises(QmpError) as info:
        await daemon.run_command(name, args)
    return info.value.desc


async def test_backends_and_query(daemon: Daemon, scratch: Path) -> None:
    names = [b["name"] for b in await daemon.run_command("query-chardev-backends", None)]
    assert names == ["null", "ringbuf", "stdio", "socket", "file", "memory"]
    add = "chardev-add"
    assert await daemon.run_command(add, {"id": "n", "backend": backend("null")}) == {}
    await daemon.run_command(add, {"id": "f", "backend": backend("file", out=f"{scratch}/o")})
    await daemon.run_command(add, {"id": "r", "backend": backend("ringbuf", size=16)})
    sock = scratch / "s.sock"
    await daemon.run_command(
        add, {"id": "s", "backend": backend("socket", addr=unix(sock), wait=False)}
    )
    assert (scratch / "o").exists() and sock.exists()
    assert await daemon.run_command("query-chardev", None) == [
        {"label": "n", "filename": "null", "frontend-open": False},
        {"label": "f", "filename": "file", "frontend-open": False},
        {"label": "r", "filename": "ringbuf", "frontend-open": False},
        {"label": "s", "filename": f"disconnected:unix:{sock},server=on", "frontend-open": False},
    ]


async def test_add_errors(daemon: Daemon, scratch: Path) -> None:
    add = "chardev-add"
    await daemon.run_command(add, {"id": "c1", "backend": backend("null")})
    assert await error(daemon, add, {"id": "c1", "backend": backend("null")}) == (
        "Chardev with id 'c1' already exists"
    )
    assert await error(daemon, add, {"id": "c2", "backend": {"type": "null"}}) == (
        "Parameter 'backend.data' is missing"
    )
    assert await error(daemon, add, {"id": "c2", "backend": backend("pty")}) == (
        "Parameter 'type' does not accept value 'pty'"
    )
    assert await error(daemon, add, {"id": "c3", "backend": backend("ringbuf", size=1000)}) == (
        "Failed to add chardev 'c3': size of ringbuf chardev must be power of two"
    )
    out = "/nonexistent/out"
    assert await error(daemon, add, {"id": "c4", "backend": backend("file", out=out)}) == (
        f"Failed to add chardev 'c4': Could not open '{out}': No such file or directory"
    )
    missing = scratch / "nope.sock"
    args = {"id": "c5", "backend": backend("socket", addr=unix(missing), server=False)}
    assert await error(daemon, add, args) == (
        f"Failed to add chardev 'c5': Failed to connect to '{missing}': No such file or directory"
    )
    await daemon.run_command(add, {"id": "io", "backend": backend("stdio")})
    assert await error(daemon, add, {"id": "io2", "backend": backend("stdio")}) == (
        "Failed to add chardev 'io2': cannot use stdio by multiple character devices"
    )
    telnet = backend("socket", addr=unix(scratch / "t.sock"), telnet=True)
    assert "not supported" in await error(daemon, add, {"id": "t", "backend": telnet})
    assert [c["label"] for c in await daemon.run_command("query-chardev", None)] == ["c1", "io"]


async def test_remove_change_send_break(daemon: Daemon, scratch: Path) -> None:
    sock = scratch / "m.sock"
    await daemon.run_command(
        "chardev-add", {"id": "m0", "backend": backend("socket", addr=unix(sock), wait=False)}
    )
    daemon.add_monitor(daemon.chardevs["m0"], pretty=False, monitor_id=None)
    await daemon.run_command("chardev-add", {"id": "f", "backend": backend("null")})
    assert await error(daemon, "chardev-remove", {"id": "m0"}) == "Chardev 'm0' is busy"
    assert await error(daemon, "chardev-remove", {"id": "nosuch"}) == "Chardev 'nosuch' not found"
    assert await error(daemon, "chardev-send-break", {"id": "nosuch"}) == (
        "Chardev 'nosuch' not found"
    )
    assert await daemon.run_command("chardev-send-break", {"id": "m0"}) == {}
    null = backend("null")
    assert await error(daemon, "chardev-change", {"id": "nosuch", "backend": null}) == (
        "Chardev 'nosuch' does not exist"
    )
    assert await error(daemon, "chardev-change", {"id": "m0", "backend": null}) == (
        "Chardev user does not support chardev hotswap"
    )
    out = scratch / "changed"
    change = {"id": "f", "backend": backend("file", out=str(out))}
    assert await daemon.run_command("chardev-change", change) == {}
    assert out.exists()
    infos = await daemon.run_command("query-chardev", None)
    assert infos == [
        {"label": "m0", "filename": f"disconnected:unix:{sock},server=on", "frontend-open": True},
        {"label": "f", "filename": "file", "frontend-open": False},
    ]
    assert await daemon.run_command("chardev-remove", {"id": "f"}) == {}
    assert await error(daemon, "chardev-remove", {"id": "f"}) == "Chardev 'f' not found"


async def test_removed_socket_frees_its_path(daemon: Daemon, scratch: Path) -> None:
    sock = scratch / "s.sock"
    args = {"id": "s", "backend": backend("socket", addr=unix(sock), wait=False)}
    await daemon.run_command("chardev-add", args)
    client = socket.socket(socket.AF_UNIX)
    client.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(client, str(sock))
    finally:
        client.close()
    await daemon.run_command("chardev-remove", {"id": "s"})
    assert not sock.exists()
    await daemon.run_command("chardev-add", args)  # the id and the path are free again
    assert sock.exists()


async def test_ringbuf(daemon: Daemon) -> None:
    await daemon.run_command("chardev-add", {"id": "r", "backend": backend("memory", size=8)})
    await daemon.run_command("chardev-add", {"id": "n", "backend": backend("null")})
    write, read = "ringbuf-write", "ringbuf-read"
    await daemon.run_command(write, {"device": "r", "data": "hello"})
    assert await daemon.run_command(read, {"device": "r", "size": 3}) == "hel"
    assert await daemon.run_command(read, {"device": "r", "size": 100}) == "lo"
    assert await daemon.run_command(read, {"device": "r", "size": 100}) == ""
    await daemon.run_command(write, {"device": "r", "data": "0123456789"})  # overwrites
    assert await daemon.run_command(read, {"device": "r", "size": 100}) == "23456789"
    await daemon.run_command(write, {"device": "r", "data": "aGVsbG8=", "format": "base64"})
    assert await daemon.run_command(read, {"device": "r", "size": 9, "format": "base64"}) == (
        "aGVsbG8="
    )
    assert await error(daemon, read, {"device": "n", "size": 1}) == "n is not a ringbuf device"
    assert await error(daemon, write, {"device": "x", "data": ""}) == "Device 'x' not found"
    assert await error(daemon, read, {"device": "r", "size": 0}) == (
        "size must be greater than zero"
    )
    assert await error(daemon, write, {"device": "r", "data": "!!", "format": "base64"}) == (
        "Base64 data contains invalid characters"
    )
