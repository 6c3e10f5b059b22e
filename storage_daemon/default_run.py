"""`make run`: the daemon on an embedded default configuration, for a first look.

Edge ring. Creates `run/` in the checkout (and an empty 1 GiB qcow2 `run/default.qcow2` on
first run, written by our own qcow2 layout code, never overwritten), prints how to connect over
QMP and NBD, then replaces itself with the daemon (same PID, so Ctrl-C and SIGTERM reach the
daemon directly).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from storage_daemon.blockdev.drivers.qcow2 import layout

RUN_DIR = Path(__file__).resolve().parent.parent / "run"
IMAGE_SIZE = 1 << 30
IMAGE = "default.qcow2"


def default_args(run_dir: Path) -> list[str]:
    return [
        "--blockdev", "driver=null-co,node-name=null0,size=1073741824,read-zeroes=on",
        "--blockdev",
        f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={run_dir / IMAGE}",
        "--nbd-server", f"addr.type=unix,addr.path={run_dir / 'nbd.sock'}",
        "--export", "type=nbd,id=export0,node-name=disk0,name=disk0,writable=on",
        "--chardev", f"socket,id=qmp0,path={run_dir / 'qmp.sock'},server=on,wait=off",
        "--monitor", "chardev=qmp0",
        "--pidfile", str(run_dir / "storage-daemon.pid"),
    ]  # fmt: skip


def ensure_image(path: Path) -> None:
    """An empty qcow2 image of IMAGE_SIZE bytes (as `blockdev-create` makes it), created only
    if nothing is there yet; written to a temporary name and linked into place."""
    if path.exists():
        return
    params = layout.validate(
        size=IMAGE_SIZE, version=None, cluster_size=None, refcount_bits=None,
        lazy_refcounts=None, extended_l2=None, compression_type=None, backing_file=None,
        backing_fmt=None, has_data_file=False, data_file_raw=None, preallocation=None,
    )  # fmt: skip
    plan = layout.plan(params)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.truncate(plan.file_length)
            for offset, data in layout.image_writes(plan):
                f.seek(offset)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces an image that appeared meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def main() -> None:
    RUN_DIR.mkdir(exist_ok=True)
    ensure_image(RUN_DIR / IMAGE)
    sock = RUN_DIR / "qmp.sock"
    nbd = f"nbd+unix:///disk0?socket={RUN_DIR / 'nbd.sock'}"
    python = sys.executable
    print(
        f"storage-daemon: QMP monitor on {sock}, default node 'null0' (1 GiB of zeroes).\n"
        f"NBD export 'disk0' (writable) of the qcow2 image {RUN_DIR / IMAGE} on "
        f"{RUN_DIR / 'nbd.sock'}. Try:\n"
        f"  nbdinfo '{nbd}'\n"
        f"  nbdinfo --map '{nbd}'\n"
        f"  qemu-img info '{nbd}'\n"
        f"  qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' '{nbd}'\n"
        f"Connect with:\n"
        f"  {Path(python).parent / 'qmp-shell'} {sock}\n"
        f"or from Python (qemu.qmp):\n"
        f'  {python} -c "import asyncio; from qemu.qmp import QMPClient\n'
        f"  async def m():\n"
        f"      c = QMPClient(); await c.connect('{sock}')\n"
        f"      print(await c.execute('query-named-block-nodes')); await c.disconnect()\n"
        f'  asyncio.run(m())"\n'
        f"Stop with Ctrl-C (or SIGTERM to the PID in {RUN_DIR / 'storage-daemon.pid'}).",
        flush=True,
    )
    argv = [python, "-m", "storage_daemon", *default_args(RUN_DIR)]
    os.execv(python, argv)


if __name__ == "__main__":
    main()
