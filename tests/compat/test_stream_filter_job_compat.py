"""block-stream whose `device` is a filter (throttle or copy-on-read above a qcow2 overlay) on
the reference qsd and on ours: argument errors, the graph while the job runs (qsd puts its
copy-on-read filter above `device` itself), the events, and the graph once it has finished.

Test ring (compat). Each test starts a fresh pair of daemons on the same qemu-img-made chain,
stopped by PID at teardown.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Cmd, Compat, ExpectEof, StepLike, WaitEvent
from tests.compat.test_stream_compat import chain_by_nodes, statuses

pytestmark = pytest.mark.compat


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def make_chain(d: Path) -> None:
    """base <- mid <- top, where every variant's first chunk has data to copy (so a job at
    1 KiB/s copies exactly one chunk before its long rate-limit sleep, on both daemons)."""
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 4 3M 512k", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/mid.qcow2")
    _run("qemu-io", "-c", "write -P 2 0 1536k", f"{d}/mid.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    _run("qemu-io", "-c", "write -P 3 1M 256k", f"{d}/top.qcow2")


def same_images(compat: Compat) -> None:
    """After both daemons quit: the top reads the same on both sides, and names the same
    backing file (the header rewritten by the job)."""
    ref, ours = (compat.dirs[side] / "top.qcow2" for side in ("reference", "ours"))
    _run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(ref), str(ours))

    def backing(path: Path) -> Any:
        info = json.loads(_run("qemu-img", "info", "--output=json", "-U", str(path)))
        name = info.get("backing-filename")
        if name is not None:
            name = name.replace(str(path.parent), "$D")
        return name, info.get("backing-filename-format")

    assert backing(ref) == backing(ours)


TG = {"qom-type": "throttle-group", "id": "tg"}
FILTERS: dict[str, dict[str, Any]] = {
    "throttle": {"driver": "throttle", "node-name": "flt", "throttle-group": "tg", "file": "top"},
    "copy-on-read": {"driver": "copy-on-read", "node-name": "flt", "file": "top"},
}


def with_filter(kind: str) -> list[Cmd]:
    return [Cmd("object-add", TG), *chain_by_nodes(), Cmd("blockdev-add", FILTERS[kind])]


def check(compat: Compat, steps: list[StepLike]) -> None:
    result = compat.run_transcript(steps, setup=make_chain)
    result.assert_same()


VARIANTS: dict[str, dict[str, Any]] = {
    "whole": {},
    "base": {"base": "$D/base.qcow2"},
    "base-node": {"base-node": "base"},
    "bottom": {"bottom": "mid"},
}


@pytest.mark.parametrize("kind", sorted(FILTERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stream_of_a_filter_runs_cancelled(compat: Compat, kind: str, variant: str) -> None:
    """A slow job: the graph while it runs, then cancelled."""
    args = {"job-id": "s0", "device": "flt", "speed": 1024, **VARIANTS[variant]}
    check(
        compat,
        [
            *with_filter(kind),
            Cmd("block-stream", args),
            *statuses(2),  # created, running
            Cmd("x-debug-query-block-graph"),  # (progress so far is timing: not queried)
            Cmd("blockdev-del", {"node-name": "flt"}),
            Cmd("job-cancel", {"id": "s0"}),
            *statuses(1),  # aborting
            WaitEvent("BLOCK_JOB_CANCELLED"),
            *statuses(2),  # concluded, null
            Cmd("x-debug-query-block-graph"),
            Cmd("quit"),
            ExpectEof(),
        ],
    )


@pytest.mark.parametrize("kind", sorted(FILTERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stream_of_a_filter_completes(compat: Compat, kind: str, variant: str) -> None:
    args = {"job-id": "s0", "device": "flt", **VARIANTS[variant]}
    check(
        compat,
        [
            *with_filter(kind),
            Cmd("block-stream", args),
            *statuses(4),  # created, running, waiting, pending
            WaitEvent("BLOCK_JOB_COMPLETED"),
            *statuses(2),  # concluded, null
            Cmd("x-debug-query-block-graph"),
            Cmd("query-named-block-nodes", {"flat": True}),
            Cmd("quit"),
            ExpectEof(),
        ],
    )
    same_images(compat)


REFUSED: list[dict[str, Any]] = [
    {"base-node": "flt"},
    {"base-node": "top"},
    {"base-node": "mid", "bottom": "mid"},
    {"bottom": "flt"},
    {"bottom": "top"},
    {"base": "$D/top.qcow2"},
    {"base": "nothing.qcow2"},
    {"backing-file": "x"},
    {"filter-node-name": "flt"},
    {"filter-node-name": "top"},
]


@pytest.mark.parametrize("kind", sorted(FILTERS))
def test_stream_of_a_filter_refused(compat: Compat, kind: str) -> None:
    check(
        compat,
        [
            *with_filter(kind),
            *[Cmd("block-stream", {"device": "flt", **args}) for args in REFUSED],
            Cmd("query-jobs"),
            Cmd("x-debug-query-block-graph"),
            Cmd("quit"),
            ExpectEof(),
        ],
    )
