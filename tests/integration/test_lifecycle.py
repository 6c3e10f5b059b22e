"""The daemon as a subprocess, driven by real clients: qemu.qmp, qmp-shell, signals, pidfile.

Every daemon is started through `tests/integration/daemon.py` and stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.integration.daemon import DaemonProcess, monitor_args, ours_command, running_daemon

NULL_NODE = ["--blockdev", "driver=null-co,node-name=n0"]


def wait_gone(path: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not path.exists():
            return True
        time.sleep(0.005)
    return False


async def execute_list(client: QMPClient, name: str) -> list[dict[str, Any]]:
    result = await client.execute(name)
    assert isinstance(result, list)
    return result


async def test_qemu_qmp_client_full_session(scratch: Path) -> None:
    # Process start and stop block: they run in a thread so the test's own loop stays free.
    daemon = DaemonProcess(ours_command(), NULL_NODE, scratch).start()
    try:
        assert await asyncio.to_thread(daemon.wait_ready), daemon.stderr
        daemon.release_monitor()
        client = QMPClient("test")
        await client.connect(str(daemon.qmp_socket))
        try:
            commands = {c["name"] for c in await execute_list(client, "query-commands")}
            assert {"blockdev-add", "blockdev-del", "query-qmp-schema", "quit"} <= commands
            schema = await execute_list(client, "query-qmp-schema")
            by_name = {entry["name"]: entry for entry in schema}
            assert by_name["blockdev-add"]["meta-type"] == "command"
            arg_type = by_name[by_name["blockdev-add"]["arg-type"]]
            assert arg_type["meta-type"] == "object" and arg_type["tag"] == "driver"
            await client.execute("blockdev-add", {"driver": "null-aio", "node-name": "n1"})
            nodes = await execute_list(client, "query-named-block-nodes")
            assert [n["node-name"] for n in nodes] == ["n1", "n0"]
            await client.execute("blockdev-del", {"node-name": "n1"})
            await client.execute("quit")
        finally:
            # After quit the daemon hangs up first; qemu.qmp reports that EOF on disconnect.
            with contextlib.suppress(EOFError):
                await client.disconnect()
        assert await asyncio.to_thread(daemon.wait_exit, 10.0) == 0
        assert await asyncio.to_thread(wait_gone, daemon.qmp_socket)
    finally:
        await asyncio.to_thread(daemon.stop)


def test_qmp_shell_in_a_pipe(scratch: Path) -> None:
    qmp_shell = Path(sys.executable).parent / "qmp-shell"
    with running_daemon(ours_command(), NULL_NODE, scratch) as daemon:
        daemon.release_monitor()
        script = (
            "query-version\n"
            "blockdev-add driver=null-co node-name=n1 size=4096\n"
            "blockdev-add driver=null-co node-name=n1\n"
            "query-named-block-nodes\n"
        )
        result = subprocess.run(
            [str(qmp_shell), str(daemon.qmp_socket)],
            input=script.encode(),
            capture_output=True,
            timeout=30,
            check=False,
        )
        out = result.stdout.decode()
        assert result.returncode == 0, result.stderr.decode()
        replies = [json.loads(line.split(") ", 1)[1]) for line in out.splitlines() if ") {" in line]
        assert replies[0]["return"]["qemu"]["major"] == 7
        assert replies[1] == {"return": {}}
        assert replies[2]["error"]["desc"] == "Duplicate nodes with node-name='n1'"
        assert [n["node-name"] for n in replies[3]["return"]] == ["n1", "n0"]


def test_stdio_monitor_through_pipes(scratch: Path) -> None:
    proc = subprocess.run(
        [*ours_command(), "--chardev", "stdio,id=s0", "--monitor", "chardev=s0,pretty=off"],
        input=b'{"execute":"qmp_capabilities"}{"execute":"query-version","id":7}\n'
        b'{"execute":"quit"}\n',
        capture_output=True,
        timeout=30,
        check=False,
    )
    lines = proc.stdout.decode().splitlines()
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(lines[0])["QMP"]["capabilities"] == ["oob"]
    assert json.loads(lines[1]) == {"return": {}}
    assert json.loads(lines[2])["id"] == 7
    assert json.loads(lines[3]) == {"return": {}}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_end_the_daemon_cleanly(scratch: Path, signum: signal.Signals) -> None:
    pidfile = scratch / "daemon.pid"
    with running_daemon(ours_command(), [*NULL_NODE, "--pidfile", str(pidfile)], scratch) as d:
        assert pidfile.read_text().strip() == str(d.pid)
        os.kill(d.pid, signum)
        assert d.wait_exit(10.0) == 0
        assert wait_gone(d.qmp_socket) and wait_gone(pidfile)


def test_second_daemon_on_a_locked_pidfile_fails_and_leaves_nothing(scratch: Path) -> None:
    pidfile = scratch / "shared.pid"
    first_dir, second_dir = scratch / "a", scratch / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    with running_daemon(ours_command(), ["--pidfile", str(pidfile)], first_dir):
        second_sock = second_dir / "qmp.sock"
        result = subprocess.run(
            [*ours_command(), "--pidfile", str(pidfile), *monitor_args(second_sock)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 1
        assert result.stderr.decode().splitlines() == [
            "storage-daemon: cannot create PID file: Cannot lock pid file: "
            "Resource temporarily unavailable"
        ]
        assert not second_sock.exists()  # qsd leaves its socket behind; we do not
        assert pidfile.exists()  # the first daemon's pidfile is untouched


def test_daemonize_returns_once_ready(scratch: Path) -> None:
    pidfile = scratch / "d.pid"
    sock = scratch / "qmp.sock"
    started = subprocess.run(
        [
            *ours_command(),
            "--daemonize",
            "--pidfile",
            str(pidfile),
            *NULL_NODE,
            *monitor_args(sock),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert started.returncode == 0, started.stderr.decode()
    # The parent returned only after start-up finished: pidfile and socket exist already.
    pid = int(pidfile.read_text())
    assert sock.exists()
    try:
        assert pid != os.getpid()
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_gone(pidfile, 10.0) and wait_gone(sock, 10.0)


def test_daemonize_reports_startup_failure(scratch: Path) -> None:
    result = subprocess.run(
        [*ours_command(), "--daemonize", "--blockdev", "driver=null-co,node-name=1bad"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "Invalid node-name: '1bad'" in result.stderr.decode()


def test_unused_helper_kept_typed(scratch: Path) -> None:
    # DaemonProcess exposes stderr for post-mortems; a clean run writes nothing there.
    with running_daemon(ours_command(), NULL_NODE, scratch) as daemon:
        assert isinstance(daemon, DaemonProcess)
    assert daemon.stderr == ""
