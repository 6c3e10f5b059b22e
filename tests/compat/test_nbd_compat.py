"""NBD server and block export commands: QMP transcripts run on qsd 7.2 and on ours, compared.

Test ring (compat). Each test starts a fresh pair of daemons (stopped by PID at teardown); the
expected replies are the reference's, live. Clients that must be connected while a command
runs (safe/hard export removal) are raw NBD sockets driven the same way on both sides.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import (
    Cmd,
    Compat,
    StepLike,
    WaitEvent,
    all_of,
    canonical,
    diff_text,
    make_raw_image,
    normalise_transcript,
    run_transcript,
)

pytestmark = pytest.mark.compat

UNIX = {"type": "unix", "data": {"path": "$D/nbd.sock"}}
START = Cmd("nbd-server-start", {"addr": UNIX})
QUERY = Cmd("query-block-exports")


def null(name: str, **opts: Any) -> Cmd:
    return Cmd("blockdev-add", {"driver": "null-co", "node-name": name, **opts})


def export(export_id: str, node: str, **opts: Any) -> Cmd:
    return Cmd("block-export-add", {"type": "nbd", "id": export_id, "node-name": node, **opts})


def test_without_server(compat: Compat) -> None:
    compat.check_transcript(
        [
            null("n"),
            null("ro", **{"read-only": True}),
            QUERY,
            Cmd("nbd-server-stop"),
            export("e0", "n"),
            export("e0", "nope"),
            export("", "n"),
            export("1bad", "n"),
            export("e0", "ro", writable=True),
            export("e0", "ro", writable=True, iothread="x"),
            export("e0", "n", iothread="nope"),
            export("e0", "n", bitmaps=["b"]),
            Cmd("nbd-server-add", {"device": "nope"}),
            Cmd("nbd-server-add", {"device": "n"}),
            Cmd("nbd-server-remove", {"name": "n"}),
            Cmd("block-export-del", {"id": "n"}),
            Cmd("block-export-del", {"id": "n", "mode": "hard"}),
            QUERY,
        ]
    )


def test_server_start_errors(compat: Compat) -> None:
    unix = {"type": "unix", "data": {"path": "$D/nbd.sock"}}
    compat.check_transcript(
        [
            Cmd("nbd-server-start", {"addr": {"type": "unix", "path": "$D/nbd.sock"}}),
            Cmd("nbd-server-start", {"addr": unix, "max-connections": -1}),
            Cmd("nbd-server-start", {"addr": unix, "max-connections": 1 << 32}),
            Cmd("nbd-server-start", {"addr": unix, "bogus": 1}),
            Cmd("nbd-server-start", {"addr": unix, "tls-creds": "nope"}),
            Cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/nonexistent/s"}}}),
            Cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "x" * 200}}}),
            Cmd("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "3"}}}),
            Cmd(
                "nbd-server-start",
                {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "notaport"}}},
            ),
            Cmd(
                "nbd-server-start",
                {"addr": {"type": "inet", "data": {"host": "::1", "port": "0", "ipv4": True}}},
            ),
            Cmd("object-add", {"qom-type": "iothread", "id": "io0"}),
            Cmd("nbd-server-start", {"addr": unix, "tls-creds": "io0"}),
            Cmd("nbd-server-start", {"addr": unix, "tls-authz": "nope", "max-connections": 0}),
            Cmd("nbd-server-start", {"addr": unix}),
            Cmd("nbd-server-stop"),
            Cmd("nbd-server-stop"),
            Cmd(
                "nbd-server-start",
                {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}},
            ),
            Cmd("nbd-server-stop"),
        ]
    )


def test_export_lifecycle(compat: Compat) -> None:
    compat.check_transcript(
        [
            null("n"),
            null("m"),
            null("ro", **{"read-only": True}),
            START,
            export("e0", "n"),
            export("e0", "m"),
            export("e1", "m", name="n"),
            export("e1", "ro", writable=True, name="n"),
            export("e1", "m", name="x" * 4097),
            export("e1", "m", description="d" * 4097),
            export("e1", "m", bitmaps=["b"]),
            export("e1", "m", bitmaps=[{"node": "nope", "name": "b"}]),
            export("e1", "m", bitmaps=[{"node": "m", "name": "b"}]),
            export("e1", "m", name="", description="empty name", writable=True),
            export("e2", "ro", name="x" * 4096, **{"allocation-depth": True}),
            export("e3", "m", name="wt", writable=True, writethrough=True),
            Cmd("object-add", {"qom-type": "iothread", "id": "io0"}),
            export("e4", "m", name="io", iothread="io0", **{"fixed-iothread": True}),
            QUERY,
            Cmd("blockdev-del", {"node-name": "n"}),
            Cmd("block-export-del", {"id": "e0"}),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            Cmd("block-export-del", {"id": "e0"}),
            Cmd("blockdev-del", {"node-name": "n"}),
            Cmd("nbd-server-add", {"device": "m"}),
            Cmd("nbd-server-add", {"device": "m", "name": "a", "writable": True}),
            Cmd("nbd-server-add", {"device": "ro", "name": "b", "writable": True}),
            Cmd("nbd-server-add", {"device": "m", "name": "c", "bitmap": "zz"}),
            Cmd("nbd-server-add", {"device": "m", "name": "e3"}),
            QUERY,
            Cmd("nbd-server-remove", {"name": "a"}),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            Cmd("nbd-server-remove", {"name": "a", "mode": "hard"}),
            Cmd("block-export-del", {"id": "b", "mode": "hard"}),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            Cmd("nbd-server-stop"),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            QUERY,
            Cmd("blockdev-del", {"node-name": "m"}),
        ]
    )


def _qcow2_image(d: Path) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(d / "img.qcow2"), "1M"], check=True
    )


def test_permission_conflicts(compat: Compat) -> None:
    """An export is "an unnamed block device" in conflict messages, as in qsd."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "$D/img.qcow2"}),
            Cmd("blockdev-add", {"driver": "file", "node-name": "f1", "filename": "$D/img.raw"}),
            START,
            export("e0", "f0", writable=True),
            Cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0"}),
            Cmd("block-export-del", {"id": "e0"}),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            Cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0"}),
            export("e0", "f0", writable=True),
            export("e0", "f0"),
            export("e1", "f1", writable=True),
            export("e2", "f1"),
            QUERY,
        ],
        setup=all_of(_qcow2_image, make_raw_image),
    )


