"""Block-graph fidelity on the reference qsd and on ours: blockdev-del's blockers, node order
and backing depth in query-named-block-nodes, json: pseudo-filenames, block jobs and edge
permissions in x-debug-query-block-graph, and overlays freed with their last user.

Test ring (compat). Every case runs on a fresh pair of daemons over a qemu-img-made chain
(base <- top); the reference decides every expected answer.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, ExpectEof, WaitEvent

pytestmark = pytest.mark.compat

STATUS = "JOB_STATUS_CHANGE"
NBD_START = Cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "$D/nbd.sock"}}})
GRAPH = Cmd("x-debug-query-block-graph")
FLAT = Cmd("query-named-block-nodes", {"flat": True})
NESTED = Cmd("query-named-block-nodes", {"flat": False})
QUIT: list[Cmd | ExpectEof] = [Cmd("quit"), ExpectEof()]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def make_chain(d: Path) -> None:
    """base <- mid <- top (relative backing names, as qemu-img writes them), and a lone snap."""
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "4M")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/mid.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/snap.qcow2", "4M")


def qcow2(name: str, image: str, **extra: Any) -> dict[str, Any]:
    return {
        "driver": "qcow2",
        "node-name": name,
        "file": {"driver": "file", "node-name": f"{name}-file", "filename": f"$D/{image}.qcow2"},
        **extra,
    }


def export(node: str, export_id: str) -> Cmd:
    return Cmd("block-export-add", {"type": "nbd", "id": export_id, "node-name": node,
                                    "name": export_id, "writable": True})  # fmt: skip


def snapshot_sync(node: str, overlay: str, **extra: Any) -> Cmd:
    """blockdev-snapshot-sync of `node` into `$D/<overlay>.qcow2`, node name `overlay`."""
    args = {
        "node-name": node,
        "snapshot-file": f"$D/{overlay}.qcow2",
        "snapshot-node-name": overlay,
    }
    return Cmd("blockdev-snapshot-sync", {**args, **extra})


def test_blockdev_del_blockers(compat: Compat) -> None:
    """Backing blocker, implicit and monitor-less nodes, export before blocker, file child,
    a job's blocker, and the source a backup filter holds."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", qcow2("base", "base", backing=None)),
            Cmd("blockdev-add", qcow2("mid", "mid", backing="base")),
            Cmd("blockdev-del", {"node-name": "base"}),
            Cmd("blockdev-del", {"node-name": "base-file"}),
            Cmd("blockdev-del", {"node-name": "nosuch"}),
            NBD_START,
            export("base", "e0"),
            Cmd("blockdev-del", {"node-name": "base"}),
            Cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "mid"}),
            Cmd("blockdev-del", {"node-name": "mid"}),
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "src", "size": 1 << 22}),
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "tgt", "size": 1 << 22}),
            Cmd(
                "blockdev-backup",
                {
                    "job-id": "bk",
                    "device": "src",
                    "target": "tgt",
                    "sync": "none",
                    "auto-dismiss": False,
                },
            ),
            WaitEvent(STATUS),  # created
            WaitEvent(STATUS),  # running
            Cmd("blockdev-del", {"node-name": "src"}),
            Cmd("blockdev-del", {"node-name": "tgt"}),
            Cmd("job-cancel", {"id": "bk"}),
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *[WaitEvent(STATUS) for _ in range(4)],  # paused, running, aborting, concluded
            Cmd("job-dismiss", {"id": "bk"}),
            Cmd("blockdev-del", {"node-name": "tgt"}),
            Cmd("blockdev-del", {"node-name": "r"}),
            Cmd("blockdev-del", {"node-name": "mid"}),
            FLAT,
            *QUIT,
        ],
        setup=make_chain,
    )


