"""`make run`: the daemon on an embedded default configuration, for a first look.

Edge ring. Creates `run/` in the checkout, prints how to connect, then replaces itself with
the daemon (same PID, so Ctrl-C and SIGTERM reach the daemon directly).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RUN_DIR = Path(__file__).resolve().parent.parent / "run"


def default_args(run_dir: Path) -> list[str]:
    return [
        "--blockdev", "driver=null-co,node-name=null0,size=1073741824,read-zeroes=on",
        "--chardev", f"socket,id=qmp0,path={run_dir / 'qmp.sock'},server=on,wait=off",
        "--monitor", "chardev=qmp0",
        "--pidfile", str(run_dir / "storage-daemon.pid"),
    ]  # fmt: skip


def main() -> None:
    RUN_DIR.mkdir(exist_ok=True)
    sock = RUN_DIR / "qmp.sock"
    python = sys.executable
    print(
        f"storage-daemon: QMP monitor on {sock}, default node 'null0' (1 GiB of zeroes).\n"
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
