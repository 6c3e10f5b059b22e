"""Character devices from typed options: every --chardev form and chardev-add end here.

Edge ring (the file backend opens files; the ring buffer lives here too). Invariant: the
legacy QemuOpts parameters, the flat typed syntax (keyval or JSON) and chardev-add's wrapped
JSON are each turned into one visited `ChardevBackend` model first; only `create_chardev()`
builds Chardev objects from such a model, so the command line and QMP create identical devices.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

from storage_daemon.errors import QmpError
from storage_daemon.hostpath import host_path
from storage_daemon.keyval import (
    parse_bool,
    parse_json_option,
    parse_keyval,
    parse_size,
    parse_uint,
)
from storage_daemon.monitor.chardev import (
    Chardev,
    Connection,
    NullChardev,
    SocketChardev,
    StdioChardev,
    pump_in,
    pump_out,
)
from storage_daemon.qapi.runtime import TYPES, command_args, to_wire, visit_input

__all__ = [
    "BACKENDS",
    "LEGACY_KEYS",
    "FileChardev",
    "RingbufChardev",
    "add_chardev",
    "backend_from_flat",
    "backend_from_legacy",
    "create_chardev",
    "is_typed_chardev",
    "parse_typed_chardev",
]

# The backends we create, in the relative order qsd 7.2's query-chardev-backends lists them.
BACKENDS = ("null", "ringbuf", "stdio", "socket", "file", "memory")

# Legacy QemuOpts key -> the flat typed member it sets, per backend ("!nodelay": inverted).
_COMMON_KEYS = {"logfile": "logfile", "logappend": "logappend"}
LEGACY_KEYS: dict[str, dict[str, str]] = {
    "socket": _COMMON_KEYS
    | {
        "path": "addr.path",
        "abstract": "addr.abstract",
        "tight": "addr.tight",
        "host": "addr.host",
        "port": "addr.port",
        "to": "addr.to",
        "ipv4": "addr.ipv4",
        "ipv6": "addr.ipv6",
        "fd": "addr.str",
        "server": "server",
        "wait": "wait",
        "nodelay": "nodelay",
        "delay": "!nodelay",
        "telnet": "telnet",
        "tn3270": "tn3270",
        "websocket": "websocket",
        "reconnect": "reconnect",
        "tls-creds": "tls-creds",
        "tls-authz": "tls-authz",
    },
    "file": _COMMON_KEYS | {"path": "out", "append": "append"},
    "null": dict(_COMMON_KEYS),
    "stdio": _COMMON_KEYS | {"signal": "signal"},
    "ringbuf": _COMMON_KEYS | {"size": "size"},
    "memory": _COMMON_KEYS | {"size": "size"},
}

_DEFAULT_RINGBUF_SIZE = 65536


# ---- the three input forms -> a ChardevBackend model -----------------------------------------


def _legacy_bool(params: Mapping[str, str], key: str, default: bool) -> bool:
    value = params.get(key)
    return default if value is None else bool(parse_bool(value))


def backend_from_legacy(params: Mapping[str, str]) -> Any:
    """qsd's legacy parameters (already checked by cli.parse_chardev_legacy) -> ChardevBackend.

    Raises QmpError with qsd's texts for what its backends' parsers reject.
    """
    kind = params["backend"]
    data: dict[str, Any] = {}
    if "logfile" in params:
        data["logfile"] = params["logfile"]
    if "logappend" in params:
        data["logappend"] = _legacy_bool(params, "logappend", False)
    if kind == "socket":
        path, host, fd = params.get("path"), params.get("host"), params.get("fd")
        if path is not None:
            unix: dict[str, Any] = {"path": path}
            for key in ("abstract", "tight"):
                if key in params:
                    unix[key] = _legacy_bool(params, key, False)
            data["addr"] = {"type": "unix", "data": unix}
        elif host is not None:
            if "port" not in params:
                raise QmpError("chardev: socket: no port given")
            inet: dict[str, Any] = {"host": host, "port": params["port"]}
            if "to" in params:
                inet["to"] = parse_uint(params["to"])
            for key in ("ipv4", "ipv6"):
                if key in params:
                    inet[key] = _legacy_bool(params, key, False)
            data["addr"] = {"type": "inet", "data": inet}
        elif fd is not None:
            data["addr"] = {"type": "fd", "data": {"str": fd}}
        else:
            raise QmpError("Unable to parse FD number ")
        data["server"] = _legacy_bool(params, "server", False)
        data["wait"] = _legacy_bool(params, "wait", True)
        nodelay = _legacy_bool(params, "nodelay", False) or not _legacy_bool(params, "delay", True)
        data["nodelay"] = nodelay
        for key in ("telnet", "tn3270", "websocket"):
            data[key] = _legacy_bool(params, key, False)
        if "reconnect" in params:
            data["reconnect"] = parse_uint(params["reconnect"])
        for key in ("tls-creds", "tls-authz"):
            if key in params:
                data[key] = params[key]
    elif kind == "file":
        if "path" not in params:
            raise QmpError("chardev: file: no filename given")
        data["out"] = params["path"]
        if "append" in params:
            data["append"] = _legacy_bool(params, "append", False)
    elif kind == "stdio" and "signal" in params:
        data["signal"] = _legacy_bool(params, "signal", True)
    elif kind in ("ringbuf", "memory") and "size" in params:
        data["size"] = parse_size(params["size"])
    return visit_input("ChardevBackend", {"type": kind, "data": data})


def backend_from_flat(options: Any) -> tuple[str, Any]:
    """A visited ChardevOptions (flat) -> (id, ChardevBackend): the `data` wrappers put back."""
    wire = to_wire(options)
    chardev_id = wire.pop("id")
    kind = wire.pop("backend")
    if "addr" in wire:
        addr = wire["addr"]
        addr_type = addr.pop("type")
        wire["addr"] = {"type": addr_type, "data": addr}
    return chardev_id, visit_input("ChardevBackend", {"type": kind, "data": wire})


def _typed_only_keys() -> frozenset[str]:
    from storage_daemon.cli import CHARDEV_OPTS

    spec = TYPES["ChardevOptions"]
    names = {m.name for v in spec.variants for m in TYPES[v.type].members}
    return frozenset(names - set(CHARDEV_OPTS))


def _keys(text: str) -> list[str]:
    """The keys of a comma-separated `key=value` list (`,,` is a comma inside a value)."""
    keys: list[str] = []
    pos, n = 0, len(text)
    while pos < n:
        end = pos
        while end < n and text[end] not in "=,":
            end += 1
        if end < n and text[end] == "=":
            keys.append(text[pos:end])
            end += 1
            while end < n:
                if text[end] == ",":
                    if end + 1 < n and text[end + 1] == ",":
                        end += 2
                        continue
                    break
                end += 1
        pos = end + 1
    return keys


def is_typed_chardev(text: str) -> bool:
    """Whether a --chardev argument uses the typed syntax rather than qsd's legacy one.

    Typed: JSON (starts with `{`), or keyval with a key only the typed syntax has: a dotted
    key (`addr.type`, `addr.path`, ...) or `addr`, `in`, `out`. Anything else is legacy, so
    every command line qsd accepts means what it means to qsd.
    """
    if text.startswith("{"):
        return True
    typed = _typed_only_keys()
    return any("." in key or key in typed for key in _keys(text))


def parse_typed_chardev(text: str) -> tuple[str, Any]:
    """A typed --chardev argument -> (id, ChardevBackend model), schema-visitor errors.

    Accepts keyval (`socket,id=m,addr.type=unix,addr.path=/x`, implied key `backend`), the
    same flat structure as JSON, and chardev-add's own JSON (`{"id":..., "backend":
    {"type":..., "data": {...}}}`).
    """
    if text.startswith("{"):
        tree = parse_json_option(text)
        if isinstance(tree, dict) and isinstance(tree.get("backend"), dict):
            args = command_args("chardev-add", tree)
            return str(args.id), args.backend
        return backend_from_flat(visit_input("ChardevOptions", tree))
    tree = parse_keyval(text, "backend")
    return backend_from_flat(visit_input("ChardevOptions", tree, keyval=True))


# ---- construction --------------------------------------------------------------------------


def _unsupported(what: str) -> QmpError:
    return QmpError(f"{what} is not supported by this daemon")


def _kind(backend: Any) -> str:
    return str(getattr(backend.type, "value", backend.type))


def _check_common(data: Any) -> None:
    if data.logfile is not None:
        raise _unsupported("chardev option 'logfile'")


def _socket(chardev_id: str, data: Any, on_error: Callable[[str], None] | None) -> Chardev:
    addr = data.addr
    addr_type = str(getattr(addr.type, "value", addr.type))
    for name in ("telnet", "tn3270", "websocket"):
        if getattr(data, name):
            raise _unsupported(f"socket chardev option '{name}'")
    for field, name in (("tls_creds", "tls-creds"), ("tls_authz", "tls-authz")):
        if getattr(data, field) is not None:
            raise _unsupported(f"socket chardev option '{name}'")
    path = host = port = None
    if addr_type == "unix":
        if addr.data.abstract:
            raise _unsupported("an abstract unix socket address")
        path = addr.data.path
    elif addr_type == "inet":
        host, port = addr.data.host, addr.data.port
    else:
        raise _unsupported(f"a socket chardev on a '{addr_type}' address")
    server = True if data.server is None else bool(data.server)
    return SocketChardev(
        chardev_id,
        path=path,
        host=host,
        port=port,
        server=server,
        wait=True if data.wait is None else bool(data.wait),
        reconnect=int(data.reconnect or 0),
        on_error=on_error,
    )


async def create_chardev(
    existing: Mapping[str, Chardev],
    chardev_id: str,
    backend: Any,
    *,
    on_error: Callable[[str], None] | None = None,
) -> Chardev:
    """Build and start the chardev `backend` describes (not registered anywhere).

    `existing` is consulted for qsd's one-stdio rule. Raises QmpError with qsd's text where
    qsd has one, or a clear not-supported text for options this daemon lacks.
    """
    kind = _kind(backend)
    data = backend.data
    _check_common(data)
    chardev: Chardev
    if kind == "socket":
        chardev = _socket(chardev_id, data, on_error)
    elif kind == "stdio":
        if any(type(c) is StdioChardev for c in existing.values()):
            raise QmpError("cannot use stdio by multiple character devices")
        chardev = StdioChardev(chardev_id)
    elif kind == "file":
        chardev = FileChardev(chardev_id, out=data.out, in_=data.in_, append=bool(data.append))
    elif kind in ("ringbuf", "memory"):
        size = _DEFAULT_RINGBUF_SIZE if data.size is None else int(data.size)
        if size <= 0 or size & (size - 1):
            raise QmpError("size of ringbuf chardev must be power of two")
        chardev = RingbufChardev(chardev_id, size, kind=kind)
    elif kind == "null":
        chardev = NullChardev(chardev_id)
    else:  # the schema admits only what BACKENDS lists
        raise _unsupported(f"chardev backend '{kind}'")
    await chardev.start()
    return chardev


async def add_chardev(
    chardevs: dict[str, Chardev],
    chardev_id: str,
    backend: Any,
    *,
    on_error: Callable[[str], None] | None = None,
) -> Chardev:
    """chardev-add (and the typed --chardev): create, start and register, qsd's texts."""
    if chardev_id in chardevs:
        raise QmpError(f"Chardev with id '{chardev_id}' already exists")
    try:
        chardev = await create_chardev(chardevs, chardev_id, backend, on_error=on_error)
    except QmpError as err:
        raise QmpError(f"Failed to add chardev '{chardev_id}': {err.desc}") from err
    chardevs[chardev_id] = chardev
    return chardev


# ---- backends that live here ---------------------------------------------------------------


def _open(path: str, flags: int) -> int:
    try:
        return os.open(host_path(path), flags | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise QmpError(f"Could not open '{path}': {os.strerror(exc.errno or 0)}") from exc


class FileChardev(Chardev):
    """`file`: output to `out` (truncated or appended), input from `in` (default: none).

    A monitor on it reads commands from `in` and writes replies to `out` through a socketpair
    pumped by two threads (epoll cannot watch regular files); `close()` joins them, so every
    reply written before shutdown reaches the file."""

    def __init__(self, id: str, *, out: str, in_: str | None = None, append: bool = False) -> None:
        super().__init__(id)
        self.out, self.in_, self.append = out, in_, append
        self._fds: list[int] = []
        self._pumps: list[threading.Thread] = []
        self._used = False

    @property
    def filename(self) -> str:
        return "file"

    async def start(self) -> None:
        mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if self.append else os.O_TRUNC)
        out_fd = _open(self.out, mode)
        try:
            in_fd = _open(self.in_ if self.in_ is not None else os.devnull, os.O_RDONLY)
        except QmpError:
            os.close(out_fd)
            raise
        self._fds = [in_fd, out_fd]

    async def accept(self) -> Connection | None:
        if self._used or not self._fds:
            await self._wait_closed()
            return None
        self._used = True
        ours, theirs = socket.socketpair()
        in_fd, out_fd = self._fds
        self._pumps = [
            threading.Thread(target=pump_in, args=(in_fd, theirs), daemon=True),
            threading.Thread(target=pump_out, args=(theirs, out_fd), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()
        reader, writer = await asyncio.open_connection(sock=ours)
        return Connection(reader, writer, "file")

    async def close(self) -> None:
        await super().close()
        pumps, self._pumps = self._pumps, []
        for pump in pumps:  # the output pump ends once the monitor closed its end
            await asyncio.to_thread(pump.join, _PUMP_JOIN_TIMEOUT)
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


_PUMP_JOIN_TIMEOUT = 2.0


class RingbufChardev(Chardev):
    """`ringbuf` / `memory`: a byte ring of `size` (a power of two) bytes; when full, the
    oldest bytes are overwritten. Read and written with ringbuf-read / ringbuf-write; a
    monitor on it is silent (it never produces a connection)."""

    def __init__(
        self, id: str, size: int = _DEFAULT_RINGBUF_SIZE, *, kind: str = "ringbuf"
    ) -> None:
        super().__init__(id)
        self.kind = kind  # query-chardev's filename: the name it was created with
        self.size = size
        self._buf = bytearray(size)
        self._prod = 0
        self._cons = 0

    @property
    def filename(self) -> str:
        return self.kind

    def write(self, data: bytes) -> None:
        mask = self.size - 1
        for byte in data:
            self._buf[self._prod & mask] = byte
            self._prod += 1
        if self._prod - self._cons > self.size:
            self._cons = self._prod - self.size

    def read(self, count: int) -> bytes:
        mask = self.size - 1
        count = min(count, self._prod - self._cons)
        out = bytes(self._buf[(self._cons + i) & mask] for i in range(count))
        self._cons += count
        return out

    async def accept(self) -> Connection | None:
        await self._wait_closed()
        return None
