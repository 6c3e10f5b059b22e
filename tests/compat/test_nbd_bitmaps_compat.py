"""Dirty bitmaps exported over NBD on the reference qsd and on ours: block-export-add
`bitmaps` (bare names down the chain, {node, name} pairs), `--export ...,bitmaps.N=`, the
deprecated nbd-server-add `bitmap`, the busy flag, and what clients see (meta contexts,
`nbdinfo --map`, BLOCK_STATUS through libnbd), compared live.

Test ring (compat). Images come from qemu-img/qemu-io; every daemon is stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import (
    Cmd,
    Compat,
    WaitEvent,
    all_of,
    cli,
    diff_text,
    qemu_io_nbd,
)
from tests.compat.test_nbd_compat import _libnbd
from tests.compat.test_qcow2_bitmaps_compat import bitmapped, run

pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("qemu-img", "qemu-io", "nbdinfo")),
        reason="qemu-img, qemu-io or nbdinfo missing",
    ),
]

MiB = 1 << 20
UNIX = {"type": "unix", "data": {"path": "$D/nbd.sock"}}
START = Cmd("nbd-server-start", {"addr": UNIX})
NODES = Cmd("query-named-block-nodes", {"flat": True})
EXPORTS = Cmd("query-block-exports")
DELETED = WaitEvent("BLOCK_EXPORT_DELETED")
NBD = ["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"]


def chain(d: Path) -> None:
    """`$D/top.qcow2` over `$D/base.qcow2`; base holds an enabled "bb" and a disabled "bbd",
    dirtied by qemu-io; top has data of its own and no bitmap."""
    base, top = str(d / "base.qcow2"), str(d / "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    run("qemu-img", "bitmap", "--add", base, "bb")
    run("qemu-img", "bitmap", "--add", "--disable", base, "bbd")
    run("qemu-io", "-f", "qcow2", "-c", "write 64k 4k", "-c", "write 3M 1M", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", "-c", "write 1M 64k", top)


def images(d: Path) -> None:
    # b0 (64 KiB), g512, dis (disabled), big (2 MiB); dirty at 0, 1M+70k, 3999k+1k
    bitmapped(d, "bm.qcow2")
    bitmapped(d, "bad.qcow2", in_use=("b0",))
    chain(d)


ARGS = [
    "--blockdev", "driver=qcow2,node-name=rw,file.driver=file,file.filename=$D/bm.qcow2",
    "--blockdev", "driver=qcow2,node-name=bad,file.driver=file,file.filename=$D/bad.qcow2",
    "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=$D/top.qcow2",
    "--blockdev", "driver=null-co,node-name=n,size=4194304",
]  # fmt: skip


def check(compat: Compat, steps: list[Any]) -> None:
    """`steps` after starting the NBD server, on both daemons over the ARGS nodes."""
    compat.check_transcript([START, *steps], args=ARGS, setup=images)


def export(export_id: str, node: str, *bitmaps: Any, **opts: Any) -> Cmd:
    return Cmd(
        "block-export-add",
        {"type": "nbd", "id": export_id, "node-name": node, "bitmaps": list(bitmaps), **opts},
    )


def on(command: str, node: str, name: str) -> Cmd:
    return Cmd(f"block-dirty-bitmap-{command}", {"node": node, "name": name})


def test_export_bitmaps_errors_and_busy(compat: Compat) -> None:
    check(
        compat,
        [
            Cmd("block-dirty-bitmap-add", {"node": "n", "name": "mem", "granularity": 512}),
            # lookup errors, bare names and {node, name} pairs
            export("e1", "n", "nosuch"),
            export("e1", "n", {"node": "nosuch", "name": "b0"}),
            export("e1", "n", {"node": "n", "name": "b0"}),
            export("e1", "n", "b0"),  # rw's bitmap is not n's
            export("e1", "n", "mem", "nosuch", writable=True),
            # an enabled bitmap needs a writable export; a disabled one does not
            export("e1", "rw", "b0"),
            export("e1", "rw", "g512", "b0", name="x"),
            export("e1", "rw", "dis"),
            NODES,
            # exporting it twice, or changing it, while it is exported
            export("e2", "rw", "dis", name="again"),
            export("e2", "rw", "g512", "dis", name="again", writable=True),
            EXPORTS,
            *(on(v, "rw", "dis") for v in ("remove", "clear", "enable", "disable")),
            Cmd("block-dirty-bitmap-merge", {"node": "rw", "target": "dis", "bitmaps": ["b0"]}),
            Cmd("block-dirty-bitmap-merge", {"node": "rw", "target": "b0", "bitmaps": ["dis"]}),
            Cmd("block-export-del", {"id": "e1"}),
            DELETED,
            NODES,
            on("clear", "rw", "dis"),
            # an inconsistent (in-use) stored bitmap; its consistent neighbour
            export("e3", "bad", "b0", writable=True),
            export("e3", "bad", "g512", writable=True),
            # in memory; several on one export (one twice), a pair naming the node
            export("e4", "n", "mem", writable=True),
            export("e5", "rw", "b0", "g512", {"node": "rw", "name": "big"}, writable=True),
            export("e6", "rw", "dis", "dis", name="twice"),
            # found by bare name on the (read-only) backing node: enabled ones too
            export("e7", "top", "bbd"),
            export("e8", "top", "bb", name="topr"),
            export("e9", "top", {"node": "top", "name": "bb"}, name="pair"),
            EXPORTS,
            NODES,
            *(on(v, "n", "mem") for v in ("remove", "clear", "disable")),
            Cmd("block-export-del", {"id": "e5"}),
            DELETED,
            Cmd("block-export-del", {"id": "e4", "mode": "hard"}),
            DELETED,
            on("remove", "n", "mem"),
            on("clear", "rw", "g512"),
            Cmd("block-export-del", {"id": "e6"}),
            DELETED,
            NODES,
            on("remove", "rw", "dis"),
        ],
    )


def test_enabled_bitmap_pair_on_readonly_export(compat: Compat) -> None:
    check(
        compat,
        [
            Cmd("block-dirty-bitmap-add", {"node": "n", "name": "mem"}),
            export("e1", "rw", {"node": "rw", "name": "b0"}),
            export("e2", "rw", {"node": "n", "name": "mem"}, name="other"),
            EXPORTS,
        ],
    )


def test_readonly_check_comes_before_busy(compat: Compat) -> None:
    check(
        compat,
        [
            export("e1", "rw", "b0", writable=True),
            export("e2", "rw", "b0", name="ro"),
            Cmd("nbd-server-add", {"device": "rw", "name": "old", "bitmap": "b0"}),
        ],
    )


def test_nbd_server_add_bitmap(compat: Compat) -> None:
    """The deprecated nbd-server-add takes one `bitmap`, a bare name on the device."""
    check(
        compat,
        [
            Cmd("nbd-server-add", {"device": "rw", "bitmap": "nosuch"}),
            Cmd("nbd-server-add", {"device": "rw", "bitmap": "b0"}),
            Cmd("nbd-server-add", {"device": "rw", "name": "w", "writable": True, "bitmap": "b0"}),
            Cmd("nbd-server-add", {"device": "rw", "name": "r", "bitmap": "dis"}),
            Cmd("nbd-server-add", {"device": "rw", "name": "x", "bitmap": "dis"}),
            Cmd("nbd-server-add", {"device": "top", "bitmap": "bbd"}),
            Cmd("nbd-server-add", {"device": "bad", "writable": True, "bitmap": "b0"}),
            EXPORTS,
            NODES,
            on("remove", "rw", "b0"),
            Cmd("nbd-server-remove", {"name": "w"}),
            DELETED,
            Cmd("nbd-server-stop"),
            DELETED,
            DELETED,
            DELETED,
            NODES,
            on("remove", "rw", "b0"),
        ],
    )


RW = ["--blockdev", "driver=qcow2,node-name=rw,file.driver=file,file.filename=$D/bm.qcow2"]
E = "type=nbd,id=e0,node-name=rw"


@pytest.mark.parametrize(
    "opts",
    [
        "bitmaps.0=nosuch",
        "bitmaps.0=b0",
        "bitmaps.0=b0,writable=on",
        "bitmaps.0=dis,bitmaps.1=dis",
        "bitmaps.0=dis,bitmaps.1=g512",
        "bitmaps.0=dis,bitmaps.1=g512,writable=on",
        "bitmaps.0.node=rw,bitmaps.0.name=dis",
        "bitmaps.0.node=nosuch,bitmaps.0.name=dis",
        "bitmaps.0=",
        "bitmaps=dis",
    ],
)
def test_command_line_bitmaps(compat: Compat, opts: str) -> None:
    compat.check_cli(cli(*RW, *NBD, "--export", f"{E},{opts}", setup=images))


def test_remove_of_loaded_bitmap_allocation(compat: Compat) -> None:
    compat.check_transcript(
        [on("remove", "rw", "dis"), NODES, on("remove", "rw", "big"), NODES], args=RW, setup=images
    )


def test_command_line_export_is_busy(compat: Compat) -> None:
    """An export from the command line holds its bitmaps until it is deleted."""
    compat.check_transcript(
        [
            NODES,
            on("remove", "rw", "dis"),
            export("e1", "rw", "dis", name="other"),
            Cmd("block-export-del", {"id": "e0"}),
            DELETED,
            NODES,
            on("remove", "rw", "dis"),
        ],
        args=[*RW, *NBD, "--export", f"{E},bitmaps.0=dis,bitmaps.1=big,writable=on"],
        setup=images,
    )


# -- what clients see -------------------------------------------------------------------------

#: (offset, length, REQ_ONE) on the 4 MiB images; dirty: [0, 1), [1M, 1M+70k), [3999k, 4000k)
_RANGES = [
    (0, 4 * MiB, 0), (0, 4 * MiB, 1), (100, 1000, 0), (100, 1000, 1), (700, MiB + 1000, 0),
    (MiB + 100, 70 << 10, 0), (MiB + 71580, 300, 0), (MiB + 71580, 300, 1),
    (MiB + 71681, MiB, 0), (4128868, 65000, 0), (4128868, 65000, 1), (2 * MiB + 1, 2 * MiB - 1, 0),
    (3 * MiB, 4096, 1), (4 * MiB - 512, 512, 0),
]  # fmt: skip

_STATUS = """
import errno, nbd, sys
sock, name, contexts = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
ranges = [tuple(int(x) for x in r.split(":")) for r in sys.argv[4:]]
h = nbd.NBD()
for c in contexts:
    h.add_meta_context(c)
