"""blockdev-backup (and drive-backup) on the reference qsd and on ours: replies, events, the
graph with the copy-before-write filter in place and after it, compared live; then the targets
compared with qemu-img against the source and against each other.

Test ring (compat). Each test starts a fresh pair of daemons on the same qemu-img-made images,
stopped by PID at teardown. Mid-job steps use sync=none (nothing copied in the background, so
the progress figures do not depend on timing) or an injected error at the last chunk.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, ExpectEof, WaitEvent

pytestmark = pytest.mark.compat

STATUS = "JOB_STATUS_CHANGE"
SECTOR_3M = 3 * 2048 + 256  # in the last data extent of the images (3M + 128k)


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def make_images(d: Path) -> None:
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 7 0 4M", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/src.qcow2")
    _run("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 2M 512k", f"{d}/src.qcow2")
    _run("qemu-io", "-c", "write -z 3M 64k", f"{d}/src.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/tgt.qcow2", "4M")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/small.qcow2", "1M")
    _run("qemu-img", "create", "-f", "raw", f"{d}/t.raw", "4M")
    _run("qemu-img", "convert", "-O", "raw", f"{d}/src.qcow2", f"{d}/src.raw")


def qcow2(name: str, filename: str, **extra: Any) -> Cmd:
    return Cmd("blockdev-add", {"driver": "qcow2", "node-name": name,
                                "file": {"driver": "file", "filename": f"$D/{filename}"},
                                **extra})  # fmt: skip


def raw_over_blkdebug(name: str, filename: str, event: str, sector: int) -> Cmd:
    """Every node named: implicit names are numbered in a different order on each side."""
    rule = {"event": event, "sector": sector, "once": True}
    image = {"driver": "file", "node-name": f"{name}-file", "filename": f"$D/{filename}"}
    dbg = {"driver": "blkdebug", "node-name": f"{name}-dbg", "inject-error": [rule],
           "image": image}  # fmt: skip
    return Cmd("blockdev-add", {"driver": "raw", "node-name": name, "file": dbg})


def statuses(n: int) -> list[WaitEvent]:
    return [WaitEvent(STATUS) for _ in range(n)]


def started() -> list[WaitEvent]:
    return statuses(4)  # created, running, paused, running (qsd's pause while it starts)


def completed(concluded_only: bool = False) -> list[WaitEvent]:
    """waiting, pending, BLOCK_JOB_COMPLETED, concluded (, null)."""
    tail = statuses(1) if concluded_only else statuses(2)
    return [*statuses(2), WaitEvent("BLOCK_JOB_COMPLETED"), *tail]


def finish(named: bool = False) -> list[Any]:
    """The graph, the jobs, quit. `named` adds query-named-block-nodes, only for graphs
    without backing files (ours lists a backing node before its overlay, qsd after it)."""
    return [
        Cmd("x-debug-query-block-graph"),
        *([Cmd("query-named-block-nodes", {"flat": True})] if named else []),
        Cmd("query-jobs"),
        Cmd("quit"),
        ExpectEof(),
    ]


def sides(compat: Compat) -> tuple[Path, Path]:
    ref, ours = (d.workdir for d in compat._daemons[-2:])
    return ref, ours


def same_image(compat: Compat, name: str, fmt: str, expect: str) -> None:
    """`name` is the same on both sides, equals `expect` (raw), and ours passes check."""
    ref, ours = sides(compat)
    _run("qemu-img", "compare", "-f", fmt, "-F", fmt, str(ref / name), str(ours / name))
    _run("qemu-img", "compare", "-f", fmt, "-F", "raw", str(ours / name), str(ours / expect))
    if fmt == "qcow2":
        _run("qemu-img", "check", str(ours / name))


def test_backup_full(compat: Compat) -> None:
    compat.check_transcript(
        [
            qcow2("src", "src.qcow2"),
            qcow2("tgt", "tgt.qcow2"),
            Cmd(
                "blockdev-backup",
                {
                    "job-id": "b0",
                    "device": "src",
                    "target": "tgt",
                    "sync": "full",
                    "auto-dismiss": False,
                },
            ),
            *started(),
            *completed(concluded_only=True),
            Cmd("query-jobs"),
            Cmd("query-block-jobs"),
            Cmd("job-dismiss", {"id": "b0"}),
            *statuses(1),
            *finish(),
        ],
        setup=make_images,
    )
    same_image(compat, "tgt.qcow2", "qcow2", "src.raw")


def test_backup_top(compat: Compat) -> None:
    compat.check_transcript(
        [
            qcow2("src", "src.qcow2"),
            qcow2("tgt", "top.qcow2"),
            Cmd(
                "blockdev-backup",
                {
                    "job-id": "b0",
                    "device": "src",
                    "target": "tgt",
                    "sync": "top",
                    "filter-node-name": "cbw",
                },
            ),
            *started(),
            *completed(),
            *finish(),
        ],
        setup=make_images,
    )
    same_image(compat, "top.qcow2", "qcow2", "src.raw")


def test_backup_none_with_export_pause_cancel(compat: Compat) -> None:
    """Fleecing-style: the export moves onto the filter while the job runs, and back."""
    compat.check_transcript(
        [
            qcow2("src", "src.qcow2"),
            qcow2("tgt", "tgt.qcow2"),
            Cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "$D/nbd.sock"}}}),
            Cmd(
                "block-export-add",
                {"type": "nbd", "id": "e0", "node-name": "src", "writable": True},
            ),
            Cmd(
                "blockdev-backup",
                {"job-id": "b0", "device": "src", "target": "tgt", "sync": "none", "speed": 4096},
            ),
            *started(),
            Cmd("x-debug-query-block-graph"),
            Cmd("query-block-exports"),
            Cmd("query-block-jobs"),
            Cmd("job-pause", {"id": "b0"}),
            *statuses(1),
            Cmd("job-pause", {"id": "b0"}),
            Cmd("query-block-jobs"),
            Cmd("job-complete", {"id": "b0"}),
            Cmd("job-finalize", {"id": "b0"}),
            Cmd("job-resume", {"id": "b0"}),
            *statuses(1),
            Cmd("block-job-set-speed", {"device": "b0", "speed": 0}),
            Cmd("query-jobs"),
            Cmd("block-job-cancel", {"device": "b0"}),
            *statuses(1),
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(2),
            Cmd("query-block-exports"),
            Cmd("block-export-del", {"id": "e0"}),
            WaitEvent("BLOCK_EXPORT_DELETED"),
            *finish(),
        ],
        setup=make_images,
    )


def test_backup_target_error_stop_resume(compat: Compat) -> None:
    compat.check_transcript(
        [
            qcow2("src", "src.qcow2"),
            raw_over_blkdebug("tgt", "t.raw", "write_aio", SECTOR_3M),
            Cmd(
                "blockdev-backup",
                {
                    "job-id": "b0",
                    "device": "src",
                    "target": "tgt",
                    "sync": "full",
                    "on-target-error": "stop",
                },
            ),
            *started(),
            WaitEvent("BLOCK_JOB_ERROR"),
            *statuses(1),  # paused
            Cmd("query-block-jobs"),
            Cmd("job-resume", {"id": "b0"}),
            *statuses(1),
            *completed(),
            *finish(),
        ],
        setup=make_images,
    )
    same_image(compat, "t.raw", "raw", "src.raw")


def test_backup_source_error_report(compat: Compat) -> None:
    compat.check_transcript(
        [
            raw_over_blkdebug("src", "src.raw", "read_aio", SECTOR_3M),
            qcow2("tgt", "tgt.qcow2"),
            Cmd(
                "blockdev-backup",
                {"job-id": "b0", "device": "src", "target": "tgt", "sync": "full"},
            ),
            *started(),
            WaitEvent("BLOCK_JOB_ERROR"),
            *statuses(1),  # aborting
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )


@pytest.mark.parametrize("perf", [{}, {"x-perf": {"max-workers": 1}}])
def test_backup_source_error_mid_image(compat: Compat, perf: dict[str, Any]) -> None:
    """An error in the second of four chunks: the chunks in flight beside it are copied
    (3 MiB done with qsd's many workers, 1 MiB with one), the job fails once they ended."""
    rule = {"event": "read_aio", "sector": 2048}
    image = {"driver": "file", "node-name": "src-file", "filename": "$D/src.raw"}
    dbg = {"driver": "blkdebug", "node-name": "src-dbg", "inject-error": [rule], "image": image}
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "raw", "node-name": "src", "file": dbg}),
            Cmd("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                 "file": {"driver": "file", "filename": "$D/t.raw"}}),
            Cmd("blockdev-backup", {"job-id": "b0", "device": "src", "target": "tgt",
                                    "sync": "full", **perf}),
            *started(),
            WaitEvent("BLOCK_JOB_ERROR"),
            *statuses(1),  # aborting
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )  # fmt: skip


