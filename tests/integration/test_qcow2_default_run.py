"""`make run`'s default configuration: the qcow2 image it creates and the daemon serving it.

Integration ring: `ensure_image` must write an image qemu-img accepts (byte-identical to
`qemu-img create -f qcow2` of the same size) and never touch an existing one; the daemon started
with `default_args` must serve it writable over NBD. The daemon is stopped by PID.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from storage_daemon.default_run import IMAGE, IMAGE_SIZE, default_args, ensure_image
from tests.integration.daemon import DaemonProcess, ours_command

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-img", "qemu-io")), reason="qemu tools missing"
)


def test_default_image_is_qemu_img_identical_and_kept(tmp_path: Path) -> None:
    image = tmp_path / IMAGE
    ensure_image(image)
    ref = tmp_path / "ref.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(ref), str(IMAGE_SIZE)], check=True
    )
    assert image.read_bytes() == ref.read_bytes()
    image.write_bytes(b"keep me")
    ensure_image(image)
    assert image.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_default_run_serves_the_qcow2_image(tmp_path: Path) -> None:
    ensure_image(tmp_path / IMAGE)
    args = default_args(tmp_path)
    daemon = DaemonProcess(ours_command(), args, tmp_path, monitor="none").start()
    try:
        assert daemon.wait_ready(20), daemon.stderr
        nbd = f"nbd+unix:///disk0?socket={tmp_path / 'nbd.sock'}"
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", nbd],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    finally:
        assert daemon.stop() == 0
    check = subprocess.run(
        ["qemu-img", "check", str(tmp_path / IMAGE)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    read = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", str(tmp_path / IMAGE)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout
