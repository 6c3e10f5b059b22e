"""The typed --chardev and the per-option help, on the daemon run as a subprocess.

Integration ring: every daemon is started through tests/integration/daemon.py (or
subprocess.run for lines that exit at once) and stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess, RawQmp, ours_command


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Each line exits at once; should one start a daemon by mistake, run() kills it (by PID)
    # when the timeout expires.
    return subprocess.run(
        [*ours_command(), *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def test_typed_chardev_forms_make_working_monitors(scratch: Path) -> None:
    sock, sock2 = scratch / "t.sock", scratch / "j.sock"
    args = [
        "--chardev",
        f"socket,id=m,addr.type=unix,addr.path={sock},server=on,wait=off",
        "--monitor",
        "m",
        "--chardev",
        json.dumps(
            {
                "id": "j",
                "backend": "socket",
                "addr": {"type": "unix", "path": str(sock2)},
                "wait": False,
            }
        ),
        "--chardev",
        '{"id":"w","backend":{"type":"null","data":{}}}',
        "--chardev",
        f"file,id=f,out={scratch}/f.out",
        "--chardev",
        "ringbuf,id=r,size=1024",  # no typed-only key: the legacy syntax
        "--monitor",
        "chardev=j",
    ]
    with DaemonProcess(ours_command(), args, scratch, monitor="none") as daemon:
        assert daemon.wait_ready(), daemon.stderr
        with RawQmp.connect(sock) as client:
            client.negotiate()
            reply = client.cmd("query-chardev")["return"]
            assert reply == [
                {"label": "m", "filename": f"unix:{sock},server=on", "frontend-open": True},
                {
                    "label": "j",
                    "filename": f"disconnected:unix:{sock2},server=on",
                    "frontend-open": True,
                },
                {"label": "w", "filename": "null", "frontend-open": False},
                {"label": "f", "filename": "file", "frontend-open": False},
                {"label": "r", "filename": "ringbuf", "frontend-open": False},
            ]
            assert client.cmd("ringbuf-write", {"device": "r", "data": "x"}) == {"return": {}}
        with RawQmp.connect(sock2) as second:
            second.negotiate()
            assert second.cmd("chardev-remove", {"id": "j"})["error"]["desc"] == (
                "Chardev 'j' is busy"
            )
        assert daemon.stop() == 0
        assert daemon.stderr == ""


def test_file_chardev_monitor_reads_in_and_writes_out(scratch: Path) -> None:
    commands = scratch / "cmds"
    commands.write_text(
        '{"execute":"qmp_capabilities"}\n'
        '{"execute":"query-chardev","id":1}\n'
        '{"execute":"quit","id":2}\n'
    )
    args = ["--chardev", f"file,id=f,in={commands},out={scratch}/out", "--monitor", "f"]
    with DaemonProcess(ours_command(), args, scratch, monitor="none", ready_pidfile=False) as d:
        assert d.wait_exit(20) == 0, d.stderr
    lines = [json.loads(x) for x in (scratch / "out").read_text().splitlines()]
    assert "QMP" in lines[0]
    assert lines[1:] == [
        {"return": {}},
        {"return": [{"frontend-open": True, "filename": "file", "label": "f"}], "id": 1},
        {"return": {}, "id": 2},
    ]


def test_typed_chardev_errors_name_the_option(scratch: Path) -> None:
    arg = "socket,id=m,addr.type=unix"
    result = run_cli("--chardev", arg, cwd=scratch)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.endswith(f": --chardev {arg}: Parameter 'addr.path' is missing\n")
    dup = run_cli("--chardev", "null,id=c0", "--chardev", "null,id=c0,out=/x", cwd=scratch)
    assert dup.returncode == 1
    assert dup.stderr.endswith("Parameter 'out' is unexpected\n")


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        (
            ["--blockdev", "help"],
            "Available block drivers (--blockdev DRIVER,help lists the options of one):",
        ),
        (["--blockdev", "driver=null-co,help"], "null-co options:"),
        (["--blockdev", "raw,help"], "raw options:"),
        (["--export", "type=nbd,help"], "nbd options:"),
        (["--nbd-server", "help"], "nbd-server options:"),
        (["--monitor", "help"], "monitor options:"),
        (["--object", "help"], "List of user creatable objects:"),
        (["--object", "iothread,help"], "iothread options:"),
        (["--chardev", "help"], "Available chardev backend types: "),
        (
            ["--chardev", "socket,help"],
            "socket options (typed syntax, --chardev socket,id=ID,...):",
        ),
    ],
)
def test_help_requests(scratch: Path, args: list[str], first_line: str) -> None:
    result = run_cli(*args, cwd=scratch)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[0] == first_line
    assert len(result.stdout.splitlines()) > 1


def test_driver_help_is_still_a_value(scratch: Path) -> None:
    result = run_cli("--blockdev", "driver=help", cwd=scratch)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.endswith(
        ": --blockdev driver=help: Parameter 'driver' does not accept value 'help'\n"
    )


def test_sizes_the_host_cannot_hold_are_a_clean_error(scratch: Path) -> None:
    """qsd aborts on these (a ringbuf of 4 EiB, a bitmap of a 4 EiB node at 512 bytes a
    bit); ours answers ENOMEM's text, keeps nothing half made, and serves on."""
    huge = 1 << 62
    with DaemonProcess(ours_command(), [], scratch) as daemon:
        assert daemon.wait_ready(), daemon.stderr
        with daemon.connect_qmp() as client:
            client.negotiate()
            ringbuf = {"type": "ringbuf", "data": {"size": huge}}
            reply = client.cmd("chardev-add", {"id": "r", "backend": ringbuf})
            assert reply["error"] == {"class": "GenericError", "desc": "Cannot allocate memory"}
            null = {"driver": "null-co", "node-name": "n", "size": huge}
            assert client.cmd("blockdev-add", null) == {"return": {}}
            bitmap = {"node": "n", "name": "b", "granularity": 512}
            reply = client.cmd("block-dirty-bitmap-add", bitmap)
            assert reply["error"]["desc"] == "Cannot allocate memory"
            nodes = client.cmd("query-named-block-nodes", {"flat": True})["return"]
            assert "dirty-bitmaps" not in nodes[0]
            assert [c["label"] for c in client.cmd("query-chardev")["return"]] == ["qmp0"]
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.stderr