# -- removal while a client is connected ------------------------------------------------------

_IHAVEOPT = 0x49484156454F5054


def _nbd_go(path: Path, name: str) -> socket.socket:
    """A raw client that has chosen `name` (fixed newstyle, NBD_OPT_GO) and stays connected."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    greeting = _recv(sock, 18)
    assert greeting[:8] == b"NBDMAGIC", greeting
    sock.sendall(struct.pack(">I", 3))
    raw = name.encode()
    payload = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", _IHAVEOPT, 7, len(payload)) + payload)
    while True:
        _, _, rep, length = struct.unpack(">QIII", _recv(sock, 20))
        _recv(sock, length)
        if rep == 1:  # ACK: transmission starts
            return sock
        assert rep == 3, hex(rep)  # NBD_REP_INFO


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("server closed the connection")
        data += chunk
    return data


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def test_removal_with_clients(compat: Compat) -> None:
    """Safe removal refuses while a client uses the export; hard removal drops the client."""
    pair = compat.daemons(
        [
            "--blockdev",
            "driver=null-co,node-name=n",
            "--nbd-server",
            "addr.type=unix,addr.path=$D/nbd.sock",
            "--export",
            "type=nbd,id=e0,node-name=n",
            "--export",
            "type=nbd,id=e1,node-name=n,name=other",
        ]
    )
    norm: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        first = _nbd_go(daemon.workdir / "nbd.sock", "n")
        second = _nbd_go(daemon.workdir / "nbd.sock", "other")
        steps: list[StepLike] = [
            Cmd("block-export-del", {"id": "e0"}),
            Cmd("nbd-server-remove", {"name": "e0"}),
            QUERY,
            Cmd("block-export-del", {"id": "e0", "mode": "hard"}),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            QUERY,
            Cmd("nbd-server-stop"),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            QUERY,
        ]
        records = run_transcript(client, daemon, steps, daemon.workdir)
        records.append({"first-dropped": _closed_by_server(first)})
        records.append({"second-dropped": _closed_by_server(second)})
        first.close()
        second.close()
        norm[side] = normalise_transcript(records, daemon.workdir)
    ref, ours = norm["reference"], norm["ours"]
    assert [canonical(r) for r in ref] == [canonical(r) for r in ours], diff_text(ref, ours)


def test_debug_graph_shows_exports_as_backends(compat: Compat) -> None:
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "n0"}),
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "n1"}),
            Cmd("nbd-server-start", {"addr": UNIX}),
            Cmd(
                "block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0", "writable": True}
            ),
            Cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "n1"}),
            Cmd("x-debug-query-block-graph"),
        ]
    )
