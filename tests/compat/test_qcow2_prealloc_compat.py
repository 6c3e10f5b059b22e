"""qcow2 preallocation of new space, on the reference qsd and on ours, side by side.

Compat ring. blockdev-create of qcow2 with preallocation off/metadata/falloc/full (also with
an external data file, extended L2 and a backing file), and block_resize of images with an
external data file (raw or not): the job events, `qemu-img info` *including the disk usage*
(actual-size), `qemu-img check`, `qemu-img map` (without host offsets, where the two
allocators may place tables differently) and the data file's length and usage must be
qsd's. Daemons stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.compat.test_qcow2_compat import create_on
from tests.integration.daemon import (
    REFERENCE_BINARY,
    RawQmp,
    ours_command,
    reference_command,
    running_daemon,
)

pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(
        shutil.which("qemu-img") is None or not Path(REFERENCE_BINARY).exists(),
        reason="qemu-img or the reference qemu-storage-daemon missing",
    ),
]

MiB = 1 << 20

CASES: list[dict[str, Any]] = [
    {"size": MiB, "preallocation": "off"},
    {"size": MiB, "preallocation": "metadata"},
    {"size": MiB, "preallocation": "falloc"},
    {"size": MiB, "preallocation": "full"},
    {"size": MiB + 512, "preallocation": "full"},
    {"size": 3 * MiB, "preallocation": "falloc", "cluster-size": 4096},
    {"size": 2 * MiB, "preallocation": "full", "cluster-size": 512, "refcount-bits": 1},
    {"size": 16 * MiB, "preallocation": "falloc", "compression-type": "zstd"},
    {"size": MiB, "preallocation": "full", "version": "v2"},
    {"size": MiB, "preallocation": "falloc", "extended-l2": True, "backing-file": "b.qcow2"},
    {"size": MiB, "preallocation": "falloc", "data-file": "df"},
    {"size": MiB, "preallocation": "full", "data-file": "df", "data-file-raw": True},
    {"size": MiB, "preallocation": "metadata", "data-file": "df"},
]


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[dict[str, tuple[Path, RawQmp]]]:
    out: dict[str, tuple[Path, RawQmp]] = {}
    with ExitStack() as stack:
        for side, command in (("ours", ours_command()), ("reference", reference_command())):
            d = tmp_path / side
            d.mkdir()
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(d / "b.qcow2"), "1M"], check=True
            )
            daemon = stack.enter_context(running_daemon(command, [], d))
            client = stack.enter_context(daemon.connect_qmp())
            client.negotiate()
            out[side] = (d, client)
        yield out


def img(d: Path, *args: str) -> Any:
    result = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)
    out = result.stdout.replace(str(d), "$D")
    parsed: Any = json.loads(out) if "--output=json" in args and out.strip() else out
    return {"rc": result.returncode, "out": parsed, "err": result.stderr.replace(str(d), "$D")}


def usage(path: Path) -> tuple[int, int] | None:
    if not path.exists():
        return None
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def data_file_usage(path: Path, options: dict[str, Any]) -> Any:
    """The data file's length; its disk usage too where preallocation decides it (without,
    qsd's file driver also allocates the first block of a file grown from empty, a file
    driver matter)."""
    found = usage(path)
    if found is None or options.get("preallocation") in ("falloc", "full"):
        return found
    return found[0]


def without_offsets(mapped: Any) -> Any:
    if not isinstance(mapped["out"], list):
        return mapped
    return {**mapped, "out": [{k: v for k, v in e.items() if k != "offset"} for e in mapped["out"]]}


# Disk usage may differ by the extent-tree blocks the filesystem (ext4) allocates when it
# writes back delayed allocations, at its own pace: a few blocks either way is not ours.
USAGE_SLACK = 8192


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, int) and isinstance(b, int) and abs(a - b) <= USAGE_SLACK


def _same_usage(ours: Any, ref: Any) -> bool:
    """Equal, except block counts (`actual-size`, st_blocks) within USAGE_SLACK."""
    if isinstance(ours, tuple) and isinstance(ref, tuple):
        return len(ours) == len(ref) == 2 and ours[0] == ref[0] and _close(ours[1], ref[1])
    if isinstance(ours, dict) and isinstance(ref, dict) and isinstance(ref.get("out"), dict):
        o, r = dict(ours["out"]), dict(ref["out"])
        size_o, size_r = o.pop("actual-size", None), r.pop("actual-size", None)
        same_size = size_o == size_r or _close(size_o, size_r)
        return same_size and {**ours, "out": o} == {**ref, "out": r}
    return bool(ours == ref)  # a length: exact


def assert_same(seen: dict[str, Any]) -> None:
    for number, (ours, ref) in enumerate(zip(seen["ours"], seen["reference"], strict=True)):
        for key in ref:
            if key in ("info", "file", "data-file"):
                assert _same_usage(ours[key], ref[key]), (number, key, ours[key], ref[key])
            else:
                assert ours[key] == ref[key], (number, key)


def test_preallocated_create_matches_qsd(sides: dict[str, tuple[Path, RawQmp]]) -> None:
    seen: dict[str, Any] = {}
    for side, (d, client) in sides.items():
        results = []
        for index, options in enumerate(CASES):
            job = create_on(d, client, index, options)
            image = d / f"i{index}.qcow2"
            results.append(
                {
                    "options": options,
                    "job": json.loads(json.dumps(job).replace(str(d), "$D")),
                    "info": img(d, "info", "-U", "--output=json", str(image)),
                    "check": img(d, "check", "-U", str(image)),
                    "map": without_offsets(img(d, "map", "-U", "--output=json", str(image))),
                    "file": usage(image),
                    "data-file": data_file_usage(d / f"i{index}.df", options),
                }
            )
        seen[side] = results
    assert_same(seen)


def test_resize_with_an_external_data_file_matches_qsd(
    sides: dict[str, tuple[Path, RawQmp]],
) -> None:
    """Growth maps the new clusters one to one in a data-file-raw image; the data file
    follows the new size both ways."""
    seen: dict[str, Any] = {}
    for side, (d, client) in sides.items():
        results = []
        for raw in (False, True):
            image, df = d / f"r{raw}.qcow2", d / f"r{raw}.df"
            opts = f"data_file={df}" + (",data_file_raw=on" if raw else "")
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(image), "1M"],
                check=True,
            )
            node = {
                "driver": "qcow2",
                "node-name": "q",
                "file": {"driver": "file", "filename": str(image)},
                "data-file": {"driver": "file", "filename": str(df)},
            }
            replies = [client.cmd("blockdev-add", node)]
            steps = []
            # qsd 7.2 aborts (an assertion) when it shrinks a data-file-raw image.
            sizes = (3 * MiB, 4 * MiB + 65536) if raw else (3 * MiB, 2 * MiB + 4096, 4 * MiB)
            for size in sizes:
                replies.append(client.cmd("block_resize", {"node-name": "q", "size": size}))
                steps.append(usage(df))
            replies.append(client.cmd("blockdev-del", {"node-name": "q"}))
            results.append(
                {
                    "replies": replies,
                    "steps": steps,
                    "check": img(d, "check", str(image)),
                    "map": img(d, "map", "--output=json", str(image)),
                    "info": img(d, "info", "--output=json", str(image)),
                }
            )
        seen[side] = results
    assert_same(seen)