def test_backup_compressed(compat: Compat) -> None:
    compat.check_transcript(
        [
            qcow2("src", "src.qcow2"),
            qcow2("tgt", "tgt.qcow2"),
            Cmd(
                "blockdev-backup",
                {
                    "job-id": "b0",
                    "device": "src",
                    "target": "tgt",
                    "sync": "full",
                    "compress": True,
                },
            ),
            *started(),
            *completed(),
            Cmd("quit"),
            ExpectEof(),
        ],
        setup=make_images,
    )
    same_image(compat, "tgt.qcow2", "qcow2", "src.raw")


def test_backup_raw_source_named_nodes(compat: Compat) -> None:
    """A source without backing: the whole node list compared after the filter is gone."""
    raw = {
        "driver": "raw",
        "node-name": "src",
        "file": {"driver": "file", "node-name": "src-file", "filename": "$D/src.raw"},
    }
    compat.check_transcript(
        [
            Cmd("blockdev-add", raw),
            qcow2("tgt", "tgt.qcow2"),
            Cmd("blockdev-backup", {"job-id": "b0", "device": "src", "target": "tgt",
                                    "sync": "full", "filter-node-name": "cbw"}),
            *started(),
            *completed(),
            *finish(named=True),
        ],
        setup=make_images,
    )  # fmt: skip
    same_image(compat, "tgt.qcow2", "qcow2", "src.raw")


