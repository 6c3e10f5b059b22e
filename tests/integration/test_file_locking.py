"""The `file` driver against the real tools: open errors and lock bytes compared with the
reference qemu-storage-daemon live, and image locking interoperating with qemu-img, qemu-io and
qemu-nbd in both directions. Expected texts come from the reference at test time.

Our daemon takes permissions only through users (exports come later), so lock scenarios run it
in process with an export-like user attached; blocking work (the reference daemon, its QMP
client) runs in a worker thread so the event loop of the test stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from tests.component.test_file_driver import lock_bytes, read_only_sysfs_file
from tests.integration.daemon import (
    REFERENCE_BINARY,
    DaemonProcess,
    RawQmp,
    ours_command,
    reference_command,
)

TOOLS = (REFERENCE_BINARY, "qemu-img", "qemu-io", "qemu-nbd")
pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS), reason="QEMU tools not installed"
)

MiB = 1 << 20
RW = Perm.CONSISTENT_READ | Perm.WRITE
# What qsd's users take, as measured: a writable NBD export of a raw node shares all but
# resize; a read-write qcow2 node takes write+resize on its file and shares neither.
EXPORT_RW = (RW, PERM_ALL & ~Perm.RESIZE)
QCOW2_RW = (RW | Perm.RESIZE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
QCOW2_RO = (Perm.CONSISTENT_READ, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)


class Export:
    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


def make_raw(path: Path, size: int = MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_qcow2(path: Path) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(path), "1M"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return path


async def make_image(path: Path, qcow2: bool) -> Path:
    return await asyncio.to_thread(make_qcow2 if qcow2 else make_raw, path)


def wait_locks(img: Path, count: int, timeout: float = 10.0) -> None:
    """Observe /proc/locks until `count` bytes of `img` are locked (a tool finished opening)."""
    deadline = time.monotonic() + timeout
    while len(lock_bytes(img)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{img}: locks {lock_bytes(img)}, expected {count} bytes")
        time.sleep(0.005)


@contextlib.contextmanager
def holder(argv: Sequence[str], img: Path, count: int) -> Iterator[subprocess.Popen[bytes]]:
    """A QEMU tool keeping `img` open (interactive qemu-io, qemu-nbd); stopped by its PID."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_locks(img, count)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.stderr is not None:
            proc.stderr.close()


@contextlib.contextmanager
def reference(workdir: Path) -> Iterator[RawQmp]:
    """A reference qsd with a negotiated QMP client; stopped by PID."""
    daemon = DaemonProcess(reference_command(), [], workdir).start()
    try:
        assert daemon.wait_ready(), daemon.stderr
        client = daemon.connect_qmp()
        client.negotiate()
        yield client
        client.close()
    finally:
        daemon.stop()


def qmp_ok(client: RawQmp, name: str, args: dict[str, Any]) -> None:
    reply = client.cmd(name, args)
    assert "return" in reply, (name, args, reply)


def qmp_error(client: RawQmp, name: str, args: dict[str, Any]) -> str:
    reply = client.cmd(name, args)
    assert "error" in reply, (name, args, reply)
    desc: str = reply["error"]["desc"]
    return desc


