"""Zero writes through an NBD export of a qcow2 image, on the reference qsd and on ours: the
image's allocation afterwards (`qemu-img map`) and the export's `qemu:allocation-depth` map.

Test ring (compat). qsd's qcow2 (v3) marks whole zeroed clusters with the zero flag even where
nothing was allocated (they count as allocated in this layer, `present: true`); a partial
zero write into a cluster that holds no data and reads as zeroes flags the whole cluster too
(a subcluster, with extended L2); a v2 image has no zero flag.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Compat, diff_text

pytestmark = pytest.mark.compat

WRITES = [
    "write -z 0 64k",  # a whole unallocated cluster
    "write -z -u 128k 128k",  # whole clusters, may unmap
    "write -z 300k 8k",  # part of an unallocated cluster: flagged whole (v3)
    "write -P 1 512k 64k",
    "write -z 512k 64k",  # over data
    "write -P 2 640k 64k",
    "write -z -u 640k 64k",  # over data, may unmap
]


def _make(d: Path) -> None:
    for name, opts in (
        ("v3.qcow2", "compat=1.1"),
        ("v2.qcow2", "compat=0.10"),
        ("x.qcow2", "extended_l2=on"),
    ):
        subprocess.run(
            ["qemu-img", "create", "-f", "qcow2", "-o", opts, str(d / name), "1M"],
            check=True, capture_output=True,
        )  # fmt: skip


@pytest.mark.parametrize("image", ["v3", "v2", "x"])
def test_zero_writes_allocate_as_qsd(compat: Compat, image: str) -> None:
    args = [
        "--blockdev", f"driver=file,node-name=f0,filename=$D/{image}.qcow2",
        "--blockdev", "driver=qcow2,node-name=q0,file=f0",
        "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock",
        "--export", "type=nbd,id=e0,node-name=q0,name=q0,writable=on,allocation-depth=on",
    ]  # fmt: skip
    pair = compat.daemons(args, _make)
    out: dict[str, Any] = {}
    for side, daemon in pair.items():
        url = f"nbd+unix:///q0?socket={daemon.workdir}/nbd.sock"
        for cmd in WRITES:
            subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, url], check=True,
                           capture_output=True, timeout=30)  # fmt: skip
        depth = subprocess.run(
            ["nbdinfo", "--map=qemu:allocation-depth", url],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        client = compat.connect(daemon)
        client.negotiate()
        client.cmd("quit")
        daemon.wait_exit(15)
        layout = subprocess.run(
            ["qemu-img", "map", "--output=json", str(Path(daemon.workdir) / f"{image}.qcow2")],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        entries = [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(layout)]
        out[side] = {"allocation-depth": depth.splitlines(), "map": entries}
    for key in ("allocation-depth", "map"):
        if out["ours"][key] != out["reference"][key]:
            raise AssertionError(diff_text(out["reference"][key], out["ours"][key]))
