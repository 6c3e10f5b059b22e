"""Listening sockets for the NBD server: address resolution and binding with qsd's texts.

Edge ring (sockets, getaddrinfo, the file system for unix socket paths). Invariant: every
failure is a `QmpError` worded as qsd 7.2 words it, and every socket this module created is
closed (and every unix socket file it created is unlinked) by `close_listeners`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from dataclasses import dataclass

from storage_daemon.errors import QmpError
from storage_daemon.hostpath import host_path

_UNIX_PATH_MAX = 108
BACKLOG = 128


@dataclass(frozen=True)
class Endpoint:
    """A listening address, from SocketAddressLegacy (QMP) or SocketAddress (command line)."""

    kind: str  # unix | inet | vsock | fd
    path: str = ""
    abstract: bool = False
    host: str = ""
    port: str = ""
    to: int | None = None
    ipv4: bool | None = None
    ipv6: bool | None = None
    cid: str = ""
    fd: str = ""


@dataclass
class Listener:
    """One bound, listening socket; `unix_path` is set when we created that file."""

    sock: socket.socket
    unix_path: str | None = None
    unix_ino: int | None = None


def _strerror(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else str(err)


async def open_listeners(endpoint: Endpoint, *, from_monitor: bool) -> list[Listener]:
    """Bind and listen on `endpoint`; non-blocking sockets, ready for `sock_accept`."""
    if endpoint.kind == "unix":
        listeners = [_bind_unix(endpoint)]
    elif endpoint.kind == "inet":
        listeners = await _bind_inet(endpoint)
    elif endpoint.kind == "vsock":
        listeners = [_bind_vsock(endpoint)]
    else:
        listeners = [_adopt_fd(endpoint, from_monitor)]
    for listener in listeners:
        listener.sock.setblocking(False)
    return listeners


def close_listeners(listeners: list[Listener]) -> None:
    """Close the sockets and remove the unix socket files we created (qsd leaves them)."""
    for listener in listeners:
        listener.sock.close()
        path = listener.unix_path
        if path is None:
            continue
        with contextlib.suppress(OSError):
            # Only our own socket: someone may have replaced the file meanwhile.
            if os.lstat(path).st_ino == listener.unix_ino:
                os.unlink(path)


def _bind_unix(endpoint: Endpoint) -> Listener:
    path = endpoint.path
    if len(path.encode()) >= _UNIX_PATH_MAX:
        raise QmpError(
            f"UNIX socket path '{path}' is too long",
            hint=f"Path must be less than {_UNIX_PATH_MAX} bytes",
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if endpoint.abstract:
            sock.bind("\0" + path)
            sock.listen(BACKLOG)
            return Listener(sock)
        host = host_path(path)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(host).st_mode):
                os.unlink(host)  # a stale socket file: qsd unlinks it too
        try:
            sock.bind(host)
        except OSError as err:
            raise QmpError(f"Failed to bind socket to {path}: {_strerror(err)}") from err
        ino = os.lstat(host).st_ino
        sock.listen(BACKLOG)
        return Listener(sock, host, ino)
    except BaseException:
        sock.close()
        raise


async def _bind_inet(endpoint: Endpoint) -> list[Listener]:
    family = socket.AF_UNSPEC
    if endpoint.ipv4 and not endpoint.ipv6:
        family = socket.AF_INET
    elif endpoint.ipv6 and not endpoint.ipv4:
        family = socket.AF_INET6
    loop = asyncio.get_running_loop()
    host = endpoint.host or None
    try:
        infos = await loop.getaddrinfo(
            host, endpoint.port, family=family, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise QmpError(
            f"address resolution failed for {endpoint.host}:{endpoint.port}: {err.strerror}"
        ) from err
    listeners: list[Listener] = []
    first_error: QmpError | None = None
    seen: set[tuple[int, object]] = set()
    for fam, kind, proto, _, addr in infos:
        if (fam, addr) in seen:
            continue
        seen.add((fam, addr))
        try:
            listeners.append(_bind_one_inet(fam, kind, proto, addr, endpoint.to))
        except QmpError as err:
            first_error = first_error or err
    if not listeners:
        raise first_error or QmpError("Failed to find an available port")
    return listeners


def _bind_one_inet(
    fam: int, kind: int, proto: int, addr: tuple[object, ...], to: int | None
) -> Listener:
    host, port = addr[0], int(str(addr[1]))
    last = to if to is not None and to > port else port
    error: OSError | None = None
    for candidate in range(port, last + 1):
        sock = socket.socket(fam, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, candidate, *addr[2:]))
            sock.listen(BACKLOG)
            return Listener(sock)
        except OSError as err:
            sock.close()
            error = err
    assert error is not None
    raise QmpError(f"Failed to find an available port: {_strerror(error)}") from error


def _bind_vsock(endpoint: Endpoint) -> Listener:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise QmpError("vsock is not supported on this host")
    try:
        cid, port = int(endpoint.cid), int(endpoint.port)
    except ValueError as err:
        raise QmpError(f"Failed to parse cid '{endpoint.cid}' or port '{endpoint.port}'") from err
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((cid, port))
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise QmpError(f"Failed to bind socket: {_strerror(err)}") from err
    return Listener(sock)


def _adopt_fd(endpoint: Endpoint, from_monitor: bool) -> Listener:
    """A listening socket inherited by number (command line only, as in qsd)."""
    if from_monitor:
        raise QmpError("only QEMU supports file descriptor passing")
    text = endpoint.fd
    if not text.isdigit():
        raise QmpError(f"Unable to parse FD number {text}")
    fd = int(text)
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError as err:
        raise QmpError(f"File descriptor '{text}' is not a socket") from err
    if not is_socket:
        raise QmpError(f"File descriptor '{text}' is not a socket")
    return Listener(socket.socket(fileno=fd))
