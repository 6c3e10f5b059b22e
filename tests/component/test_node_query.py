"""x-query-block-node: options with children by name, permissions, users; round trips."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError


def _img(*args: str) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def _images(d: Path) -> tuple[Path, Path]:
    base, top = d / "base.qcow2", d / "top.qcow2"
    _img("create", "-q", "-f", "qcow2", str(base), "1M")
    _img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top), "1M")
    return base, top


async def _equivalent(daemon: Daemon, name: str) -> dict[str, Any]:
    """Feed `name`'s options back under `name`2 and compare what the two nodes look like."""
    info = await daemon.run_command("x-query-block-node", {"node-name": name})
    options = dict(info["options"])
    assert options["node-name"] == name
    options["node-name"] = name + "2"
    await daemon.run_command("blockdev-add", options)
    again = await daemon.run_command("x-query-block-node", {"node-name": name + "2"})
    assert again["options"] == options
    assert again["active"] == info["active"]
    nodes = {n["node-name"]: n for n in await daemon.run_command("query-named-block-nodes", {})}
    old, new = dict(nodes[name]), dict(nodes[name + "2"])
    for entry in (old, new):
        entry.pop("node-name")
    assert new == old
    result: dict[str, Any] = info
    return result


@pytest.fixture(scope="module", autouse=True)
def _warm_models(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the lazily generated schema models outside the tests' event loops."""
    _, top = _images(tmp_path_factory.mktemp("warm"))

    async def warm() -> None:
        daemon = Daemon()
        file = {"driver": "file", "filename": str(top)}
        await daemon.run_command(
            "blockdev-add", {"driver": "qcow2", "node-name": "q", "read-only": True, "file": file}
        )
        await _equivalent(daemon, "q")
        await daemon.shutdown()

    asyncio.run(warm())


async def test_round_trips(scratch: Path) -> None:
    base, top = await asyncio.to_thread(_images, scratch)
    daemon = Daemon()
    run = daemon.run_command
    try:
        await run("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 4096})
        info = await _equivalent(daemon, "n")
        assert info["options"]["size"] == 4096
        await run("blockdev-add", {"driver": "raw", "node-name": "r", "file": "n", "offset": 512})
        info = await _equivalent(daemon, "r")
        assert info["options"]["file"] == "n" and info["options"]["offset"] == 512
        await run("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(base)})
        await _equivalent(daemon, "f")
        # qcow2 with an inline file and a backing file it opened itself: both by name.
        file = {"driver": "file", "filename": str(top)}
        await run(
            "blockdev-add", {"driver": "qcow2", "node-name": "q", "read-only": True, "file": file}
        )
        info = await _equivalent(daemon, "q")
        opts = info["options"]
        assert isinstance(opts["file"], str) and opts["file"].startswith("#block")
        assert isinstance(opts["backing"], str) and opts["backing"].startswith("#block")
        assert opts["read-only"] is True and opts["active"] is True
        backing = await run("x-query-block-node", {"node-name": opts["backing"]})
        # Both qcow2 nodes read the one backing node now.
        assert sorted(p["parent"] for p in backing["parents"]) == ["q", "q2"]
        assert all(p["child"] == "backing" for p in backing["parents"])
        assert backing["permissions"]["perm"] == []  # q and q2 have no users yet
        # A filter.
        await run("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "n2"})
        info = await _equivalent(daemon, "cor")
        assert info["options"]["file"] == "n2"
    finally:
        await daemon.shutdown()


async def test_parents_and_permissions(scratch: Path) -> None:
    sock = scratch / "nbd.sock"
    daemon = Daemon()
    run = daemon.run_command
    try:
        await run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        await run("blockdev-add", {"driver": "null-co", "node-name": "n", "active": False})
        await run("blockdev-add", {"driver": "raw", "node-name": "r", "file": "n", "active": False})
        await run(
            "block-export-add", {"type": "nbd", "id": "x", "node-name": "r", "writable": True}
        )
        info = await run("x-query-block-node", {"node-name": "r"})
        assert info["active"] is True  # the export activated it
        assert info["permissions"] == {
            "perm": ["consistent-read", "write"],
            "shared-perm": ["consistent-read", "write", "write-unchanged"],
        }
        (parent,) = info["parents"]
        assert parent["parent"] == "an unnamed block device (uses node 'r' as 'root' child)"
        assert parent["child"] == "root" and parent["perm"] == ["consistent-read", "write"]
        child = await run("x-query-block-node", {"node-name": "n"})
        assert child["active"] is True and child["parents"][0]["parent"] == "r"
        assert child["parents"][0]["child"] == "file"
        with pytest.raises(QmpError) as err:
            await run("x-query-block-node", {"node-name": "nosuch"})
        assert err.value.desc == "Cannot find device='' nor node-name='nosuch'"
    finally:
        await daemon.shutdown()
