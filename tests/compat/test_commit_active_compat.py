"""block-commit of the active layer on the reference qsd and on ours: the mirror job in commit
mode. Replies, events, the graph and node list while the job runs (rate-limited) and while it
is READY, the graph after complete or cancel, and the images compared with qemu-img.

Test ring (compat). Each test starts a fresh pair of daemons on the same qemu-img-made chain
(base <- mid <- top), stopped by PID at teardown. Queries run while the job sleeps in its rate
limit (after its first 1 MiB request, on both sides) or is READY: nothing depends on timing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, ExpectEof, TranscriptComparison, WaitEvent
from tests.compat.test_block_jobs_compat import (
    STATUS,
    add_chain_by_nodes,
    add_chain_with_filter,
    check_images,
    finish,
    make_chain,
    statuses,
)
from tests.compat.test_graph_compat import snapshot_sync

pytestmark = pytest.mark.compat

JOB = {"job-id": "c0", "device": "top"}


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def ready() -> list[WaitEvent]:
    """From the command to READY: running, (BLOCK_JOB_READY), ready."""
    return [WaitEvent(STATUS), WaitEvent(STATUS), WaitEvent("BLOCK_JOB_READY"), WaitEvent(STATUS)]


def masked(result: TranscriptComparison) -> TranscriptComparison:
    """Leave out what is not the job's to decide or depends on timing:

    * our qcow2 asks and shares fixed permissions on its `file` child, where qsd derives
      them from its users' (the job unshares consistent-read on the intermediate image,
      which qsd passes down to its file): a known gap outside the jobs;
    * replies with id "mid-job" are taken while the job scans or copies its first request:
      how far it got (progress, dirty count, busy, the size of the base's file) depends on
      timing.
    """
    for side in ("reference", "ours"):
        for record in result.norm[side]:
            if not isinstance(record, dict):
                continue
            reply = record.get("reply", {})
            ret = reply.get("return") if isinstance(reply, dict) else None
            if isinstance(ret, dict) and "edges" in ret:
                for edge in ret["edges"]:
                    if edge["name"] == "file":
                        edge.pop("perm")
                        edge.pop("shared-perm")
            if record.get("send", {}).get("id") == "mid-job" and isinstance(ret, list):
                for entry in ret:
                    for key in ("offset", "len", "current-progress", "total-progress", "busy"):
                        entry.pop(key, None)
                    for bitmap in entry.get("dirty-bitmaps", []):
                        bitmap.pop("count")
                    if "image" in entry:
                        entry["image"].pop("actual-size")
                        if entry["image"]["format"] == "file":
                            entry["image"].pop("virtual-size")
    return result


def check(
    compat: Compat, steps: list[Any], timed: tuple[str, ...] = (), **kw: Any
) -> TranscriptComparison:
    """Run `steps` on both sides; the reference must answer every step (a wait that timed
    out on both sides would compare equal and prove nothing), then the sides must agree.
    The events named in `timed` come at a moment that depends on timing: their offset is
    left out."""
    result = masked(compat.run_transcript(steps, **kw))
    for side in ("reference", "ours"):
        for record in result.norm[side]:
            if isinstance(record, dict) and record.get("wait-event") in timed:
                record["event"]["data"].pop("offset", None)
    for record in result.norm["reference"]:
        assert not (isinstance(record, dict) and "outcome" in record), record
    result.assert_same()
    return result


@pytest.mark.parametrize("extra", [{}, {"filter-node-name": "ct"}])
def test_graph_while_running_ready_and_after(compat: Compat, extra: dict[str, Any]) -> None:
    """The mirror_top filter above the top, the job's edges and permissions, the dirty bitmap
    on the top, qsd's op blockers; then the chain after the pivot (the top's users moved onto
    the base)."""
    check(
        compat,
        [
            *add_chain_by_nodes(),
            Cmd("block-commit", {**JOB, "speed": 1024, **extra}),
            *statuses(2),
            Cmd("x-debug-query-block-graph"),
            Cmd("query-named-block-nodes", {"flat": True}, id="mid-job"),
            Cmd("query-block-jobs", id="mid-job"),
            Cmd("query-jobs", id="mid-job"),
            Cmd("blockdev-del", {"node-name": "top"}),
            Cmd("blockdev-del", {"node-name": "base"}),
            Cmd("block-stream", {"job-id": "s1", "device": "top"}),
            Cmd("block-commit", {"job-id": "c1", "device": "top", "top-node": "mid"}),
            Cmd("block-job-set-speed", {"device": "c0", "speed": 0}),
            WaitEvent("BLOCK_JOB_READY"),
            WaitEvent(STATUS),
            Cmd("x-debug-query-block-graph"),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("query-block-jobs"),
            Cmd("job-complete", {"id": "c0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            Cmd("x-debug-query-block-graph"),
            *finish(),
        ],
        setup=make_chain,
    )
    check_images(compat)


def test_errors(compat: Compat) -> None:
    check(
        compat,
        [
            *add_chain_by_nodes(),
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "other"}),
            Cmd("block-commit", {**JOB, "top-node": "other"}),
            Cmd("block-commit", {**JOB, "base-node": "other"}),
            Cmd("block-commit", {**JOB, "base-node": "top"}),
            Cmd("block-commit", {**JOB, "top-node": "top", "base-node": "top"}),
            Cmd("block-commit", {**JOB, "top-node": "mid", "base-node": "top"}),
            Cmd("block-commit", {**JOB, "backing-file": "x"}),
            Cmd("block-commit", {**JOB, "filter-node-name": "base"}),
            Cmd("block-commit", {**JOB, "filter-node-name": "#x"}),
            Cmd("block-commit", {**JOB, "speed": -1}),  # the job exists: created, null
            *statuses(2),
            Cmd("block-commit", {**JOB, "job-id": "#bad"}),
            Cmd("block-commit", {"device": "top"}),
            Cmd("query-named-block-nodes", {"flat": True}),  # the base is read-only again
            Cmd("block-commit", {**JOB, "speed": 1024, "filter-node-name": "ft"}),
            *statuses(2),
            Cmd("block-commit", {**JOB, "job-id": "c1"}),
            Cmd("block-commit", {**JOB, "job-id": "c1", "device": "ft"}),
            Cmd("block-commit", {**JOB, "job-id": "c1", "device": "base"}),
            Cmd("job-complete", {"id": "c0"}),
            Cmd("block-job-complete", {"device": "c0"}),
            Cmd("job-pause", {"id": "c0"}),
            WaitEvent(STATUS),  # paused
            Cmd("query-block-jobs", id="mid-job"),
            Cmd("job-resume", {"id": "c0"}),
            WaitEvent(STATUS),  # running
            Cmd("block-job-cancel", {"device": "c0"}),  # before READY: a real cancel
            WaitEvent("BLOCK_JOB_CANCELLED"),
            Cmd("x-debug-query-block-graph"),
            Cmd("query-named-block-nodes", {"flat": True}),  # the base stays read-write
            *finish(),
        ],
        timed=("BLOCK_JOB_CANCELLED",),  # how far it got before the cancel
        setup=make_chain,
    )


@pytest.mark.parametrize(
    "cancel",
    [
        Cmd("block-job-cancel", {"device": "c0"}),  # READY: completes, no pivot
        Cmd("block-job-cancel", {"device": "c0", "force": True}),
        Cmd("job-cancel", {"id": "c0"}),
    ],
    ids=["soft", "force", "job-cancel"],
)
def test_cancel_in_ready_leaves_the_chain(compat: Compat, cancel: Cmd) -> None:
    """Soft, the job converges and completes without the pivot; forced, it is cancelled.
    Either way the export of the top goes back onto the top."""
    soft = cancel.args == {"device": "c0"}
    event = "BLOCK_JOB_COMPLETED" if soft else "BLOCK_JOB_CANCELLED"
    check(
        compat,
        [
            *add_chain_by_nodes(),
            Cmd(
                "block-export-add",
                {"type": "nbd", "id": "e0", "node-name": "top", "writable": True},
            ),
            Cmd("block-commit", JOB),
            *ready(),
            cancel,
            *statuses(2 if soft else 1),
            WaitEvent(event),
            *statuses(2),
            Cmd("query-block-exports"),
            *finish(),
        ],
        setup=make_chain,
        args=["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"],
    )
    check_images(compat)


def test_manual_finalize_and_dismiss(compat: Compat) -> None:
    check(
        compat,
        [
            *add_chain_by_nodes(),
            Cmd("block-commit", {**JOB, "auto-finalize": False, "auto-dismiss": False}),
            *ready(),
            Cmd("job-finalize", {"id": "c0"}),
            Cmd("job-complete", {"id": "c0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_PENDING"),
            Cmd("query-jobs"),
            Cmd("x-debug-query-block-graph"),
            Cmd("job-dismiss", {"id": "c0"}),
            Cmd("job-finalize", {"id": "c0"}),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(1),
            Cmd("query-block-jobs"),
            Cmd("x-debug-query-block-graph"),
            Cmd("job-dismiss", {"id": "c0"}),
            *statuses(1),
            *finish(),
        ],
        setup=make_chain,
    )
    check_images(compat)


def make_small_base(d: Path) -> None:
    """A 1 MiB base under a 4 MiB top: the commit grows the base first."""
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "1M")
    _run("qemu-io", "-c", "write -P 1 0 512k", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/mid.qcow2")
    _run("qemu-img", "resize", "-q", f"{d}/mid.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 2 256k 128k", f"{d}/mid.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    _run("qemu-io", "-c", "write -P 3 3M 64k", f"{d}/top.qcow2")


def test_base_smaller_than_top_grows(compat: Compat) -> None:
    check(
        compat,
        [
            *add_chain_by_nodes(),
            Cmd("block-commit", JOB),
            *ready(),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("job-complete", {"id": "c0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_small_base,
    )
    check_images(compat)


def test_export_moves_to_the_base(compat: Compat) -> None:
    """An NBD export of the top is served from the filter while the job runs, and from the
    commit's base after the pivot: first the middle image (the old top still uses it), then,
    the old top deleted, the middle image committed into the base."""
    check(
        compat,
        [
            *add_chain_by_nodes(),
            Cmd(
                "block-export-add",
                {"type": "nbd", "id": "e0", "node-name": "top", "writable": True},
            ),
            Cmd("block-commit", {**JOB, "base-node": "mid", "top-node": "top"}),
            *ready(),
            Cmd("x-debug-query-block-graph"),
            Cmd("query-block-exports"),
            Cmd("job-complete", {"id": "c0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            Cmd("query-block-exports"),
            Cmd("x-debug-query-block-graph"),
            Cmd("block-commit", {**JOB, "device": "mid"}),  # the old top still uses it
            Cmd("blockdev-del", {"node-name": "top"}),
            Cmd("block-commit", {**JOB, "device": "mid"}),
            *ready(),
            Cmd("job-complete", {"id": "c0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            Cmd("query-block-exports"),
            *finish(),
        ],
        setup=make_chain,
        args=["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"],
    )
    check_images(compat)


def test_intermediate_top_with_a_writer(compat: Compat) -> None:
    """A top below the active layer that someone writes (an export) is committed as the active
    layer is: a mirror whose pivot moves the overlay and the export onto the base."""
    steps = add_chain_by_nodes()
    mid = steps[1].args
    assert mid is not None
    steps[1] = Cmd("blockdev-add", {**mid, "read-only": False})
    check(
        compat,
        [
            *steps,
            Cmd(
                "block-export-add",
                {"type": "nbd", "id": "e0", "node-name": "mid", "writable": True},
            ),
            Cmd("block-commit", {**JOB, "top-node": "mid", "backing-file": "x"}),
            Cmd("block-commit", {**JOB, "top-node": "mid"}),
            *ready(),
            Cmd("x-debug-query-block-graph"),
            Cmd("job-complete", {"id": "c0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            Cmd("query-block-exports"),
            Cmd("x-debug-query-block-graph"),
            *finish(),
        ],
        setup=make_chain,
        args=["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"],
    )
    check_images(compat)


@pytest.mark.parametrize("base", ["mid", "filt", "base"])
def test_filter_in_the_chain(compat: Compat, base: str) -> None:
    """top -> filt (throttle) -> mid -> base: the job's hold on a filter right above its
    base lets others read it; a filter as the base is refused or committed into as qsd does."""
    check(
        compat,
        [
            *add_chain_with_filter(),
            Cmd("block-commit", {**JOB, "base-node": base, "speed": 1024}),
            *statuses(2),
            Cmd("x-debug-query-block-graph"),
            Cmd("block-job-set-speed", {"device": "c0", "speed": 0}),
            WaitEvent("BLOCK_JOB_READY"),
            WaitEvent(STATUS),
            Cmd("job-complete", {"id": "c0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_chain,
    )


def test_quit_while_ready(compat: Compat) -> None:
    """Shutting down cancels the job: the chain and the images stay as they were, the base
    holding what was committed so far."""
    result = compat.run_transcript(
        [
            *add_chain_by_nodes(),
            Cmd("block-commit", {**JOB, "auto-dismiss": False}),
            *ready(),
            Cmd("quit"),
            ExpectEof(),
        ],
        setup=make_chain,
    )
    result.assert_same()
    check_images(compat)


def test_snapshot_overlay_committed_back_is_freed(compat: Compat) -> None:
    """The everyday round trip: blockdev-snapshot-sync puts an implicit overlay above an
    exported image, then an active commit merges it back. After the pivot nothing uses the
    overlay any more, and qsd frees it with the job: it leaves the node list (a persistent
    bitmap added on it is stored into its image as it closes)."""
    check(
        compat,
        [
            *add_chain_by_nodes(),
            Cmd(
                "block-export-add",
                {"type": "nbd", "id": "e0", "node-name": "top", "writable": True},
            ),
            snapshot_sync("top", "ov", format="qcow2"),
            Cmd("block-dirty-bitmap-add", {"node": "ov", "name": "o1", "persistent": True}),
            Cmd("block-commit", {**JOB, "device": "ov"}),
            *ready(),
            Cmd("job-complete", {"id": "c0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            Cmd("query-block-exports"),
            Cmd("x-debug-query-block-graph"),
            Cmd("query-named-block-nodes", {"flat": True}),
            *finish(),
        ],
        setup=make_chain,
        args=["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"],
    )
    for side, d in compat.dirs.items():
        info = _run("qemu-img", "info", "--output=json", str(d / "ov.qcow2"))
        assert '"name": "o1"' in info, (side, info)
