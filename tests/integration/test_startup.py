"""Start-up as a client sees it: commands answered from the first moment, no pydantic loaded.

The daemon imports only what its command line needs before it serves, and loads the rest in
a worker thread; a client that connects as soon as the socket exists (before the pidfile is
written) must still get every command answered, whichever module it needs. Speed itself is
measured by bench/startup.py, never here.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.daemon import DaemonProcess, ours_command


def mapped_files(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_commands_right_after_the_greeting_and_no_pydantic(scratch: Path) -> None:
    daemon = DaemonProcess(
        ours_command(),
        ["--blockdev", "driver=null-co,node-name=n0"],
        scratch,
        monitor="prepend",  # the monitor exists before the other options are applied
        ready_pidfile=False,  # connect on the greeting, not on the pidfile
    ).start()
    try:
        assert daemon.wait_ready(), daemon.stderr
        qmp = daemon.connect_qmp()
        assert qmp.negotiate() == {"return": {}}
        version = qmp.cmd("query-version")["return"]
        assert version["qemu"] == {"major": 7, "minor": 2, "micro": 0}
        # Commands of every area, each from a different handler module.
        assert qmp.cmd("query-block-exports") == {"return": []}
        assert qmp.cmd("query-jobs") == {"return": []}
        assert qmp.cmd("blockdev-add", {"driver": "null-co", "node-name": "n1", "size": 4096}) == {
            "return": {}
        }
        nodes = qmp.cmd("query-named-block-nodes")["return"]
        assert sorted(node["node-name"] for node in nodes) == ["n0", "n1"]
        error = qmp.cmd("no-such-command")["error"]
        assert error == {
            "class": "CommandNotFound",
            "desc": "The command no-such-command has not been found",
        }
        assert qmp.cmd("blockdev-del", {"node-name": "n1"}) == {"return": {}}
        # pydantic is for tests and tools: the daemon never loads it (its core is a .so).
        maps = mapped_files(daemon.pid)
        assert "pydantic" not in maps
        assert "libpython" in maps or "python" in maps  # the check reads the right process
        qmp.close()
    finally:
        assert daemon.stop() == 0, daemon.stderr