h.set_export_name(name)
h.connect_unix(sock)
print(name, h.get_size(), [(c, h.can_meta_context(c)) for c in contexts])
for off, n, one in ranges:
    seen = []
    def extent(ctx, offset, entries, err):
        seen.append("%s@%d:%s" % (ctx, offset, list(entries)))
        return 0
    try:
        h.block_status(n, off, extent, nbd.CMD_FLAG_REQ_ONE if one else 0)
        result = "ok"
    except nbd.Error as e:
        result = errno.errorcode.get(e.errno, str(e.errno))
    print(name, off, n, one, result, *sorted(seen))
h.shutdown()
"""


def _status(sock: Path, name: str, *contexts: str) -> str:
    ranges = [f"{o}:{n}:{one}" for o, n, one in _RANGES]
    return _libnbd(_STATUS, str(sock), name, ",".join(contexts), *ranges)


def _nbdinfo(workdir: Path, *args: str) -> str:
    done = subprocess.run(
        ["nbdinfo", *args], capture_output=True, text=True, timeout=60, cwd=workdir
    )
    return f"$ nbdinfo {' '.join(args)} -> {done.returncode}\n{done.stdout}{done.stderr}".replace(
        str(workdir), "$D"
    )


def _listing(workdir: Path) -> str:
    """`nbdinfo --list --json`: per export, its name, size and meta contexts."""
    sock = workdir / "nbd.sock"
    done = subprocess.run(
        ["nbdinfo", "--list", "--json", f"nbd+unix://?socket={sock}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout.replace(str(workdir), "$D"))
    exports = sorted(listing["exports"], key=lambda e: str(e.get("export-name")))
    return "\n".join(json.dumps(e, sort_keys=True) for e in exports) + "\n"


def _compare(out: dict[str, str]) -> None:
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"].splitlines(), out["ours"].splitlines()))


CLIENT_ARGS = [
    *RW, *NBD,
    "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=$D/top.qcow2",
    "--export", f"{E},name=rw,writable=on,bitmaps.0=b0,bitmaps.1=g512,bitmaps.2=big,"
    "allocation-depth=on",
    "--export", "type=nbd,id=e1,node-name=rw,name=ro,bitmaps.0=dis",
    "--export", "type=nbd,id=e2,node-name=top,name=top,bitmaps.0=bbd",
]  # fmt: skip

_MAPS = [("rw", "b0"), ("rw", "g512"), ("rw", "big"), ("ro", "dis"), ("top", "bbd")]


def _maps(workdir: Path, maps: list[tuple[str, str]]) -> str:
    sock = workdir / "nbd.sock"
    return "".join(
        _nbdinfo(workdir, f"--map=qemu:dirty-bitmap:{b}", f"nbd+unix:///{e}?socket={sock}")
        for e, b in maps
    )


def test_what_clients_see(compat: Compat) -> None:
    """Meta contexts listed, `nbdinfo --map` of each bitmap, BLOCK_STATUS of ranges that
    start and end inside granules (512 B, 64 KiB, 2 MiB), with REQ_ONE, past the last dirty
    granule; then again after writes through the export, with a bitmap added at run time."""
    pair = compat.daemons(CLIENT_ARGS, setup=images)
    out: dict[str, str] = {}
    for side, daemon in pair.items():
        w = daemon.workdir
        sock = w / "nbd.sock"
        text = _listing(w) + _maps(w, _MAPS)
        text += _nbdinfo(w, "--map=qemu:dirty-bitmap:nosuch", f"nbd+unix:///rw?socket={sock}")
        bitmaps = ("qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:g512", "qemu:dirty-bitmap:big")
        text += _status(sock, "rw", "base:allocation", *bitmaps, "qemu:dirty-bitmap:dis")
        text += _status(sock, "ro", "qemu:dirty-bitmap:dis")
        text += _status(sock, "top", "qemu:dirty-bitmap:bbd", "qemu:allocation-depth")
        # new dirty granules from writes through the export, and a bitmap made now
        client = compat.connect(daemon)
        client.negotiate()
        add = {"node": "rw", "name": "m", "granularity": 4096}
        text += json.dumps(client.cmd("block-dirty-bitmap-add", add)) + "\n"
        mem = {"type": "nbd", "id": "e3", "node-name": "rw", "name": "mem", "bitmaps": ["m"]}
        text += json.dumps(client.cmd("block-export-add", {**mem, "writable": True})) + "\n"
        for io in ("write 2500k 1", "write -z 300k 200k", "write 4190000 4304", "discard 1M 64k"):
            text += json.dumps(qemu_io_nbd(w, "rw", io)) + "\n"
        text += json.dumps(qemu_io_nbd(w, "mem", "write 700k 10k")) + "\n"
        text += _maps(w, [*_MAPS[:3], ("mem", "m"), ("rw", "m")])
        text += _status(sock, "mem", "qemu:dirty-bitmap:m", "qemu:dirty-bitmap:b0")
        text += _status(sock, "rw", *bitmaps)
        out[side] = text
    _compare(out)
    # Whatever both say, the essentials: runs of granules clipped to the request, REQ_ONE.
    ours = out["ours"]
    assert '"qemu:dirty-bitmap:g512"' in ours
    assert "qemu:dirty-bitmap:g512@100:[412, 1, 588, 0]" in ours
    assert "qemu:dirty-bitmap:g512@100:[412, 1]" in ours
    assert "qemu:dirty-bitmap:b0@100:[1000, 1]" in ours


def test_writes_dirty_an_exported_bitmap_of_a_raw_node(compat: Compat) -> None:
    """A bitmap added at run time on a raw file node, exported, then written through."""
    args = [
        "--blockdev", "driver=file,node-name=f,filename=$D/img.raw",
        "--blockdev", "driver=raw,node-name=r,file=f",
        *NBD,
    ]  # fmt: skip

    def raw(d: Path) -> None:
        with open(d / "img.raw", "wb") as f:
            f.truncate(4 * MiB)

    pair = compat.daemons(args, setup=all_of(raw))
    out: dict[str, str] = {}
    for side, daemon in pair.items():
        w = daemon.workdir
        client = compat.connect(daemon)
        client.negotiate()
        text = ""
        for name, g in (("a", 512), ("b", 2 * MiB), ("c", 65536)):
            add = {"node": "r", "name": name, "granularity": g}
            text += json.dumps(client.cmd("block-dirty-bitmap-add", add)) + "\n"
        text += json.dumps(client.cmd("block-dirty-bitmap-add", {"node": "f", "name": "d"})) + "\n"
        exp: dict[str, Any] = {"type": "nbd", "id": "e", "node-name": "r", "writable": True}
        # raw is no filter: its file's bitmap is not found by a bare name
        exp["bitmaps"] = ["a", "b", "c", "d"]
        text += json.dumps(client.cmd("block-export-add", exp)) + "\n"
        exp["bitmaps"] = ["a", "b", "c", {"node": "f", "name": "d"}]
        text += json.dumps(client.cmd("block-export-add", exp)) + "\n"
        for io in ("write 1000 10", "write 1M 513", "write 1900k 1"):
            text += json.dumps(qemu_io_nbd(w, "r", io)) + "\n"
        text += _maps(w, [("r", b) for b in "abcd"])
        contexts = [f"qemu:dirty-bitmap:{b}" for b in "abcd"]
        text += _status(w / "nbd.sock", "r", *contexts)
        out[side] = text
    _compare(out)
