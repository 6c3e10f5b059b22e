"""NBD server and block export commands: QMP transcripts run on qsd 7.2 and on ours, compared.

Test ring (compat). Each test starts a fresh pair of daemons (stopped by PID at teardown); the
expected replies are the reference's, live. Clients that must be connected while a command
runs (safe/hard export removal) are raw NBD sockets driven the same way on both sides.
"""

from __future__ import annotations

import os
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


# -- what clients see: block sizes, errno values, the first block of a grown file -------------

NBD_PYTHON = "/usr/bin/python3"  # as nbdsh does: the system interpreter has libnbd's bindings


def _libnbd(script: str, *args: str) -> str:
    """Run a libnbd client script with the system interpreter; its stdout."""
    probe = subprocess.run([NBD_PYTHON, "-c", "import nbd"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("libnbd's Python bindings (nbdsh) are not installed")
    done = subprocess.run(
        [NBD_PYTHON, "-c", script, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


_BLOCK_SIZES = """
import nbd, sys
sock = sys.argv[1]
for name in sys.argv[2:]:
    for asked in (True, False):
        for op in ("info", "go"):
            h = nbd.NBD()
            h.set_opt_mode(True)
            h.set_request_block_size(asked)
            h.connect_unix(sock)
            h.set_export_name(name)
            try:
                getattr(h, "opt_" + op)()
                kinds = (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)
                got = [h.get_block_size(k) for k in kinds]
            except nbd.Error as e:
                got = "error %s" % e.errno
            print(name, asked, op, got)
            try:
                h.shutdown()
            except nbd.Error:
                pass
"""


def test_block_size_constraints(compat: Compat) -> None:
    """NBD_INFO_BLOCK_SIZE: the node's request alignment as the minimum (INFO, or a GO that
    asked), 1 otherwise; INFO without asking on an aligned export is refused."""
    pair = compat.daemons(
        [
            "--blockdev", "driver=file,node-name=f0,filename=$D/img.raw",
            "--blockdev", "driver=raw,node-name=raw0,file=f0",
            "--blockdev", "driver=file,node-name=f1,filename=$D/img.qcow2",
            "--blockdev", "driver=qcow2,node-name=q1,file=f1",
            "--blockdev", "driver=compress,node-name=c1,file=q1",
            "--blockdev",
            "driver=file,node-name=d0,filename=$D/img.raw,cache.direct=on,locking=off",
            "--blockdev", "driver=raw,node-name=rd0,file=d0",
            # O_DIRECT alignment probing: a file starting with data gives 512 here, one
            # starting with a hole MAX_ALIGN (a 1-byte read of a hole works).
            "--blockdev",
            "driver=file,node-name=d1,filename=$D/data.raw,cache.direct=on,locking=off",
            "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock",
            "--export", "type=nbd,id=e0,node-name=raw0,name=raw",
            "--export", "type=nbd,id=e1,node-name=q1,name=qcow2",
            "--export", "type=nbd,id=e2,node-name=c1,name=compress,writable=on",
            "--export", "type=nbd,id=e3,node-name=d0,name=direct",
            "--export", "type=nbd,id=e4,node-name=rd0,name=raw-direct",
            "--export", "type=nbd,id=e5,node-name=d1,name=data-direct",
            # blkdebug's limits: max-transfer caps the maximum, also seen through raw.
            "--blockdev", "driver=blkdebug,node-name=b0,image=f0,max-transfer=65536",
            "--blockdev", "driver=blkdebug,node-name=b1,image=f0,align=512,max-transfer=1048576",
            "--blockdev", "driver=raw,node-name=rb1,file=b1",
            "--export", "type=nbd,id=e6,node-name=b0,name=bd-max",
            "--export", "type=nbd,id=e7,node-name=b1,name=bd-align",
            "--export", "type=nbd,id=e8,node-name=rb1,name=raw-bd",
        ],
        setup=all_of(_qcow2_image, make_raw_image, _data_image),
    )  # fmt: skip
    names = ["raw", "qcow2", "compress", "direct", "raw-direct", "data-direct", "bd-max"]
    names += ["bd-align", "raw-bd"]
    out = {
        side: _libnbd(_BLOCK_SIZES, str(d.workdir / "nbd.sock"), *names) for side, d in pair.items()
    }
    assert out["ours"] == out["reference"]
    assert "compress True go [65536, 65536, 33554432]" in out["ours"]
    assert "direct True info [4096, 4096, 33554432]" in out["ours"]
    assert "data-direct True info [512, 4096, 33554432]" in out["ours"]
    assert "raw-bd True go [1, 4096, 1048576]" in out["ours"]


def _data_image(d: Path) -> None:
    (d / "data.raw").write_bytes(b"\xa5" * (1 << 20))


_ERRNOS = (
    "EIO", "ENOSPC", "EPERM", "EACCES", "EINVAL", "ENOMEM", "EFBIG", "EOVERFLOW", "ESHUTDOWN",
    "ENOTSUP", "EROFS", "EDQUOT", "ENOENT", "EAGAIN", "ECANCELED", "EBUSY",
)  # fmt: skip

_REQUEST_ERRORS = """
import errno, nbd, sys
def run(call):
    try:
        call()
        return "ok"
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, str(e.errno))
sock = sys.argv[1]
for name in sys.argv[2:]:
    got = []
    for structured in (False, True):
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        h.set_export_name(name)
        h.connect_unix(sock)
        if structured:  # qsd 7.2 drops a structured client after a failed read
            got += [run(lambda: h.pwrite(b"x" * 512, 0))]
        else:
            got += [run(lambda: h.pread(512, 0)), run(lambda: h.pwrite(b"x" * 512, 0))]
        try:
            h.shutdown()
        except nbd.Error:
            pass
    print(name, *got)
"""


def _errno_daemons(compat: Compat) -> dict[str, Any]:
    args = [
        "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock",
        # data, not a hole: qsd answers a structured read of a hole without reading it
        "--blockdev", "driver=file,node-name=f0,filename=$D/data.raw",
    ]  # fmt: skip
    for name in _ERRNOS:
        code = getattr(__import__("errno"), name)
        # raw over blkdebug: raw's reads and writes raise read_aio/write_aio on its child.
        args += [
            "--blockdev",
            f"driver=raw,node-name=n{name},file.driver=blkdebug,file.image=f0,"
            f"file.inject-error.0.event=read_aio,file.inject-error.0.errno={code},"
            f"file.inject-error.1.event=write_aio,file.inject-error.1.errno={code}",
            "--export",
            f"type=nbd,id=e{name},node-name=n{name},name={name},writable=on",
        ]
    return compat.daemons(args, setup=_data_image)


def test_errno_values_on_the_wire(compat: Compat) -> None:
    """Each host errno reaches the client as qsd maps it (EACCES, EAGAIN, ... as EINVAL)."""
    pair = _errno_daemons(compat)
    out = {
        side: _libnbd(_REQUEST_ERRORS, str(d.workdir / "nbd.sock"), *_ERRNOS)
        for side, d in pair.items()
    }
    assert out["ours"] == out["reference"]
    assert "EACCES EINVAL EINVAL EINVAL" in out["ours"].splitlines()


_FAILED_STRUCTURED_READ = """
import errno, nbd, sys
h = nbd.NBD()
h.set_export_name(sys.argv[2])
h.connect_unix(sys.argv[1])
for _ in range(2):
    try:
        h.pread(512, 0)
        print("ok")
    except nbd.Error as e:
        print(errno.errorcode.get(e.errno, e.errno))
"""


def test_failed_structured_read_keeps_the_connection(compat: Compat) -> None:
    """A deliberate difference: qsd 7.2 drops a structured-reply client whose READ failed
    (the client sees ENOTCONN, then nothing works); we send the error chunk the NBD spec
    asks for and keep serving. Pinned here so that either side changing is noticed."""
    pair = _errno_daemons(compat)
    out = {
        side: _libnbd(_FAILED_STRUCTURED_READ, str(d.workdir / "nbd.sock"), "EIO").split()
        for side, d in pair.items()
    }
    assert out["reference"][0] == "ENOTCONN"
    assert out["ours"] == ["EIO", "EIO"]


def test_growing_an_empty_file_allocates_its_first_block(compat: Compat) -> None:
    """block_resize from length 0 writes the first block (qsd's allocate_first_block): 4 KiB
    in use, and a file grown to less than a sector becomes one sector long."""

    def empty_files(d: Path) -> None:
        for name in ("a", "b", "c"):
            (d / name).write_bytes(b"")

    steps: list[StepLike] = [
        Cmd("blockdev-add", {"driver": "file", "node-name": n, "filename": f"$D/{n}"})
        for n in ("a", "b", "c")
    ]
    steps += [
        Cmd("block_resize", {"node-name": "a", "size": 1 << 20}),
        Cmd("block_resize", {"node-name": "b", "size": 100}),
        Cmd("block_resize", {"node-name": "c", "size": 8192}),
        Cmd("block_resize", {"node-name": "c", "size": 1 << 20}),
    ]
    result = compat.check_transcript(steps, setup=empty_files)
    assert result.replies()
    seen = {}
    for side, d in compat.dirs.items():
        seen[side] = [
            (os.stat(d / n).st_size, os.stat(d / n).st_blocks * 512) for n in ("a", "b", "c")
        ]
    assert seen["ours"] == seen["reference"]
    assert seen["ours"][:2] == [(1 << 20, 4096), (512, 4096)]


# -- sparse structured reads: the chunk sequence of each READ ---------------------------------


def _qemu_io(image: Path, fmt: str, *commands: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def _qcow2(d: Path, name: str, size: str, *opts: str) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(d / name), size], check=True
    )
    return d / name


def _sparse_images(d: Path) -> None:
    """The same allocation on both sides (deterministic patterns, written by qemu-io)."""
    raw = d / "raw.img"
    with open(raw, "wb") as f:
        f.truncate(4 << 20)
    # data, hole, explicit zeroes (data to SEEK_DATA), an unaligned extent, data at the end
    _qemu_io(raw, "raw", "write -P 0xab 0 64k", "write -P 0 256k 64k")
    _qemu_io(raw, "raw", "write -P 0xcd 1049088 4k", "write -P 0xef 4190208 4k")
    # data, unallocated, zero clusters; a partial cluster; data-zero-data
    q = _qcow2(d, "q.qcow2", "4M")
    _qemu_io(q, "qcow2", "write -P 0x11 0 64k", "write -z 128k 64k", "write -P 0 256k 64k")
    _qemu_io(q, "qcow2", "write -P 0x22 1M 4k", "write -P 0x33 2M 192k", "write -z 2112k 64k")
    # host clusters out of guest order (not contiguous: one chunk each), compressed ones
    rev = _qcow2(d, "rev.qcow2", "1M")
    _qemu_io(rev, "qcow2", "write -P 1 64k 64k", "write -P 2 0 64k", "write -P 3 256k 256k")
    cc = _qcow2(d, "cc.qcow2", "1M")
    _qemu_io(cc, "qcow2", "write -c -P 5 0 64k", "write -c -P 6 64k 64k", "write -c -P 0 128k 64k")
    # 512-byte clusters: qsd's extents stop at each L2 slice (32 KiB)
    small = _qcow2(d, "small.qcow2", "512k", "-o", "cluster_size=512")
    _qemu_io(small, "qcow2", "write -P 8 0 96k", "write -z 100k 10k")
    # a chain: top over base (top longer), top's zero clusters over base data
    base = _qcow2(d, "base.qcow2", "4M")
    _qemu_io(base, "qcow2", "write -P 0x55 0 1M", "write -P 0x66 2M 1M")
    top = _qcow2(d, "top.qcow2", "6M", "-b", "base.qcow2", "-F", "qcow2")
    _qemu_io(top, "qcow2", "write -P 0x77 64k 64k", "write -z 256k 128k", "write -P 0x88 1536k 64k")
    _qemu_io(top, "qcow2", "write -P 0x99 5M 64k")


_SPARSE_NODES = [
    "--blockdev", "driver=file,node-name=fr,filename=$D/raw.img",
    "--blockdev", "driver=raw,node-name=raw,file=fr",
    "--blockdev", "driver=raw,node-name=roff,file=fr,offset=32768,size=1048576",
    "--blockdev", "driver=qcow2,node-name=qcow2,file.driver=file,file.filename=$D/q.qcow2",
    "--blockdev", "driver=qcow2,node-name=rev,file.driver=file,file.filename=$D/rev.qcow2",
    "--blockdev", "driver=qcow2,node-name=comp,file.driver=file,file.filename=$D/cc.qcow2",
    "--blockdev", "driver=qcow2,node-name=small,file.driver=file,file.filename=$D/small.qcow2",
    "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=$D/top.qcow2",
    "--blockdev", "driver=null-co,node-name=null,size=1048576",
    "--blockdev", "driver=null-co,node-name=nullz,size=1048576,read-zeroes=on",
    # reads of raw's file fail; holes are never read, so only data extents fail
    "--blockdev",
    "driver=raw,node-name=bad,file.driver=blkdebug,file.image=fr,"
    "file.inject-error.0.event=read_aio,file.inject-error.0.errno=5",
]  # fmt: skip
_SPARSE_EXPORTS = ["raw", "fr", "roff", "qcow2", "rev", "comp", "small", "top", "null", "nullz"]

_CHUNKS = """
import errno, nbd, sys, zlib
KIND = {nbd.READ_DATA: "data", nbd.READ_HOLE: "hole", nbd.READ_ERROR: "error"}
DF = nbd.CMD_FLAG_DF
MiB = 1 << 20
READS = [(0, 4 * MiB, 0), (0, 4 * MiB, DF), (4096, 8192, 0), (61440, 8192, 0), (MiB, MiB, 0),
         (1049000, 5000, 0), (0, 1, 0), (65536, 65536, 0), (65536, 65536, DF),
         (2 * MiB, 2 * MiB, 0), (512, MiB, 0), (3 * MiB, MiB, 0), (700000, 348576, 0),
         (0, 6 * MiB, 0)]

def read(h, off, n, flags, crc=True):
    seen = []
    def chunk(buf, offset, status, err):
        # the bytes too: a hole must read as zeroes, a data chunk as the image's bytes
        # (not null-co's: without read-zeroes qsd sends whatever its buffer held)
        seen.append("%s@%d+%d:%x" % (KIND.get(status, status), offset, len(buf),
                                      zlib.crc32(buf) if crc else 0))
        return 0
    try:
        h.pread_structured(n, off, chunk, flags)
        result = "ok"
    except nbd.Error as e:
        result = errno.errorcode.get(e.errno, str(e.errno))
    return "%d+%d%s %s %s" % (off, n, " DF" if flags else "", result, " ".join(seen))

sock, mode = sys.argv[1], sys.argv[2]
for name in sys.argv[3:]:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    size = h.get_size()
    if mode == "all":
        for off, n, flags in READS:
            if off + n <= size:
                print(name, read(h, off, n, flags, name != "null"))
    else:  # hole reads of a failing node (qsd hangs up after a failed structured read)
        for off, n, flags in [(65536, 65536, 0), (65536, 4096, 0), (2 * MiB, MiB, 0),
                              (65536, 4096, DF)]:
            print(name, read(h, off, n, flags))
    h.shutdown()
"""


def test_sparse_read_chunks(compat: Compat) -> None:
    """A structured READ is one chunk per block-status extent of the exported node (through
    its chain, extents not merged): holes for what reads as zeroes, never read; data for the
    rest; a DF read is one data chunk. Same chunk sequences (and bytes) as qsd."""
    args = [*_SPARSE_NODES, "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"]
    for name in [*_SPARSE_EXPORTS, "bad"]:
        args += ["--export", f"type=nbd,id=e-{name},node-name={name}"]
    pair = compat.daemons(args, setup=_sparse_images)
    out = {}
    for side, d in pair.items():
        sock = str(d.workdir / "nbd.sock")
        out[side] = _libnbd(_CHUNKS, sock, "all", *_SPARSE_EXPORTS)
        out[side] += _libnbd(_CHUNKS, sock, "holes", "bad")
    assert out["ours"] == out["reference"], diff_text(
        out["reference"].splitlines(), out["ours"].splitlines()
    )
    kinds = {}
    for line in out["ours"].splitlines():
        parts = line.split()
        cut = 3 if parts[2] == "DF" else 2  # name, range, [DF], result, chunks
        kinds[" ".join(parts[:cut])] = [parts[cut], *(c.split("@")[0] for c in parts[cut + 1 :])]
    # unallocated, zero, unallocated: three holes, not merged
    assert kinds["qcow2 0+4194304"][:6] == ["ok", "data", "hole", "hole", "hole", "data"]
    assert kinds["qcow2 0+4194304 DF"] == ["ok", "data"]
    assert kinds["top 0+4194304"][:4] == ["ok", "data", "data", "data"]  # base, top, base
    assert kinds["bad 65536+65536"] == ["ok", "hole"]  # a hole of a failing node reads fine
    assert kinds["bad 65536+4096 DF"] == ["EIO"]  # DF reads it


# -- metadata preallocation: block status asks the file (QEMU's recursive block status) -------


def _preallocated_images(d: Path) -> None:
    """qcow2 images whose clusters are referenced but whose file has holes for most of them
    (preallocation=metadata), written the same way on both sides; one falloc image, whose
    file holds every cluster (not detected: its data clusters stay data)."""
    pm = _qcow2(d, "pm.qcow2", "4M", "-o", "preallocation=metadata")
    _qemu_io(pm, "qcow2", "write -P 0x55 64k 64k", "write -z 1M 64k", "write -P 0 2M 64k")
    _qemu_io(pm, "qcow2", "write -P 7 3000k 5k")
    pmx = _qcow2(d, "pmx.qcow2", "2M", "-o", "preallocation=metadata,extended_l2=on")
    _qemu_io(pmx, "qcow2", "write -P 1 4k 4k", "write -z 256k 8k")
    base = _qcow2(d, "pbase.qcow2", "4M")
    _qemu_io(base, "qcow2", "write -P 0x66 0 1M")
    top = _qcow2(
        d, "ptop.qcow2", "4M", "-o", "preallocation=metadata,extended_l2=on",
        "-b", "pbase.qcow2", "-F", "qcow2",
    )  # fmt: skip
    _qemu_io(top, "qcow2", "write -P 0x77 512k 64k")
    small = _qcow2(d, "psmall.qcow2", "256k", "-o", "preallocation=metadata,cluster_size=512")
    _qemu_io(small, "qcow2", "write -P 3 1k 3k")
    r1 = _qcow2(d, "pr1.qcow2", "2M", "-o", "preallocation=metadata,refcount_bits=1")
    _qemu_io(r1, "qcow2", "write -P 9 64k 64k")
    fa = _qcow2(d, "pfa.qcow2", "2M", "-o", "preallocation=falloc")
    _qemu_io(fa, "qcow2", "write -P 9 64k 64k")


_PREALLOCATED = ["pm", "pmx", "ptop", "psmall", "pr1", "pfa"]


def test_metadata_preallocation_block_status(compat: Compat) -> None:
    """`nbdinfo --map` (base:allocation and qemu:allocation-depth) and the chunks of
    structured reads of metadata-preallocated qcow2 images are qsd's: referenced clusters
    over holes of the file read as zeroes (data and zero), and extents end where the file's
    data does."""
    args = ["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"]
    for name in _PREALLOCATED:
        args += [
            "--blockdev",
            f"driver=qcow2,node-name={name},file.driver=file,file.filename=$D/{name}.qcow2",
            "--export",
            f"type=nbd,id=e-{name},node-name={name},allocation-depth=on",
        ]
    pair = compat.daemons(args, setup=_preallocated_images)
    out: dict[str, str] = {}
    for side, d in pair.items():
        sock = d.workdir / "nbd.sock"
        text = []
        for name in _PREALLOCATED:
            for how in ("--map", "--map=qemu:allocation-depth"):
                done = subprocess.run(
                    ["nbdinfo", how, f"nbd+unix:///{name}?socket={sock}"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                text.append(f"{name} {how} {done.returncode}\n{done.stdout}{done.stderr}")
        out[side] = "".join(text) + _libnbd(_CHUNKS, str(sock), "all", *_PREALLOCATED)
    assert out["ours"] == out["reference"], diff_text(
        out["reference"].splitlines(), out["ours"].splitlines()
    )
    # The case this is about: the first cluster is referenced, its file range a hole.
    first = out["ours"].split("pm --map 0\n", 1)[1].splitlines()[0].split()
    assert first == ["0", "65536", "2", "zero"]
