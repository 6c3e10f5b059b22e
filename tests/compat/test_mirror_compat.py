"""blockdev-mirror and drive-mirror on the reference qsd and on ours: replies, events and the
graph (during the job and after it) compared live; then the images compared with qemu-img.

Test ring (compat). Each test starts a fresh pair of daemons on the same qemu-img-made images
(a 4 MiB raw source holding data, an empty raw target, a smaller raw image), stopped by PID.
Queries run while the job is READY, where both daemons are idle: nothing depends on timing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, ExpectEof, WaitEvent

pytestmark = pytest.mark.compat

STATUS = "JOB_STATUS_CHANGE"


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def make_images(d: Path) -> None:
    _run("qemu-img", "create", "-q", "-f", "raw", f"{d}/src.raw", "4M")
    _run("qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", "-c", "write -P 2 3M 64k",
         f"{d}/src.raw")  # fmt: skip
    _run("qemu-img", "create", "-q", "-f", "raw", f"{d}/tgt.raw", "4M")
    _run("qemu-img", "create", "-q", "-f", "raw", f"{d}/small.raw", "1M")


def raw(name: str, image: str) -> dict[str, Any]:
    return {"driver": "raw", "node-name": name,
            "file": {"driver": "file", "node-name": f"{name}-file",
                     "filename": f"$D/{image}"}}  # fmt: skip


def add_images() -> list[Cmd]:
    return [
        Cmd("blockdev-add", raw("src", "src.raw")),
        Cmd("blockdev-add", raw("tgt", "tgt.raw")),
        Cmd("blockdev-add", raw("small", "small.raw")),
    ]


def statuses(n: int) -> list[WaitEvent]:
    return [WaitEvent(STATUS) for _ in range(n)]


def mirror(**kw: Any) -> Cmd:
    return Cmd("blockdev-mirror",
               {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full", **kw})  # fmt: skip


def ready() -> list[WaitEvent]:
    return [*statuses(2), WaitEvent("BLOCK_JOB_READY"), WaitEvent(STATUS)]


def finish() -> list[Any]:
    return [
        Cmd("query-named-block-nodes", {"flat": True}),
        Cmd("x-debug-query-block-graph"),
        Cmd("query-jobs"),
        Cmd("quit"),
        ExpectEof(),
    ]


def sides(compat: Compat) -> tuple[Path, Path]:
    ref, ours = (d.workdir for d in compat._daemons[-2:])
    return ref, ours


def check_images(compat: Compat, *pairs: tuple[str, str]) -> None:
    """Each image equal to the reference's; on our side each pair equal to each other."""
    ref, ours = sides(compat)
    for name in ("src.raw", "tgt.raw"):
        _run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref / name), str(ours / name))
    for a, b in pairs:
        _run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(ours / a), str(ours / b))