def test_node_order_and_backing_depth(compat: Compat) -> None:
    """A node joins the list after its file child and before its backing (nested inline or
    opened from the header); backing_file_depth and the nested backing-image follow the
    chain, filters included, and only when not flat."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", qcow2("top", "top", backing=qcow2("mid", "mid"))),
            FLAT,
            NESTED,
            Cmd(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "m2",
                    "file": {"driver": "file", "filename": "$D/mid.qcow2"},
                },
            ),
            FLAT,
            NESTED,
            GRAPH,
            Cmd("object-add", {"qom-type": "throttle-group", "id": "tg"}),
            Cmd(
                "blockdev-add",
                {"driver": "throttle", "node-name": "filt", "throttle-group": "tg", "file": "top"},
            ),
            NESTED,
            *QUIT,
        ],
        setup=make_chain,
    )


def test_json_filenames(compat: Compat) -> None:
    """A backing other than the header's (none, or another node) gives a json: filename;
    raw over a protocol node passes its name on; a snapshot of a json-named node records
    that name as the overlay's backing."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", qcow2("base", "base")),
            Cmd("blockdev-add", qcow2("nob", "mid", backing=None, **{"read-only": True})),
            Cmd("blockdev-add", qcow2("top", "top", backing="base")),
            Cmd("blockdev-add", {"driver": "raw", "node-name": "rf", "file": "top-file"}),
            FLAT,
            Cmd("blockdev-del", {"node-name": "rf"}),
            NBD_START,
            export("top", "e0"),
            snapshot_sync("top", "ov", format="qcow2"),
            NESTED,
            *QUIT,
        ],
        setup=make_chain,
    )


def test_concluded_job_in_graph_and_cow_perms(compat: Compat) -> None:
    """drive-backup sync=none: the target's backing edge takes nothing (its user only
    writes); once concluded, the job still shows as a block-job node until dismissed."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", qcow2("top", "top")),
            NBD_START,
            export("top", "e0"),
            Cmd(
                "drive-backup",
                {
                    "job-id": "bk",
                    "device": "top",
                    "target": "$D/bk.qcow2",
                    "sync": "none",
                    "format": "qcow2",
                    "mode": "absolute-paths",
                    "auto-dismiss": False,
                },
            ),
            WaitEvent(STATUS),  # created
            WaitEvent(STATUS),  # running
            GRAPH,
            Cmd("job-cancel", {"id": "bk"}),
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *[WaitEvent(STATUS) for _ in range(4)],  # paused, running, aborting, concluded
            GRAPH,
            Cmd("job-dismiss", {"id": "bk"}),
            GRAPH,
            *QUIT,
        ],
        setup=make_chain,
    )


def test_overlay_freed_with_its_export(compat: Compat) -> None:
    """A blockdev-snapshot-sync overlay belongs to its users, not to the monitor: deleting
    the export frees it (its backing becomes deletable); a blockdev-add overlay stays."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", qcow2("top", "top")),
            NBD_START,
            export("top", "e0"),
            snapshot_sync("top", "ov"),
            FLAT,
            Cmd("blockdev-del", {"node-name": "ov"}),
            Cmd("blockdev-del", {"node-name": "top"}),
            Cmd("block-export-del", {"id": "e0"}),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            FLAT,
            Cmd("blockdev-del", {"node-name": "ov"}),
            Cmd("blockdev-del", {"node-name": "top"}),
            Cmd("blockdev-add", qcow2("snap", "snap", backing=None)),
            Cmd("blockdev-add", qcow2("t2", "top")),
            Cmd("blockdev-snapshot", {"node": "t2", "overlay": "snap"}),
            export("snap", "e1"),
            Cmd("block-export-del", {"id": "e1"}),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            FLAT,
            GRAPH,
            *QUIT,
        ],
        setup=make_chain,
    )


