"""blockdev-create of qcow2 and block_resize of qcow2 nodes, on the reference qsd and on ours.

Compat ring: the same QMP steps run on both daemons (each in its own scratch dir); the job
events, replies, `qemu-img info --output=json` / `check` of the results (paths normalised) and,
where our layout is qsd's, the image bytes themselves must be equal. Daemons stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

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

GiB = 1 << 30

# (options, bytes equal?) — unequal bytes where our allocator places structures differently
# (several refblocks, preallocation) or the image records an absolute path.
CASES: list[tuple[dict[str, Any], bool]] = [
    ({"size": GiB}, True),
    ({"size": GiB, "version": "v2"}, True),
    ({"size": GiB, "cluster-size": 512}, False),
    ({"size": 1 << 40, "cluster-size": 2 << 20}, True),
    ({"size": GiB, "cluster-size": 4096}, True),
    ({"size": GiB, "refcount-bits": 1}, True),
    ({"size": GiB, "refcount-bits": 64}, True),
    ({"size": GiB, "lazy-refcounts": True}, True),
    ({"size": GiB, "extended-l2": True}, True),
    ({"size": GiB, "compression-type": "zstd"}, True),
    ({"size": GiB, "backing-file": "base.qcow2", "backing-fmt": "qcow2"}, True),
    ({"size": GiB, "backing-file": "base.raw"}, True),
    ({"size": 0}, True),
    ({"size": 64 << 20, "preallocation": "metadata"}, False),
    ({"size": GiB, "data-file": "df"}, False),
    ({"size": 64 << 20, "data-file": "df", "data-file-raw": True}, False),
    # Refusals: the job's error text, and whatever qsd leaves on disk.
    ({"size": 12345}, True),
    ({"size": GiB, "version": "v2", "lazy-refcounts": True}, True),
    ({"size": GiB, "version": "v2", "extended-l2": True}, True),
    ({"size": GiB, "version": "v2", "refcount-bits": 8}, True),
    ({"size": GiB, "version": "v2", "compression-type": "zstd"}, True),
    ({"size": GiB, "version": "v2", "data-file": "df"}, True),
    ({"size": GiB, "cluster-size": 1000}, True),
    ({"size": GiB, "refcount-bits": 3}, True),
    ({"size": GiB, "extended-l2": True, "cluster-size": 4096}, True),
    ({"size": GiB, "data-file-raw": True}, True),
    ({"size": GiB, "backing-fmt": "qcow2"}, True),
    ({"size": GiB, "backing-file": "b", "preallocation": "metadata"}, True),
    ({"size": GiB, "backing-file": "x" * 1024}, True),
    ({"size": GiB, "encrypt": {"format": "luks"}}, True),
    ({"size": GiB, "encrypt": {"format": "qcow", "key-secret": "sec0"}}, True),
    ({"size": (1 << 63) - 512}, True),
    ({"size": GiB, "file": "nosuchnode"}, True),
]


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[dict[str, tuple[Path, RawQmp]]]:
    out: dict[str, tuple[Path, RawQmp]] = {}
    with ExitStack() as stack:
        for side, command in (("ours", ours_command()), ("reference", reference_command())):
            d = tmp_path / side
            d.mkdir()
            daemon = stack.enter_context(running_daemon(command, [], d))
            client = stack.enter_context(daemon.connect_qmp())
            client.negotiate()
            out[side] = (d, client)
        yield out


def run_job(client: RawQmp, job_id: str, options: dict[str, Any]) -> dict[str, Any]:
    reply = client.cmd("blockdev-create", {"job-id": job_id, "options": options})
    if "error" in reply:
        return {"reply": reply}
    statuses: list[str] = []
    while statuses[-1:] != ["concluded"]:
        statuses.append(client.wait_event("JOB_STATUS_CHANGE")["data"]["status"])
    jobs = client.cmd("query-jobs")
    client.cmd("job-dismiss", {"id": job_id})
    client.wait_event("JOB_STATUS_CHANGE")
    return {"reply": reply, "statuses": statuses, "jobs": jobs}


def norm(text: str, d: Path) -> Any:
    return json.loads(text.replace(str(d), "$D")) if text.strip() else text


def qemu_img(d: Path, *args: str) -> dict[str, Any]:
    result = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)
    out = result.stdout.replace(str(d), "$D")
    info: Any = out
    if "--output=json" in args:
        info = json.loads(out) if out.strip() else out
        if isinstance(info, dict):
            info.pop("actual-size", None)  # host filesystem allocation, not ours to match
    return {"rc": result.returncode, "out": info, "err": result.stderr.replace(str(d), "$D")}


def create_on(d: Path, client: RawQmp, index: int, options: dict[str, Any]) -> dict[str, Any]:
    img = d / f"i{index}.qcow2"
    run_job(client, f"f{index}", {"driver": "file", "filename": str(img), "size": 0})
    client.cmd("blockdev-add", {"driver": "file", "node-name": f"n{index}", "filename": str(img)})
    opts: dict[str, Any] = {"driver": "qcow2", "file": f"n{index}", **options}
    if "data-file" in options:
        df = d / f"i{index}.df"
        run_job(client, f"g{index}", {"driver": "file", "filename": str(df), "size": 0})
        client.cmd(
            "blockdev-add", {"driver": "file", "node-name": f"d{index}", "filename": str(df)}
        )
        opts["data-file"] = f"d{index}"
    result = run_job(client, f"c{index}", opts)
    client.cmd("blockdev-del", {"node-name": f"n{index}"})
    return result


@pytest.mark.parametrize("chunk", range(3))
def test_blockdev_create_qcow2_matches_qsd(
    sides: dict[str, tuple[Path, RawQmp]], chunk: int
) -> None:
    for index, (options, same_bytes) in enumerate(CASES):
        if index % 3 != chunk:
            continue
        seen: dict[str, Any] = {}
        images: dict[str, bytes] = {}
        for side, (d, client) in sides.items():
            result = create_on(d, client, index, options)
            img = d / f"i{index}.qcow2"
            seen[side] = {
                "job": json.loads(json.dumps(result).replace(str(d), "$D")),
                "info": qemu_img(d, "info", "--output=json", str(img)),
                "check": qemu_img(d, "check", str(img)),
            }
            images[side] = img.read_bytes() if img.exists() else b""
        assert seen["ours"] == seen["reference"], options
        if same_bytes:
            assert images["ours"] == images["reference"], options


def resize_steps() -> list[int]:
    return [(64 << 20) + 512, 3 * GiB, 100 * GiB, 32 << 20, 100 * GiB, 1000, (1 << 63) - 512]


def test_block_resize_qcow2_matches_qsd(sides: dict[str, tuple[Path, RawQmp]]) -> None:
    seen: dict[str, Any] = {}
    for side, (d, client) in sides.items():
        img = d / "r.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c",
             "write -P 0x22 60M 1M", "-c", "write -P 0x33 31M 2M", str(img)],
            check=True, capture_output=True,
        )  # fmt: skip
        node = {
            "driver": "qcow2",
            "node-name": "q",
            "file": {"driver": "file", "filename": str(img)},
        }
        replies = [client.cmd("blockdev-add", node)]
        for size in resize_steps():
            replies.append(client.cmd("block_resize", {"node-name": "q", "size": size}))
        replies.append(client.cmd("blockdev-del", {"node-name": "q"}))
        seen[side] = {
            "replies": replies,
            "check": qemu_img(d, "check", "--output=json", str(img)),
            "map": qemu_img(d, "map", "--output=json", "-f", "qcow2", str(img)),
            "info": qemu_img(d, "info", "--output=json", str(img)),
        }
    ours, ref = seen["ours"], seen["reference"]
    # Our shrink leaves the freed tail in the file (qsd truncates it): the file's length and
    # the check's image-end-offset may differ; everything a guest or tool sees may not.
    for key in ("image-end-offset",):
        ours["check"]["out"].pop(key, None)
        ref["check"]["out"].pop(key, None)
    for side in (ours, ref):
        side["map"]["out"] = [
            {k: v for k, v in e.items() if k != "offset"} for e in side["map"]["out"]
        ]
    assert ours == ref


@pytest.mark.parametrize("under", ["file", "qcow2"])
def test_blockdev_create_over_a_longer_node_keeps_its_length(
    sides: dict[str, tuple[Path, RawQmp]], under: str
) -> None:
    """qsd writes the new image over what the node holds and never shrinks it: a 64 MiB
    file keeps its length, and a qcow2 node used as the file keeps its virtual size (ours
    truncated it to 0 first, and failed on the qcow2 node)."""
    seen: dict[str, Any] = {}
    for side, (d, client) in sides.items():
        outer = d / f"outer-{under}.img"
        if under == "qcow2":
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(outer), "64M"], check=True
            )
        else:
            outer.write_bytes(b"\x33" * (64 << 20))
        subprocess.run(
            ["qemu-io", "-f", under if under == "qcow2" else "raw", "-c", "write -P 0x33 0 1M",
             str(outer)],
            check=True, capture_output=True,
        )  # fmt: skip
        client.cmd("blockdev-add", {"driver": "file", "node-name": "o", "filename": str(outer)})
        file_node = "o"
        if under == "qcow2":
            client.cmd("blockdev-add", {"driver": "qcow2", "node-name": "oq", "file": "o"})
            file_node = "oq"
        result = run_job(client, "c", {"driver": "qcow2", "file": file_node, "size": 1 << 20})
        nodes = client.cmd("query-named-block-nodes", {"flat": True})["return"]
        sizes = {n["node-name"]: n["image"]["virtual-size"] for n in nodes}
        for node in ("oq", "o") if under == "qcow2" else ("o",):
            client.cmd("blockdev-del", {"node-name": node})
        inner = d / "inner.img"
        if under == "qcow2":
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(outer), str(inner)], check=True)
        else:
            shutil.copyfile(outer, inner)
        seen[side] = {
            "job": result,
            "sizes": sizes,
            "outer": qemu_img(d, "info", "--output=json", str(outer)),
            "inner": qemu_img(d, "check", "-f", "qcow2", str(inner)),
            "inner-bytes": inner.read_bytes(),
        }
    assert seen["ours"] == seen["reference"]