def test_mirror_complete_pivots(compat: Compat) -> None:
    compat.check_transcript(
        [
            *add_images(),
            Cmd(
                "block-export-add",
                {"type": "nbd", "id": "e0", "node-name": "src", "writable": True},
            ),
            mirror(),
            *ready(),
            Cmd("query-block-jobs"),
            Cmd("query-jobs"),
            Cmd("x-debug-query-block-graph"),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("query-named-block-nodes"),
            Cmd("query-block-exports"),
            Cmd("job-complete", {"id": "m0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            Cmd("query-block-exports"),
            *finish(),
        ],
        setup=make_images,
        args=["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"],
    )
    check_images(compat, ("src.raw", "tgt.raw"))


@pytest.mark.parametrize(
    "cancel",
    [
        Cmd("block-job-cancel", {"device": "m0"}),  # READY: completes, no pivot
        Cmd("block-job-cancel", {"device": "m0", "force": True}),
        Cmd("job-cancel", {"id": "m0"}),
    ],
    ids=["soft", "force", "job-cancel"],
)
def test_mirror_cancel_in_ready(compat: Compat, cancel: Cmd) -> None:
    event = "BLOCK_JOB_CANCELLED" if cancel.args != {"device": "m0"} else "BLOCK_JOB_COMPLETED"
    compat.check_transcript(
        [
            *add_images(),
            mirror(**{"filter-node-name": "mt", "granularity": 4096, "buf-size": 1000}),
            *ready(),
            cancel,
            *statuses(1 if event == "BLOCK_JOB_CANCELLED" else 2),
            WaitEvent(event),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )
    check_images(compat, ("src.raw", "tgt.raw"))


def test_mirror_sync_none_and_write_blocking(compat: Compat) -> None:
    compat.check_transcript(
        [
            *add_images(),
            mirror(sync="none", **{"copy-mode": "write-blocking"}),
            *ready(),
            Cmd("query-block-jobs"),
            Cmd("job-pause", {"id": "m0"}),
            WaitEvent(STATUS),  # standby
            Cmd("query-block-jobs"),
            Cmd("job-resume", {"id": "m0"}),
            WaitEvent(STATUS),
            Cmd("block-job-set-speed", {"device": "m0", "speed": 1 << 20}),
            Cmd("query-block-jobs"),
            Cmd("job-complete", {"id": "m0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )


def make_zero_data(d: Path) -> None:
    """A source whose first MiB is allocated and holds zeroes, then data, then a hole."""
    make_images(d)
    _run("qemu-io", "-f", "raw", "-c", "write -P 0 0 1M", "-c", "write -P 3 1M 512k",
         f"{d}/src.raw")  # fmt: skip


def test_mirror_copies_allocated_zeroes_as_data(compat: Compat) -> None:
    """qsd copies what block status calls data as it is, zeroes included (the target's
    allocation shows it), and leaves holes of a sparse target alone."""
    compat.check_transcript(
        [
            *add_images(),
            mirror(),
            *ready(),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("job-cancel", {"id": "m0"}),
            *statuses(1),
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_zero_data,
    )
    check_images(compat, ("src.raw", "tgt.raw"))


def test_mirror_different_sizes(compat: Compat) -> None:
    compat.check_transcript(
        [
            *add_images(),
            mirror(target="small"),
            *statuses(3),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )


def test_mirror_errors(compat: Compat) -> None:
    compat.check_transcript(
        [
            *add_images(),
            Cmd("blockdev-mirror", {"device": "src", "target": "tgt", "sync": "full"}),
            mirror(device="nosuch"),
            mirror(target="nosuch"),
            mirror(device="src-file"),
            mirror(target="src"),
            mirror(granularity=256),
            mirror(granularity=1000),
            mirror(granularity=100, replaces="nosuch"),
            mirror(**{"granularity": 1000, "buf-size": -1}),
            mirror(sync="incremental"),
            mirror(sync="bitmap", replaces="small"),
            mirror(replaces="nosuch"),
            mirror(replaces="small"),
            mirror(replaces="src-file"),
            mirror(**{"buf-size": -1}),
            mirror(**{"buf-size": -1, "target": "src"}),
            mirror(**{"filter-node-name": "bad name"}),
            mirror(**{"filter-node-name": "src"}),
            mirror(**{"job-id": "1m"}),
            mirror(speed=-1),
            *statuses(2),  # created, null
            mirror(**{"filter-node-name": "mt"}),
            *ready(),
            mirror(**{"job-id": "m1"}),
            Cmd(
                "blockdev-mirror",
                {"job-id": "m1", "device": "small", "target": "tgt", "sync": "full"},
            ),
            Cmd(
                "blockdev-mirror",
                {"job-id": "m1", "device": "small", "target": "src", "sync": "full"},
            ),
            Cmd("blockdev-del", {"node-name": "tgt"}),
            Cmd("blockdev-del", {"node-name": "mt"}),
            Cmd("blockdev-del", {"node-name": "src"}),
            Cmd("job-finalize", {"id": "m0"}),
            Cmd("job-dismiss", {"id": "m0"}),
            Cmd("job-cancel", {"id": "m0"}),
            *statuses(1),
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )


def test_mirror_verbs_before_ready(compat: Compat) -> None:
    """A rate-limited job stays RUNNING: complete is refused, pause/resume work."""
    compat.check_transcript(
        [
            *add_images(),
            mirror(speed=1, granularity=65536),
            *statuses(2),
            Cmd("job-complete", {"id": "m0"}),
            Cmd("block-job-complete", {"device": "m0"}),
            Cmd("job-pause", {"id": "m0"}),
            WaitEvent(STATUS),
            Cmd("job-pause", {"id": "m0"}),
            Cmd("block-job-cancel", {"device": "m0"}),
            Cmd("job-resume", {"id": "m0"}),
            WaitEvent(STATUS),
            Cmd("job-resume", {"id": "m0"}),
            Cmd("job-cancel", {"id": "m0"}),
            *statuses(1),
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )


def test_drive_mirror(compat: Compat) -> None:
    compat.check_transcript(
        [
            *add_images(),
            Cmd("drive-mirror", {"device": "src", "target": "$D/new.raw", "sync": "full"}),
            Cmd(
                "drive-mirror",
                {"job-id": "d0", "device": "nosuch", "target": "$D/new.raw", "sync": "full"},
            ),
            Cmd(
                "drive-mirror",
                {
                    "job-id": "d0",
                    "device": "src",
                    "target": "$D/new.raw",
                    "sync": "full",
                    "replaces": "src",
                },
            ),
            Cmd(
                "drive-mirror",
                {
                    "job-id": "d0",
                    "device": "src",
                    "target": "$D/new.raw",
                    "sync": "full",
                    "format": "raw",
                    "node-name": "new",
                },
            ),
            *ready(),
            Cmd("x-debug-query-block-graph"),
            Cmd("job-complete", {"id": "d0"}),
            *statuses(2),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )
    ref, ours = sides(compat)
    _run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref / "new.raw"), str(ours / "new.raw")
    )
    _run(
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        str(ours / "src.raw"),
        str(ours / "new.raw"),
    )


def test_stream_on_mirrored_node(compat: Compat) -> None:
    compat.check_transcript(
        [
            *add_images(),
            mirror(),
            *ready(),
            Cmd("block-stream", {"job-id": "s", "device": "src"}),
            Cmd("job-cancel", {"id": "m0"}),
            *statuses(1),
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )


def test_mirror_bitmap_listed_by_creation_order(compat: Compat) -> None:
    """The job's dirty bitmap is listed among the source's named bitmaps, newest first, while
    the job holds the source, and gone once it ends."""

    def bitmap(name: str) -> Cmd:
        return Cmd("block-dirty-bitmap-add", {"node": "src", "name": name})

    compat.check_transcript(
        [
            *add_images(),
            bitmap("before"),
            mirror(granularity=4096),
            *ready(),
            bitmap("after"),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("job-cancel", {"id": "m0"}),
            *statuses(1),
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),
            *finish(),
        ],
        setup=make_images,
    )