def test_permission_words_in_conflicts(compat: Compat) -> None:
    """qsd's messages name permissions in words ("consistent read", "write unchanged"),
    unlike the queries, which use the QAPI names ("consistent-read")."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "$D/base.qcow2"}),
            Cmd("blockdev-add", {"driver": "qcow2", "node-name": "d0", "file": "f0"}),
            Cmd(
                "blockdev-mirror",
                {"job-id": "j", "device": "d0", "target": "f0", "sync": "full"},
            ),
            Cmd("blockdev-add", {"driver": "file", "node-name": "f1", "filename": "$D/base.qcow2"}),
        ],
        setup=make_chain,
    )


def test_blockdev_snapshot_overlay_checks(compat: Compat) -> None:
    """Which overlays blockdev-snapshot takes: one that nothing reads (users that only write,
    or none; a user that reads makes it "in use"); not a filter, not the node itself (a
    cycle), not a driver without backing files; the graph afterwards."""

    def add(driver: str, name: str, **opts: Any) -> Cmd:
        return Cmd("blockdev-add", {"driver": driver, "node-name": name, **opts})

    def snap(node: str, overlay: str) -> Cmd:
        return Cmd("blockdev-snapshot", {"node": node, "overlay": overlay})

    compat.check_transcript(
        [
            add("file", "f0", filename="$D/base.qcow2"),
            add("qcow2", "d0", file="f0"),
            add("null-co", "n0", size=1 << 20),
            add("blkdebug", "x2", image="f0"),
            add("raw", "x7", file={"driver": "file", "filename": "$D/snap.qcow2"}),
            snap("x7", "x2"),
            add("null-aio", "na", size=1 << 20),
            add("copy-on-read", "x9", file="na"),
            snap("d0", "x9"),
            add("copy-on-read", "x3", file="d0"),
            snap("d0", "d0"),
            add("copy-on-read", "x4", file="n0"),
            snap("x7", "n0"),
            snap("x7", "f0"),  # read by d0: in use
            snap("x7", "d0"),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("x-debug-query-block-graph"),
        ],
        setup=make_chain,
    )


def test_block_resize_of_a_blocked_node(compat: Compat) -> None:
    """A backing node or a job's node is refused before any permission is asked, with
    qsd's text naming the device argument ("(null)" when only node-name was given)."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", qcow2("base", "base")),
            Cmd("blockdev-add", qcow2("mid", "mid", backing="base")),
            Cmd("block_resize", {"node-name": "base", "size": 8 << 20}),
            Cmd("block_resize", {"device": "x", "node-name": "base", "size": 8 << 20}),
            Cmd("block_resize", {"node-name": "mid-file", "size": 8 << 20}),
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 4 << 20}),
            Cmd("blockdev-add", qcow2("sn", "snap")),
            Cmd(
                "blockdev-mirror",
                {"job-id": "j", "device": "n0", "target": "sn", "sync": "full", "speed": 1},
            ),
            Cmd("block_resize", {"node-name": "n0", "size": 8 << 20}),
            Cmd("block_resize", {"node-name": "sn", "size": 8 << 20}),
            Cmd("block_resize", {"node-name": "mid", "size": 8 << 20}),
            Cmd("block-job-cancel", {"device": "j", "force": True}),
            WaitEvent("JOB_STATUS_CHANGE"),
        ],
        setup=make_chain,
    )


def test_blockdev_add_check_order(compat: Compat) -> None:
    """When several things are wrong, qsd reports the `file` reference first (it opens the
    file before the node), then force-share, detect-zeroes, the node name, the driver's own
    options."""

    def add(driver: str, name: str, **opts: Any) -> Cmd:
        return Cmd("blockdev-add", {"driver": driver, "node-name": name, **opts})

    compat.check_transcript(
        [
            add("file", "f0", filename="$D/base.qcow2"),
            add("qcow2", "d0", file="f0"),
            add("throttle", "f0", **{"throttle-group": "nosuch", "file": ""}),
            add("throttle", "1abc", **{"throttle-group": "", "file": "nosuch"}),
            add("qcow2", "#bad", file="nosuch"),
            add("throttle", "x4", **{"throttle-group": "nosuch", "file": "nosuch"}),
            add("raw", "x10", file="d0", **{"detect-zeroes": "unmap", "force-share": True}),
            add("raw", "x11", file="nosuch", **{"detect-zeroes": "unmap", "force-share": True}),
            add("raw", "f0", file="d0", **{"read-only": True, "force-share": True,
                                          "detect-zeroes": "unmap"}),
            add("raw", "1x", file="d0", **{"detect-zeroes": "unmap"}),
            add("raw", "1x", file="d0"),
        ],
        setup=make_chain,
    )  # fmt: skip
