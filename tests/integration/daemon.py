"""Subprocess launcher for a storage daemon (ours or the reference) and a raw QMP client.

Test-support ring: used by integration and compat tests; it does real process and socket I/O.
Invariant: every process started here is stopped by its own PID (SIGTERM, then SIGKILL after a
timeout); readiness is observed (socket + QMP greeting), never assumed after a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

REFERENCE_BINARY = "/usr/bin/qemu-storage-daemon"

#: How often readiness and exit are polled. Polling a socket is observation, not synchronisation.
POLL_INTERVAL = 0.005

MonitorPlacement = Literal["append", "prepend", "none"]


def reference_command() -> list[str]:
    """The reference qemu-storage-daemon command prefix."""
    return [REFERENCE_BINARY]


def ours_command() -> list[str]:
    """Our daemon's command prefix; `COMPAT_OURS=reference` (or a command line) substitutes it.

    `COMPAT_OURS=reference` runs the reference in place of ours, which is how the compat cases
    validate themselves (every case must pass reference-vs-reference).
    """
    override = os.environ.get("COMPAT_OURS", "").strip()
    if override == "reference":
        return reference_command()
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "storage_daemon"]


def monitor_args(socket_path: Path, chardev_id: str = "qmp0") -> list[str]:
    """Command-line arguments creating a QMP monitor on a listening unix socket."""
    return [
        "--chardev",
        f"socket,id={chardev_id},path={socket_path},server=on,wait=off",
        "--monitor",
        f"chardev={chardev_id}",
    ]


class _NoId:
    def __repr__(self) -> str:
        return "NO_ID"


#: Sentinel for "send no `id` member" (None would send `"id": null`).
NO_ID: Any = _NoId()


class QmpError(Exception):
    """The QMP peer misbehaved (EOF, timeout, unparsable line) from the client's point of view."""


class QmpEof(QmpError):
    """The daemon closed the QMP connection."""


class QmpTimeout(QmpError):
    """No complete message arrived within the timeout."""


