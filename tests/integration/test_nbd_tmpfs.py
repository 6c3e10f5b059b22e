"""nbdcopy through our daemon with the image on tmpfs, where reads are served live.

Integration ring: on tmpfs the daemon answers READs of known data extents with views of the
page cache (no copy) and keeps freed buffers for reuse. Checked with real clients: every byte
copied out and in is right, and reading the whole image (holes included) leaves it exactly
as sparse as it was. Every daemon is stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.daemon import ours_command
from tests.integration.test_nbd_clients import SIZE, daemon, export_args, make_image, run, uri

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("nbdcopy", "nbdinfo")), reason="nbdcopy not installed"
)


def test_nbdcopy_out_and_in_on_tmpfs(shm_dir: Path, tmp_path: Path) -> None:
    image = make_image(shm_dir / "disk.img")
    blocks = os.stat(image).st_blocks
    sock = tmp_path / "nbd.sock"
    with daemon(ours_command(), tmp_path / "d", export_args(image, sock)):
        before = run("nbdinfo", "--map", uri(sock)).stdout
        assert "hole,zero" in before and "data" in before
        copy = shm_dir / "copy.img"
        run("nbdcopy", uri(sock), str(copy))  # extents first, then live reads of the data
        assert copy.read_bytes() == image.read_bytes()
        run("nbdcopy", "--no-extents", uri(sock), "null:")  # holes read too
        assert os.stat(image).st_blocks == blocks  # no hole got allocated by reading it
        assert run("nbdinfo", "--map", uri(sock)).stdout == before

        source = shm_dir / "source.img"
        source.write_bytes(os.urandom(SIZE))
        run("nbdcopy", str(source), uri(sock))
        run("nbdcopy", uri(sock), str(copy))
        assert copy.read_bytes() == source.read_bytes() == image.read_bytes()


SYSTEM_PYTHON = "/usr/bin/python3"  # holds libnbd's Python bindings (as nbdsh uses it)

_SHRINK_WHILE_MAPPED = """
import errno, nbd, os, sys
sock, image = sys.argv[1], sys.argv[2]
MiB = 1 << 20

def attempt(h, offset):
    try:
        return "zeroes" if h.pread(MiB, offset) == bytes(MiB) else "data"
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, str(e.errno))

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.set_export_name("disk0")
h.connect_unix(sock)
h.block_status(h.get_size(), 0, lambda *args: 0)  # the whole image is one data extent
print(attempt(h, 8 * MiB))  # served from the mapping
os.truncate(image, 4096)  # shrunk behind the daemon's back, mapping still alive
print(attempt(h, 8 * MiB))
print(attempt(h, 12 * MiB))
"""


def test_image_shrunk_by_another_process_while_mapped(shm_dir: Path, tmp_path: Path) -> None:
    """Live reads send views of a mapping; when another process truncates the image under
    it, the pages past the new EOF are gone. The daemon notices (the file's size is checked
    before a view is handed out) and reads instead: what is gone reads as zeroes, as in qsd,
    and the daemon neither dies of SIGBUS nor drops the client."""
    if subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("libnbd's Python bindings are not installed")
    image = shm_dir / "disk.img"
    image.write_bytes(os.urandom(16 << 20))
    sock = tmp_path / "nbd.sock"
    with daemon(ours_command(), tmp_path / "d", export_args(image, sock)) as proc:
        done = subprocess.run(
            [SYSTEM_PYTHON, "-c", _SHRINK_WHILE_MAPPED, str(sock), str(image)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["data", "zeroes", "zeroes"]
        assert proc.returncode is None, proc.stderr  # no SIGBUS
        # The daemon still serves: a new client reads what is left of the file.
        assert run("nbdinfo", "--size", uri(sock)).stdout.strip() == str(16 << 20)
        run("nbdcopy", "--no-extents", uri(sock), "null:")
        assert proc.returncode is None, proc.stderr
