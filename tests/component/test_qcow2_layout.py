"""The new-image layout (qcow2/layout.py) written to files and judged by qemu-img.

Component ring: random option combinations (cluster size, refcount width, version, extended L2,
size, preallocation) are laid out, written, and must pass `qemu-img check` with the virtual size
and options qemu-img reports; refusals carry qsd's texts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage_daemon.blockdev.drivers.qcow2 import layout

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def params(**kw: object) -> layout.CreateParams:
    base: dict[str, object] = dict(
        version=None, cluster_size=None, refcount_bits=None, lazy_refcounts=None,
        extended_l2=None, compression_type=None, backing_file=None, backing_fmt=None,
        has_data_file=False, data_file_raw=None, preallocation=None,
    )  # fmt: skip
    base.update(kw)
    return layout.validate(**base)  # type: ignore[arg-type]


def write(path: Path, plan: layout.Layout) -> None:
    with open(path, "wb") as f:
        f.truncate(plan.file_length)
        for offset, data in layout.image_writes(plan):
            f.seek(offset)
            f.write(data)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cluster_bits=st.integers(9, 21),
    refcount_order=st.integers(0, 6),
    v2=st.booleans(),
    ext=st.booleans(),
    size=st.integers(0, 1 << 24).map(lambda n: n * 512),
    prealloc=st.sampled_from([None, "metadata"]),
)
def test_layouts_pass_qemu_img_check(
    tmp_path: Path,
    cluster_bits: int,
    refcount_order: int,
    v2: bool,
    ext: bool,
    size: int,
    prealloc: str | None,
) -> None:
    if v2:
        refcount_order, ext = 4, False
    if cluster_bits < 14:
        ext = False
    if prealloc and size > 64 << 20:
        size = 64 << 20
    p = params(
        size=size, version="v2" if v2 else None, cluster_size=1 << cluster_bits,
        refcount_bits=1 << refcount_order, extended_l2=ext, preallocation=prealloc,
    )  # fmt: skip
    image = tmp_path / f"x{cluster_bits}-{refcount_order}-{v2}-{ext}-{size}-{prealloc}.qcow2"
    write(image, layout.plan(p))
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "leaked" not in check.stdout
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True
        ).stdout
    )
    assert info["virtual-size"] == size
    assert info["cluster-size"] == 1 << cluster_bits
    data = info["format-specific"]["data"]
    assert data["compat"] == ("0.10" if v2 else "1.1")
    assert data["refcount-bits"] == 1 << refcount_order
    image.unlink()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
        ({"size": 512, "cluster_size": 3000}, "Cluster size must be a power of two"),
        ({"size": 512, "refcount_bits": 128}, "Refcount width must be a power of two"),
        ({"size": 512, "data_file_raw": True}, "data-file-raw requires data-file"),
        ({"size": 512, "backing_fmt": "raw"}, "Backing format cannot be used without"),
    ],
)
def test_refusals(options: dict[str, object], message: str) -> None:
    with pytest.raises(layout.CreateError, match=message):
        params(**options)


def test_too_large() -> None:
    with pytest.raises(layout.CreateError, match="exceeds maximum"):
        layout.check_length(1 << 63, 16, 8)
    with pytest.raises(layout.CreateError, match="Failed to grow the L1 table"):
        layout.check_length(layout.MAX_IMAGE_LENGTH, 9, 8)