def test_drive_backup_existing(compat: Compat) -> None:
    compat.check_transcript(
        [
            qcow2("src", "src.qcow2"),
            Cmd(
                "drive-backup",
                {
                    "job-id": "b0",
                    "device": "src",
                    "target": "$D/tgt.qcow2",
                    "format": "qcow2",
                    "mode": "existing",
                    "sync": "full",
                },
            ),
            *started(),
            *completed(),
            *finish(),
        ],
        setup=make_images,
    )
    same_image(compat, "tgt.qcow2", "qcow2", "src.raw")


def backup(**args: Any) -> Cmd:
    return Cmd("blockdev-backup", {"job-id": "b0", "device": "src", "target": "tgt",
                                   "sync": "full", **args})  # fmt: skip


def test_backup_errors(compat: Compat) -> None:
    compat.check_transcript(
        [
            qcow2("src", "src.qcow2"),
            qcow2("tgt", "tgt.qcow2"),
            qcow2("small", "small.qcow2"),
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "nul", "size": 4 << 20}),
            Cmd(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "ro",
                    "read-only": True,
                    "file": {"driver": "file", "filename": "$D/top.qcow2"},
                },
            ),
            backup(device="nope"),
            backup(target="nope"),
            backup(target="small"),
            backup(target="src"),
            backup(target="ro"),
            backup(**{"job-id": "0b"}),
            Cmd("blockdev-backup", {"device": "src", "target": "tgt", "sync": "full"}),
            backup(sync="incremental"),
            backup(sync="bitmap"),
            backup(sync="incremental", bitmap="bm", **{"bitmap-mode": "never"}),
            backup(bitmap="bm"),
            backup(**{"bitmap-mode": "always"}),
            backup(target="nul", compress=True),
            backup(**{"filter-node-name": "src"}),
            backup(**{"filter-node-name": "0x"}),
            backup(**{"x-perf": {"max-workers": 0}}),
            backup(**{"x-perf": {"max-chunk": -1}}),
            backup(**{"x-perf": {"max-chunk": 1000}}),
            backup(sync="full", speed=-1),
            *statuses(2),  # created, null
            backup(sync="sideways"),
            backup(extra=1),
            Cmd("blockdev-backup", {"job-id": "b0", "device": "src", "target": "tgt"}),
            Cmd(
                "blockdev-add",
                {
                    "driver": "copy-before-write",
                    "node-name": "c",
                    "file": "src",
                    "target": "tgt",
                    "bitmap": {"node": "src", "name": "x"},
                },
            ),
            backup(sync="none", speed=1, **{"filter-node-name": "cbw"}),
            *started(),
            Cmd("query-block-jobs"),
            Cmd("job-cancel", {"id": "b0"}),
            *statuses(1),
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )


def test_backup_lock_conflict_leaves_graph_as_it_was(compat: Compat) -> None:
    """The filter cannot take its permissions (the target is the source's own file, opened
    writable a second time): the error, then no filter left and the source free to delete."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "file", "node-name": "fa",
                                 "filename": "$D/src.raw", "read-only": True}),
            Cmd("blockdev-add", {"driver": "raw", "node-name": "src", "file": "fa"}),
            Cmd("blockdev-add", {"driver": "file", "node-name": "tgt",
                                 "filename": "$D/src.raw"}),
            backup(),
            *statuses(2),  # created, null
            Cmd("x-debug-query-block-graph"),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("blockdev-del", {"node-name": "src"}),
            *finish(named=True),
        ],
        setup=make_images,
    )  # fmt: skip


def test_formats_on_a_snapshot_access_without_filter(compat: Compat) -> None:
    """snapshot-access above a node that is no copy-before-write filter: every read fails
    (ENOTSUP), so qcow2 cannot read its header; raw opens (it reads nothing)."""
    compat.check_transcript(
        [
            Cmd("blockdev-add", {"driver": "null-co", "node-name": "disk0", "size": 1 << 20}),
            Cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "sa", "file": "disk0"}),
            Cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "sa"}),
            Cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "sa"}),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("blockdev-del", {"node-name": "r"}),
            Cmd("blockdev-del", {"node-name": "sa"}),
            *finish(),
        ],
        setup=make_images,
    )


def test_fleecing_nodes(compat: Compat) -> None:
    """copy-before-write and snapshot-access added by hand (image fleecing), and removed."""
    src = {
        "driver": "raw",
        "node-name": "src",
        "file": {"driver": "file", "node-name": "src-file", "filename": "$D/src.raw"},
    }
    cbw = {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tgt"}
    compat.check_transcript(
        [
            Cmd("blockdev-add", src),
            qcow2("tgt", "tgt.qcow2"),
            Cmd("blockdev-add", {"driver": "qcow2", "node-name": "ro", "read-only": True,
                                 "file": {"driver": "file", "node-name": "ro-file",
                                          "filename": "$D/small.qcow2"}}),
            Cmd("blockdev-add", {**cbw, "target": "ro"}),
            Cmd("blockdev-add", {**cbw, "target": "nosuch"}),
            Cmd("blockdev-add", {**cbw, "bitmap": {"node": "nosuch", "name": "b"}}),
            Cmd("blockdev-add", {**cbw, "bitmap": {"node": "src", "name": "b"}}),
            Cmd("blockdev-add", {**cbw, "on-cbw-error": "break-snapshot", "cbw-timeout": 5}),
            Cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                 "file": "cbw"}),
            Cmd("x-debug-query-block-graph"),
            Cmd("blockdev-del", {"node-name": "cbw"}),
            Cmd("blockdev-del", {"node-name": "acc"}),
            Cmd("blockdev-del", {"node-name": "cbw"}),
            *finish(named=True),
        ],
        setup=make_images,
    )  # fmt: skip


def backing_of(compat: Compat, name: str) -> tuple[str, str]:
    """The backing file name each side recorded in `name`, with its scratch dir as $D."""
    out = []
    for d in sides(compat):
        info = json.loads(_run("qemu-img", "info", "-U", "--output=json", str(d / name)))
        out.append(str(info.get("backing-filename")).replace(str(d), "$D"))
    return out[0], out[1]


@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_drive_backup_creates_target(compat: Compat, sync: str) -> None:
    """The default mode (absolute-paths) creates the target in the source's format, with the
    source's backing file (the source itself for sync=none, attached while the job runs)."""
    steps: list[Any] = [
        qcow2("src", "src.qcow2"),
        Cmd("drive-backup", {"job-id": "b0", "device": "src", "target": "$D/new.qcow2",
                             "sync": sync}),
        *started(),
    ]  # fmt: skip
    if sync == "none":
        steps += [
            # (Not the graph here: our qcow2 takes consistent-read on the backing edge of
            # the target, qsd none.)
            Cmd("query-block-jobs"),
            Cmd("job-cancel", {"id": "b0"}),
            *statuses(1),
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(2),
        ]
    else:
        steps += completed()
    compat.check_transcript([*steps, *finish()], setup=make_images)
    ref, ours = backing_of(compat, "new.qcow2")
    assert ref == ours
    if sync != "none":
        same_image(compat, "new.qcow2", "qcow2", "src.raw")