async def run_tool(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def tool_runs(img: Path) -> list[list[str]]:
    return [
        ["qemu-img", "info", str(img)],
        ["qemu-img", "info", "-U", str(img)],
        ["qemu-img", "resize", "-f", "raw", str(img), "2M"],
        ["qemu-io", "-f", "raw", "-c", "write 0 4k", str(img)],
        ["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", str(img)],
    ]


def tool_runs_sync(img: Path) -> list[tuple[int, str]]:
    results = []
    for argv in tool_runs(img):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        results.append((proc.returncode, proc.stderr))
    return results


# --- open errors, ours vs the reference ---------------------------------------------------


def test_open_errors_match_the_reference(scratch: Path) -> None:
    img = make_raw(scratch / "img")
    (scratch / "dir").mkdir()
    missing = str(scratch / "missing")
    cases: list[dict[str, Any]] = [
        {"filename": missing},
        {"filename": str(scratch / "dir")},
        {"filename": str(scratch / "dir"), "read-only": True},
        {"filename": "/dev/null"},
        {"filename": ""},
        {"filename": missing, "pr-manager": "pm0"},
        {"filename": missing, "aio": "native"},
        {"filename": str(img), "aio": "native"},
        {"filename": f"file:{img}"},
        {"filename": str(img), "force-share": True},
        {"filename": str(img)},
        {"filename": str(img), "locking": "off", "aio": "io_uring", "aio-max-batch": 3},
        {"filename": str(img), "read-only": True, "force-share": True, "locking": "on"},
        {"filename": str(img), "auto-read-only": True, "drop-cache": False},
    ]
    with contextlib.suppress(pytest.skip.Exception):
        sysfs = read_only_sysfs_file()
        cases += [
            {"filename": sysfs},
            {"filename": sysfs, "auto-read-only": True},
            {"filename": sysfs, "read-only": True, "cache": {"direct": True}},
        ]
    replies: dict[str, list[dict[str, Any]]] = {}
    for who, command in (("ref", reference_command()), ("ours", ours_command())):
        daemon = DaemonProcess(command, [], scratch / who).start()
        try:
            assert daemon.wait_ready(), daemon.stderr
            client = daemon.connect_qmp()
            client.negotiate()
            replies[who] = []
            for case in cases:
                args = {"driver": "file", "node-name": "x", **case}
                reply = client.cmd("blockdev-add", args)
                if "return" in reply:
                    qmp_ok(client, "blockdev-del", {"node-name": "x"})
                replies[who].append(reply)
            client.close()
        finally:
            daemon.stop()
    for case, ref, ours in zip(cases, replies["ref"], replies["ours"], strict=True):
        assert ours == ref, case


# --- lock bytes, ours vs the reference ----------------------------------------------------


def reference_lock_bytes(scratch: Path, img: Path, qcow2: bool) -> list[int]:
    with reference(scratch / "ref") as client:
        qmp_ok(client, "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
        if qcow2:
            qmp_ok(client, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
        else:
            qmp_ok(client, "blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
            assert lock_bytes(img) == []  # a format node nobody uses: no permissions
            sock = scratch / "ref" / "nbd.sock"
            addr = {"type": "unix", "data": {"path": str(sock)}}
            qmp_ok(client, "nbd-server-start", {"addr": addr})
            args = {"type": "nbd", "id": "e", "node-name": "r", "writable": True}
            qmp_ok(client, "block-export-add", args)
        return lock_bytes(img)


@pytest.mark.parametrize("qcow2", [False, True], ids=["raw-export", "qcow2-node"])
async def test_lock_bytes_match_the_reference(scratch: Path, qcow2: bool) -> None:
    img = await make_image(scratch / "img", qcow2)
    expected = await asyncio.to_thread(reference_lock_bytes, scratch, img, qcow2)
    assert lock_bytes(img) == []
    daemon = Daemon()
    await daemon.run_command(
        "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)}
    )
    await daemon.run_command("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
    assert lock_bytes(img) == []
    # qcow2 node on f ~ a user of f with the qcow2 node's perms; export ~ a user of r.
    node = daemon.graph.lookup("f" if qcow2 else "r")
    perm, shared = QCOW2_RW if qcow2 else EXPORT_RW
    edge = daemon.graph.attach(Export(), node, "root", ChildRole.PRIMARY, perm, shared)
    assert lock_bytes(img) == expected
    daemon.graph.detach(edge)
    assert lock_bytes(img) == []
    await daemon.run_command("blockdev-del", {"node-name": "r"})
    await daemon.run_command("blockdev-del", {"node-name": "f"})


def test_bare_nodes_leave_the_image_free_like_the_reference(scratch: Path) -> None:
    img = make_raw(scratch / "img")
    args = [
        "--blockdev",
        f"driver=file,node-name=f,filename={img}",
        "--blockdev",
        "driver=raw,node-name=r,file=f",
    ]
    for who, command in (("ref", reference_command()), ("ours", ours_command())):
        daemon = DaemonProcess(command, args, scratch / who).start()
        try:
            assert daemon.wait_ready(), daemon.stderr
            assert lock_bytes(img) == []
            write = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "write 0 4k", str(img)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert write.returncode == 0 and write.stderr == "", (who, write.stderr)
        finally:
            daemon.stop()


# --- our locks seen by the QEMU tools -----------------------------------------------------


def reference_holding_tools(scratch: Path, img: Path, qcow2: bool) -> list[tuple[int, str]]:
    with reference(scratch / "ref") as client:
        qmp_ok(client, "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
        if qcow2:
            qmp_ok(client, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
        else:
            qmp_ok(client, "blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
            addr = {"type": "unix", "data": {"path": str(scratch / "ref" / "nbd.sock")}}
            qmp_ok(client, "nbd-server-start", {"addr": addr})
            args = {"type": "nbd", "id": "e", "node-name": "r", "writable": True}
            qmp_ok(client, "block-export-add", args)
        return tool_runs_sync(img)


@pytest.mark.parametrize("qcow2", [False, True], ids=["raw-export", "qcow2-node"])
async def test_tools_see_our_locks_as_the_references(scratch: Path, qcow2: bool) -> None:
    img = await make_image(scratch / "img", qcow2)
    expected = await asyncio.to_thread(reference_holding_tools, scratch, img, qcow2)
    # The reference's writers fail on the lock: the tool outputs say so (sanity of the oracle).
    assert any("lock\nIs another process using the image" in err for _, err in expected)
    img.unlink()
    await make_image(img, qcow2)  # undo what the tools changed meanwhile
    daemon = Daemon()
    await daemon.run_command(
        "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)}
    )
    perm, shared = QCOW2_RW if qcow2 else EXPORT_RW
    daemon.graph.attach(Export(), daemon.graph.lookup("f"), "root", ChildRole.PRIMARY, perm, shared)
    got = [await run_tool(*argv) for argv in tool_runs(img)]
    assert got == expected


# --- the QEMU tools' locks seen by us -----------------------------------------------------


def reference_against(
    scratch: Path, img: Path, holder_argv: list[str], count: int, qcow2: bool
) -> str:
    """qsd's QMP error when a tool holds `img`: a writable export, or a qcow2 node."""
    with holder(holder_argv, img, count), reference(scratch / "ref") as client:
        qmp_ok(client, "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
        if qcow2:
            return qmp_error(
                client, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"}
            )
        qmp_ok(client, "blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
        addr = {"type": "unix", "data": {"path": str(scratch / "ref" / "nbd.sock")}}
        qmp_ok(client, "nbd-server-start", {"addr": addr})
        args = {"type": "nbd", "id": "e", "node-name": "r", "writable": True}
        return qmp_error(client, "block-export-add", args)


@pytest.mark.parametrize(
    ("tool", "as_qcow2"),
    [
        ("qemu-nbd", False),  # qemu-nbd serving the qcow2: our writer is refused (201)
        ("qemu-io", True),  # qemu-io writing it as raw: our qcow2-like user is refused (101)
        ("qemu-nbd-raw-ro", True),  # read-only raw user refuses resize (203)
    ],
)
async def test_our_attach_fails_like_the_reference_when_a_tool_holds_the_image(
    scratch: Path, tool: str, as_qcow2: bool
) -> None:
    img = await make_image(scratch / "img", True)
    sock = str(scratch / "n.sock")
    argv, count = {
        "qemu-nbd": (["qemu-nbd", "-f", "qcow2", "-k", sock, str(img)], 5),
        "qemu-nbd-raw-ro": (["qemu-nbd", "-r", "-f", "raw", "-k", sock, str(img)], 2),
        "qemu-io": (["qemu-io", "-f", "raw", str(img)], 2),
    }[tool]
    expected = await asyncio.to_thread(reference_against, scratch, img, argv, count, as_qcow2)
    assert expected.startswith("Failed to get ")
    daemon = Daemon()
    await daemon.run_command(
        "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)}
    )
    await daemon.run_command("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
    node = daemon.graph.lookup("f" if as_qcow2 else "r")
    perm, shared = QCOW2_RW if as_qcow2 else EXPORT_RW
    with contextlib.ExitStack() as stack:
        await asyncio.to_thread(stack.enter_context, holder(argv, img, count))
        with pytest.raises(QmpError) as info:
            daemon.graph.attach(Export(), node, "root", ChildRole.PRIMARY, perm, shared)
        assert info.value.desc == expected
        assert info.value.hint == f"Is another process using the image [{img}]?"
        assert not any(isinstance(edge.parent, Export) for edge in node.parents)
        # Our failed attempt left no byte behind: only the tool's locks remain.
        assert len(lock_bytes(img)) == count
        await asyncio.to_thread(stack.close)
    # Once the tool is gone, the same attach succeeds.
    daemon.graph.attach(Export(), node, "root", ChildRole.PRIMARY, perm, shared)