class RawQmp:
    """A minimal blocking QMP client on a unix socket that keeps exact replies.

    Messages are read line by line; events that arrive while waiting for a reply are appended
    to `events` in arrival order, and `wait_event` consumes them from there.
    """

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self._sock = sock
        self.timeout = timeout
        self._buf = bytearray()
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.raw_lines: list[bytes] = []

    @classmethod
    def connect(cls, path: Path | str, timeout: float = 5.0) -> RawQmp:
        """Connect and read the greeting (raises QmpError if none arrives)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        client = cls(sock, timeout)
        try:
            client.greeting = client.recv()
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        self._sock.close()

    def has_unsolicited_data(self) -> bool:
        """Whether anything (or EOF) is waiting unread: a check that does not wait."""
        if self._buf:
            return True
        ready, _, _ = select.select([self._sock], [], [], 0)
        return bool(ready)

    def __enter__(self) -> RawQmp:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- low level ---------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self._sock.settimeout(self.timeout)
        self._sock.sendall(data)

    def send_json(self, message: Any) -> None:
        self.send_raw(json.dumps(message).encode() + b"\n")

    def _read_line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[: nl + 1])
                del self._buf[: nl + 1]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpTimeout(f"no complete QMP message within {timeout}s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QmpTimeout(f"no complete QMP message within {timeout}s") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise QmpEof("connection closed by the daemon")
            self._buf += chunk

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """Next message of any kind (reply, error or event)."""
        while True:
            line = self._read_line(self.timeout if timeout is None else timeout)
            if not line.strip():
                continue
            self.raw_lines.append(line)
            try:
                message = json.loads(line)
            except ValueError as exc:
                raise QmpError(f"unparsable line from daemon: {line!r}") from exc
            if not isinstance(message, dict):
                raise QmpError(f"non-object message from daemon: {line!r}")
            return message

    def recv_reply(self, timeout: float | None = None) -> dict[str, Any]:
        """Next non-event message; events read on the way are kept in `events`."""
        while True:
            message = self.recv(timeout)
            if "event" in message:
                self.events.append(message)
                continue
            return message

    def at_eof(self, timeout: float | None = None) -> bool:
        """True if the daemon closes the connection (any pending events are collected first)."""
        try:
            while True:
                self.events.append(self.recv(timeout))
        except QmpEof:
            return True
        except QmpTimeout:
            return False

    # -- commands ----------------------------------------------------------------------------

    def cmd(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        id: Any = NO_ID,
        *,
        oob: bool = False,
    ) -> dict[str, Any]:
        """Send one command and return the parsed reply (`return` or `error`)."""
        message: dict[str, Any] = {"exec-oob" if oob else "execute": name}
        if args is not None:
            message["arguments"] = args
        if id is not NO_ID:
            message["id"] = id
        self.send_json(message)
        return self.recv_reply()

    def negotiate(self, enable: Sequence[str] | None = None) -> dict[str, Any]:
        args = None if enable is None else {"enable": list(enable)}
        return self.cmd("qmp_capabilities", args)

    def wait_event(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Remove and return the first event called `name`, reading more until it arrives."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, event in enumerate(self.events):
                if event.get("event") == name:
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpTimeout(f"event {name} did not arrive")
            message = self.recv(remaining)
            if "event" not in message:
                raise QmpError(f"unexpected non-event message while waiting for {name}: {message}")
            self.events.append(message)


@dataclass
class CliResult:
    """Outcome of a command line: `exit_status` is None when the daemon was accepted (kept
    running and served QMP) and had to be stopped; `stop_status` is then its status after
    SIGTERM."""

    exit_status: int | None
    stderr: str
    stdout: str
    stop_status: int | None = None

    @property
    def accepted(self) -> bool:
        return self.exit_status is None


class DaemonProcess:
    """One daemon subprocess in a scratch directory, with an optional QMP monitor.

    `monitor` places `--chardev socket,id=<chardev_id>,path=DIR/qmp.sock,... --monitor ...`
    before ("prepend") or after ("append") `args`, or adds none. With `ready_pidfile`,
    `--pidfile DIR/ready.pid` is put first (a later `--pidfile` in `args` wins, as in qsd, and
    is then the one watched). stdout/stderr go to files in the scratch dir so a chatty daemon
    never blocks on a full pipe.

    Readiness is the PID file: qsd writes it once every option has been processed, just
    before its main loop. Connecting to a monitor earlier is unsafe with qsd 7.2: about 1 in
    200 early connections wedges it (a thread blocks in accept4() on the listener and the
    client's input is never read). Our daemon must also write the PID file only after all
    options succeeded.
    """

    def __init__(
        self,
        command: Sequence[str],
        args: Sequence[str],
        workdir: Path,
        *,
        monitor: MonitorPlacement = "append",
        ready_pidfile: bool = True,
        chardev_id: str = "qmp0",
        socket_name: str = "qmp.sock",
        env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
    ) -> None:
        self.workdir = workdir
        self.qmp_socket = workdir / socket_name
        extra = monitor_args(self.qmp_socket, chardev_id) if monitor != "none" else []
        self.has_monitor = monitor != "none"
        pid_args = ["--pidfile", str(workdir / "ready.pid")] if ready_pidfile else []
        if monitor == "prepend":
            self.argv = [*command, *pid_args, *extra, *args]
        else:
            self.argv = [*command, *pid_args, *args, *extra]
        self.pidfile = _effective_pidfile(self.argv[len(command) :], workdir)
        self._stdout_path = workdir / "daemon.stdout"
        self._stderr_path = workdir / "daemon.stderr"
        self._env = env
        self._stdin = stdin
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready_client: RawQmp | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> DaemonProcess:
        if self._proc is not None:
            raise RuntimeError("daemon already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.qmp_socket.unlink()
        with open(self._stdout_path, "wb") as out, open(self._stderr_path, "wb") as err:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                stdin=self._stdin,
                stdout=out,
                stderr=err,
                env=self._env,
                start_new_session=True,
            )
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("daemon not started")
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    @property
    def stderr(self) -> str:
        try:
            return self._stderr_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def stdout(self) -> str:
        try:
            return self._stdout_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until start-up finished (True) or the process exited (False).

        Finished = the PID file holds a PID (if there is one) and then the monitor's greeting
        arrived (if there is a monitor). The greeting's connection is kept and handed out by
        the next `connect_qmp()`: qsd may drop a client that connects right after another
        one hung up, so the probe is not closed and replaced. Raises TimeoutError if neither
        happens in time.
        """
        if self.pidfile is None and not self.has_monitor:
            raise RuntimeError("wait_ready needs a PID file or a QMP monitor")
        deadline = time.monotonic() + timeout
        while True:
            if self.returncode is not None:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"daemon {self.argv} not ready within {timeout}s")
            if self.pidfile is None or _pidfile_written(self.pidfile):
                if not self.has_monitor:
                    return True
                if self.qmp_socket.exists():
                    try:
                        self._ready_client = RawQmp.connect(self.qmp_socket, timeout=remaining)
                        return True
                    except (OSError, QmpError):
                        # Refused (not listening yet), or closed because start-up failed.
                        if self.returncode is not None:
                            return False
            time.sleep(POLL_INTERVAL)

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status, or None if still running after `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM by PID, wait; SIGKILL after `timeout`. Returns the exit status."""
        proc = self.proc
        if self._ready_client is not None:
            self._ready_client.close()
            self._ready_client = None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        status = proc.returncode
        assert status is not None
        return status

    def release_monitor(self) -> None:
        """Close the readiness probe's connection, so another client (qemu.qmp, qmp-shell)
        gets the monitor: a monitor serves one client at a time."""
        if self._ready_client is not None:
            self._ready_client.close()
            self._ready_client = None

    def connect_qmp(self, timeout: float = 5.0) -> RawQmp:
        """A QMP connection (greeting read): the one `wait_ready` opened, else a new one."""
        client, self._ready_client = self._ready_client, None
        if client is not None:
            if not client.has_unsolicited_data():
                client.timeout = timeout
                return client
            # qsd 7.2 sets its QMP handlers up in a bottom half of the monitor thread, after
            # the PID file is written; a client that connects in between can get a second
            # greeting and then lose the connection. Nothing else is sent before
            # negotiation, so pending data means that race: start over on a new connection.
            client.close()
            return self._reconnect(timeout)
        return RawQmp.connect(self.qmp_socket, timeout)

    def _reconnect(self, timeout: float) -> RawQmp:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return RawQmp.connect(self.qmp_socket, timeout)
            except (OSError, QmpError):
                if time.monotonic() >= deadline:
                    raise
            time.sleep(POLL_INTERVAL)

    def __enter__(self) -> DaemonProcess:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            self.stop()


def _effective_pidfile(args: Sequence[str], workdir: Path) -> Path | None:
    """The PID file qsd would write: the last `--pidfile` wins."""
    found: str | None = None
    for i, arg in enumerate(args):
        if arg == "--pidfile" and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith("--pidfile="):
            found = arg.split("=", 1)[1]
    if found is None:
        return None
    path = Path(found)
    return path if path.is_absolute() else workdir / path


def _pidfile_written(path: Path) -> bool:
    try:
        return path.read_text().strip().isdigit()
    except OSError:
        return False


@contextlib.contextmanager
def running_daemon(
    command: Sequence[str],
    args: Sequence[str],
    workdir: Path,
    *,
    monitor: MonitorPlacement = "append",
    ready_timeout: float = 10.0,
) -> Iterator[DaemonProcess]:
    """Start a daemon, wait until ready, yield it, stop it by PID on exit.

    Raises AssertionError (with its stderr) if it exits during start-up.
    """
    daemon = DaemonProcess(command, args, workdir, monitor=monitor).start()
    try:
        if not daemon.wait_ready(ready_timeout):
            raise AssertionError(
                f"daemon exited with {daemon.returncode} during start-up: {daemon.stderr}"
            )
        yield daemon
    finally:
        daemon.stop()


def start_cli(
    command: Sequence[str],
    args: Sequence[str],
    workdir: Path,
    *,
    monitor: MonitorPlacement = "none",
) -> DaemonProcess:
    """Start a command line for `finish_cli` (lets a caller run several concurrently).

    `--pidfile DIR/ready.pid` is prepended to detect acceptance; no monitor is added by
    default, so the command line is otherwise exactly `args`.
    """
    return DaemonProcess(
        command, args, workdir, monitor=monitor, chardev_id="compatqmp", socket_name="cli.sock"
    ).start()


def finish_cli(daemon: DaemonProcess, timeout: float = 10.0) -> CliResult:
    """Wait for a command line started by `start_cli` to exit or be accepted, then stop it.

    "Accepted" = start-up finished (PID file written) and the process still runs.
    """
    try:
        ready = daemon.wait_ready(timeout)
    except BaseException:
        daemon.stop()
        raise
    if not ready:
        status = daemon.stop()
        return CliResult(status, daemon.stderr, daemon.stdout)
    stop_status = daemon.stop()
    return CliResult(None, daemon.stderr, daemon.stdout, stop_status=stop_status)


def run_cli(
    command: Sequence[str],
    args: Sequence[str],
    workdir: Path,
    timeout: float = 10.0,
    *,
    monitor: MonitorPlacement = "none",
) -> CliResult:
    """Run a command line expected to exit quickly, or to be accepted and keep running.

    Returns (exit status or None if accepted, stderr, stdout, status after SIGTERM).
    """
    return finish_cli(start_cli(command, args, workdir, monitor=monitor), timeout)
