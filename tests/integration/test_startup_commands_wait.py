"""Clients that connect while start-up still applies the command line, on qsd and on ours
alike: a QMP client is greeted, but no command of its runs until every option is applied
(none at all when one fails); an NBD client is not even greeted until then.

Integration ring: real daemons; the start-up is held on a `--blockdev` whose file is a FIFO
(opening it waits for a writer), so the window is certain, not timed. Each daemon is stopped
by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.daemon import monitor_args, ours_command, reference_command

WINDOW = 1.0  # seconds: a reply within this, while the FIFO holds start-up, is a failure


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the daemon exited at start-up"
        assert time.monotonic() < deadline, "the monitor socket never appeared"
        time.sleep(0.005)


def _recv_lines(sock: socket.socket, timeout: float) -> tuple[list[dict[str, object]], bool]:
    """The messages that arrive within `timeout`, and whether the stream ended."""
    sock.settimeout(timeout)
    data = b""
    ended = False
    with contextlib.suppress(TimeoutError):
        while True:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                ended = True
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()], ended


@pytest.mark.parametrize("side", ["reference", "ours"])
def test_commands_wait_for_the_command_line(side: str, tmp_path: Path) -> None:
    command = reference_command() if side == "reference" else ours_command()
    fifo, qmp = tmp_path / "fifo", tmp_path / "qmp.sock"
    os.mkfifo(fifo)
    blockdev = f"driver=file,filename={fifo},node-name=f0,read-only=on"
    proc = subprocess.Popen(
        [*command, *monitor_args(qmp), "--blockdev", blockdev],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_socket(qmp, proc)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(qmp))
            client.settimeout(10)
            greeting = b""
            while not greeting.endswith(b"\n"):
                chunk = client.recv(4096)
                assert chunk, "closed before the greeting"
                greeting += chunk
            assert list(json.loads(greeting)) == ["QMP"]
            client.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-version"}\n')
            during, ended = _recv_lines(client, WINDOW)
            assert (during, ended) == ([], False)  # held, not answered, not dropped
            # Let the start-up go on: the FIFO is no regular file, so it fails.
            os.close(os.open(fifo, os.O_WRONLY))
            after, ended = _recv_lines(client, 10)
            assert (after, ended) == ([], True)
        assert proc.wait(10) == 1
        assert proc.stderr is not None
        assert b"to be a regular file" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize("side", ["reference", "ours"])
def test_nbd_clients_wait_for_the_command_line(side: str, tmp_path: Path) -> None:
    command = reference_command() if side == "reference" else ours_command()
    fifo, nbd = tmp_path / "fifo", tmp_path / "nbd.sock"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [
            *command,
            "--nbd-server",
            f"addr.type=unix,addr.path={nbd}",
            "--blockdev",
            f"driver=file,filename={fifo},node-name=f0,read-only=on",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_socket(nbd, proc)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(nbd))
            client.settimeout(WINDOW)
            with pytest.raises(TimeoutError):
                client.recv(4096)  # no NBD greeting while start-up is held
            os.close(os.open(fifo, os.O_WRONLY))
            client.settimeout(10)
            try:
                data = client.recv(4096)
            except ConnectionResetError:
                data = b""
            assert data == b""  # start-up failed: dropped, never greeted
        assert proc.wait(10) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
