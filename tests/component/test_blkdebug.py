"""The blkdebug filter in process: qsd's rule semantics, the event hook for parent drivers,
and what image info says about blkdebug nodes (tests/compat/test_blkdebug_compat.py compares
the same rules live with the reference)."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import storage_daemon.monitor.commands  # noqa: F401  (handlers imported before any loop runs)
from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.blkdebug import BlkdebugDriver, InjectRule, debug_event
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError

MiB = 1 << 20


class User:
    """A non-node parent, as an export attaches."""

    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


async def stack(
    inject: list[dict[str, Any]], set_state: list[dict[str, Any]] | None = None, top: str = "raw"
) -> tuple[Daemon, BdrvChild]:
    """raw (or nothing) over blkdebug over null-co, and a user attached on top."""
    daemon = Daemon()
    blkdebug: dict[str, Any] = {
        "driver": "blkdebug",
        "node-name": "bd",
        "image": {"driver": "null-co", "size": MiB, "read-zeroes": True},
        "inject-error": inject,
        "set-state": set_state or [],
        "discard": "unmap",
    }
    if top == "raw":
        await daemon.run_command("blockdev-add", blkdebug)
        await daemon.run_command(
            "blockdev-add", {"driver": "raw", "node-name": "top", "file": "bd", "discard": "unmap"}
        )
    else:
        await daemon.run_command("blockdev-add", {**blkdebug, "node-name": "top"})
    node = daemon.graph.lookup("top")
    perm = Perm.CONSISTENT_READ | Perm.WRITE
    edge = daemon.graph.attach(User(), node, "root", ChildRole.PRIMARY, perm, PERM_ALL)
    return daemon, edge


async def outcome(coro: Any) -> str:
    try:
        await coro
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    return "ok"


def blkdebug_of(daemon: Daemon, name: str = "bd") -> BlkdebugDriver:
    driver = daemon.graph.lookup(name).driver
    assert isinstance(driver, BlkdebugDriver)
    return driver


async def test_sector_once_and_an_event_replacing_armed_rules() -> None:
    _, edge = await stack(
        [
            {"event": "read_aio", "sector": 8},
            {"event": "write_aio", "errno": errno.ENOSPC, "once": True},
        ]
    )
    results = [
        await outcome(io.pread(edge, 0, 512)),
        await outcome(io.pread(edge, 4096, 512)),
        await outcome(io.pread(edge, 0, 8192)),  # covers sector 8
        await outcome(io.pwrite(edge, 0, b"x" * 512)),  # write_aio re-arms: its rule only
        await outcome(io.pwrite(edge, 0, b"x" * 512)),  # `once`: gone
        await outcome(io.pwrite(edge, 4096, b"x" * 512)),  # the read rule was disarmed
        await outcome(io.pread(edge, 4096, 512)),  # ... until read_aio arms it again
    ]
    assert results == ["ok", "EIO", "EIO", "ENOSPC", "ok", "ok", "EIO"]


async def test_rules_without_inject_keep_armed_rules_and_defaults_cover_writes() -> None:
    _, edge = await stack(
        [{"event": "read_aio", "sector": 8}],
        [{"event": "write_aio", "new_state": 2}],
    )
    assert await outcome(io.pread(edge, 0, 512)) == "ok"
    # write_aio arms nothing, so the read rule (reads and writes by default) stays armed.
    assert await outcome(io.pwrite(edge, 4096, b"x" * 512)) == "EIO"


async def test_states_first_declared_set_state_wins() -> None:
    daemon, edge = await stack(
        [
            {"event": "read_aio", "state": 3, "errno": errno.ENOSPC},
            {"event": "read_aio", "state": 2, "errno": errno.EROFS},
        ],
        [
            {"event": "read_aio", "state": 1, "new_state": 3},
            {"event": "read_aio", "state": 1, "new_state": 2},
        ],
    )
    assert await outcome(io.pread(edge, 0, 512)) == "ok"  # rules see state 1, then 1 -> 3
    assert blkdebug_of(daemon).state == 3
    assert await outcome(io.pread(edge, 0, 512)) == "ENOSPC"


async def test_immediately_errno_zero_and_rule_order() -> None:
    _, edge = await stack(
        [
            {"event": "read_aio", "sector": 8, "errno": 0, "immediately": True},
            {"event": "read_aio", "sector": 16, "immediately": True},
            {"event": "read_aio", "errno": errno.ENOSPC},
        ]
    )
    assert await outcome(io.pread(edge, 4096, 512)) == "ok"  # errno 0 matched first
    assert await outcome(io.pread(edge, 8192, 512)) == "EIO"
    assert await outcome(io.pread(edge, 0, 512)) == "ENOSPC"


async def test_generic_write_events_fire_even_after_a_failed_write() -> None:
    daemon, edge = await stack(
        [
            {"event": "pwritev", "iotype": "write", "errno": errno.ENOSPC, "once": True},
            {"event": "pwritev_zero", "iotype": "write-zeroes", "errno": errno.EROFS},
            {"event": "pwritev", "iotype": "discard"},
        ],
        [{"event": "pwritev_done", "new_state": 5}],
    )
    assert await outcome(io.pwrite(edge, 0, b"x" * 512)) == "ENOSPC"
    assert blkdebug_of(daemon).state == 5
    assert await outcome(io.pwrite_zeroes(edge, 0, 4096, may_unmap=False)) == "EROFS"
    assert await outcome(io.pwrite(edge, 0, b"x" * 512)) == "ok"
    assert await outcome(io.pdiscard(edge, 0, 4096)) == "EIO"


async def test_flush_is_checked_only_when_writes_need_flushing() -> None:
    _, edge = await stack([{"event": "flush_to_disk", "iotype": "flush"}])
    assert await outcome(io.flush(edge)) == "ok"
    await io.pwrite(edge, 0, b"x" * 512)
    assert await outcome(io.flush(edge)) == "EIO"
    assert await outcome(io.flush(edge)) == "EIO"  # a failed flush leaves the data unflushed


async def test_parents_raising_events_replace_the_ones_blkdebug_raises() -> None:
    daemon, edge = await stack(
        [
            {"event": "read_aio", "iotype": "read"},
            {"event": "l2_load", "iotype": "read", "sector": 0, "errno": errno.ENOSPC},
        ]
    )
    assert await outcome(io.pread(edge, 0, 512)) == "EIO"  # raw raises nothing yet: bd does
    raw = daemon.graph.lookup("top")
    raw.driver.raises_debug_events = True  # type: ignore[attr-defined]
    assert await outcome(io.pread(edge, 0, 512)) == "EIO"  # still armed
    file_edge = raw.child("file")
    debug_event(file_edge, "l2_load")  # what an instrumented parent calls
    assert await outcome(io.pread(edge, 4096, 512)) == "ok"  # read rule replaced
    assert await outcome(io.pread(edge, 0, 512)) == "ENOSPC"
    debug_event(None, "l2_load")
    null_edge = daemon.graph.lookup("bd").child("image")
    debug_event(null_edge, "l2_load")  # other drivers do not listen


async def test_direct_users_raise_only_the_write_paths_events() -> None:
    """As in qsd: no read_aio/write_aio/flush events without a parent driver to raise them."""
    _, edge = await stack(
        [
            {"event": "read_aio", "sector": 8},
            {"event": "flush_to_disk", "iotype": "flush"},
            {"event": "pwritev", "iotype": "read", "sector": 8, "errno": errno.ENOSPC},
        ],
        top="none",
    )
    assert await outcome(io.pread(edge, 4096, 512)) == "ok"
    await io.pwrite(edge, 0, b"x" * 512)
    assert await outcome(io.flush(edge)) == "ok"
    assert await outcome(io.pread(edge, 4096, 512)) == "ENOSPC"  # armed by pwritev


async def test_image_info_has_no_actual_size_under_blkdebug(scratch: Path) -> None:
    daemon = Daemon()
    image = scratch / "a.raw"
    image.write_bytes(b"x" * 100000)
    await daemon.run_command(
        "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(image)}
    )
    for name, driver, child in [
        ("r", "raw", "f"),
        ("bd", "blkdebug", "f"),
        ("rbd", "raw", "bd"),
        ("cor", "copy-on-read", "r"),
        ("corbd", "copy-on-read", "rbd"),
    ]:
        key = "image" if driver == "blkdebug" else "file"
        await daemon.run_command("blockdev-add", {"driver": driver, "node-name": name, key: child})
    nodes = await daemon.run_command("query-named-block-nodes", {"flat": True})
    sizes = {n["node-name"]: n["image"].get("actual-size") for n in nodes}
    assert sizes["f"] == sizes["r"] == sizes["cor"] and sizes["f"] >= 100000
    assert sizes["bd"] is None and sizes["rbd"] is None and sizes["corbd"] is None


@pytest.mark.parametrize("iotype", ["read", "write"])
async def test_once_rule_fails_exactly_one_request(iotype: str) -> None:
    _, edge = await stack([{"event": f"{iotype}_aio", "iotype": iotype, "once": True}])

    def request() -> Any:
        if iotype == "read":
            return io.pread(edge, 0, 512)
        return io.pwrite(edge, 0, b"y" * 512)

    assert [await outcome(request()) for _ in range(3)] == ["EIO", "ok", "ok"]


async def test_names_and_refused_config() -> None:
    daemon, _ = await stack([{"event": "read_aio", "sector": 8, "once": True}], top="none")
    nodes = await daemon.run_command("query-named-block-nodes", {"flat": True})
    name = next(n["file"] for n in nodes if n["node-name"] == "top")
    assert name.startswith("json:{")
    assert json.loads(name[5:]) == {
        "driver": "blkdebug",
        "image": {"driver": "null-co", "read-zeroes": True, "size": MiB},
        "inject-error.0.event": "read_aio",
        "inject-error.0.sector": 8,
        "inject-error.0.once": True,
    }
    await daemon.run_command(
        "blockdev-add", {"driver": "blkdebug", "node-name": "plain", "image": {"driver": "null-co"}}
    )
    nodes = await daemon.run_command("query-named-block-nodes", {"flat": True})
    assert next(n["file"] for n in nodes if n["node-name"] == "plain") == "blkdebug::null-co://"
    with pytest.raises(QmpError) as info:
        await daemon.run_command(
            "blockdev-add",
            {
                "driver": "blkdebug",
                "node-name": "b2",
                "config": "/x",
                "image": {"driver": "null-co"},
            },
        )
    assert "config" in info.value.desc


# --- qcow2 above blkdebug: the events qsd 7.2's qcow2 raises, in its order ------------------
# (tests/compat/test_blkdebug_compat.py compares the outcomes of rules on them with qsd live).


async def qcow2_stack(scratch: Path, *prefill: str) -> tuple[Daemon, BdrvChild, list[str]]:
    """qcow2 over blkdebug over a 1 GiB image (qemu-io runs `prefill` on it first); the list
    collects the events the blkdebug node hears, flush events left out (see FLUSH_GAP in the
    compat test: blkdebug still raises those itself)."""
    image = scratch / "img.qcow2"
    steps = [["qemu-img", "create", "-f", "qcow2", str(image), "1G"]]
    if prefill:
        steps.append(["qemu-io", "-f", "qcow2", str(image), *(f"-c{c}" for c in prefill)])
    for step in steps:
        await asyncio.to_thread(subprocess.run, step, check=True, capture_output=True)
    daemon = Daemon()
    heard: list[str] = []
    spec = {
        "driver": "qcow2",
        "node-name": "top",
        "file": {
            "driver": "blkdebug",
            "node-name": "bd",
            "image": {"driver": "file", "filename": str(image)},
        },
    }
    original = BlkdebugDriver.debug_event

    def listen(self: BlkdebugDriver, event: str) -> None:
        if event not in ("flush_to_os", "flush_to_disk"):
            heard.append(event)
        original(self, event)

    # Patched on the class before blockdev-add: the open's events are heard too.
    BlkdebugDriver.debug_event = listen  # type: ignore[method-assign]
    try:
        await daemon.run_command("blockdev-add", spec)
    finally:
        BlkdebugDriver.debug_event = original  # type: ignore[method-assign]
    bd = blkdebug_of(daemon)
    bd.debug_event = lambda event: listen(bd, event)  # type: ignore[method-assign]
    node = daemon.graph.lookup("top")
    perm = Perm.CONSISTENT_READ | Perm.WRITE
    edge = daemon.graph.attach(User(), node, "root", ChildRole.PRIMARY, perm, PERM_ALL)
    return daemon, edge, heard


# What qsd 7.2 raises for a first 512-byte write at 0 of an empty image (probed with blkdebug
# state chains): new L2 table (allocation, refblock write, table write, L1 entry), then the
# data cluster (allocation, zero-fill, data). Ours zero-fills with a zero write only when a
# blkdebug node listens (the new cluster reads as zeroes anyway), so the events are qsd's.
FIRST_WRITE = [
    *("cluster_alloc", "refblock_alloc", "refblock_load"),
    *("refblock_update_part", "pwritev", "pwritev_done"),
    *("l2_alloc_write", "l2_update", "pwritev", "pwritev_done"),
    *("l1_update", "pwritev", "pwritev_done"),
    *("cluster_alloc", "refblock_alloc", "refblock_load", "cluster_alloc_space"),
    *("pwritev_zero", "pwritev_done"),
    *("write_aio", "pwritev", "pwritev_done"),
]


async def test_qcow2_open_and_first_write_raise_qsds_events(scratch: Path) -> None:
    _, edge, heard = await qcow2_stack(scratch)
    assert heard == ["reftable_load"]
    heard.clear()
    await io.pread(edge, 0, 512)  # unallocated: no request reaches the file
    assert heard == []
    await io.pwrite(edge, 0, b"x" * 512)
    assert heard == FIRST_WRITE
    heard.clear()
    await io.pwrite(edge, 512, b"x" * 512)  # in place
    await io.pread(edge, 0, 512)
    assert heard == ["write_aio", "pwritev", "pwritev_done", "read_aio"]


async def test_qcow2_reads_raise_l2_load_read_aio_and_read_compressed(scratch: Path) -> None:
    _, edge, heard = await qcow2_stack(scratch, "write -c 0 64k", "write -P 1 64k 64k")
    heard.clear()
    await io.pread(edge, 65536, 512)
    await io.pread(edge, 0, 512)
    await io.pread(edge, 512, 512)
    assert heard == ["l2_load", "read_aio", "read_compressed", "read_compressed"]


async def test_qcow2_rules_on_its_events_fail_the_requests_qsd_fails(scratch: Path) -> None:
    """cluster_alloc arms a write rule: writes that allocate fail, in-place ones too (the rule
    stays armed), reads do not; l2_load re-arms nothing (no rule), as in qsd."""
    daemon, edge, _ = await qcow2_stack(scratch, "write -P 1 0 64k")
    bd = blkdebug_of(daemon)
    bd.inject.append(
        InjectRule("cluster_alloc", 0, frozenset({"write"}), errno.ENOSPC, -1, False, False)
    )
    assert await outcome(io.pwrite(edge, 0, b"y" * 512)) == "ok"  # in place: nothing armed
    assert await outcome(io.pwrite(edge, 1 << 20, b"y" * 512)) == "ENOSPC"
    assert await outcome(io.pread(edge, 0, 512)) == "ok"
    assert await outcome(io.pwrite(edge, 0, b"y" * 512)) == "ENOSPC"
