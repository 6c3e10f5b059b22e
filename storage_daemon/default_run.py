"""`make run`: the daemon on an embedded default configuration, for a first look.

Edge ring. Creates `run/` in the checkout (and a sparse 1 GiB `run/default.img` on first run,
never overwritten), prints how to connect over QMP and NBD, then replaces itself with the
daemon (same PID, so Ctrl-C and SIGTERM reach the daemon directly).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RUN_DIR = Path(__file__).resolve().parent.parent / "run"
IMAGE_SIZE = 1 << 30


def default_args(run_dir: Path) -> list[str]:
    return [
        "--blockdev", "driver=null-co,node-name=null0,size=1073741824,read-zeroes=on",
        "--blockdev", f"driver=file,node-name=file0,filename={run_dir / 'default.img'}",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--nbd-server", f"addr.type=unix,addr.path={run_dir / 'nbd.sock'}",
        "--export", "type=nbd,id=export0,node-name=disk0,name=disk0,writable=on",
        "--chardev", f"socket,id=qmp0,path={run_dir / 'qmp.sock'},server=on,wait=off",
        "--monitor", "chardev=qmp0",
        "--pidfile", str(run_dir / "storage-daemon.pid"),
    ]  # fmt: skip


def ensure_image(path: Path) -> None:
    """A sparse raw image of IMAGE_SIZE bytes, created only if nothing is there yet."""
    try:
        with open(path, "xb") as f:
            f.truncate(IMAGE_SIZE)
    except FileExistsError:
        pass


def main() -> None:
    RUN_DIR.mkdir(exist_ok=True)
    ensure_image(RUN_DIR / "default.img")
    sock = RUN_DIR / "qmp.sock"
    nbd = f"nbd+unix:///disk0?socket={RUN_DIR / 'nbd.sock'}"
    python = sys.executable
    print(
        f"storage-daemon: QMP monitor on {sock}, default node 'null0' (1 GiB of zeroes).\n"
        f"NBD export 'disk0' (writable) of {RUN_DIR / 'default.img'} on "
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
