"""Persistent dirty bitmaps in qcow2 images on the reference qsd and on ours: what a node
loads, how every verb treats consistent, read-only and inconsistent stored bitmaps, the in-use
marking while open, and what each daemon leaves in the image, judged by the REFERENCE's reader.

Test ring (compat). Images come from qemu-img/qemu-io; "in-use" bitmaps (a crash's leftovers)
are made deterministically by setting bit 0 of the directory entry's flags (not by kill -9 of
a running daemon). Every daemon is stopped by PID at teardown.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import (
    Cmd,
    Compat,
    ExpectEof,
    Normaliser,
    cli,
    diff_text,
    normalise_transcript,
    qemu_io_nbd,
)
from tests.compat.test_bitmaps_compat import add, merge, on, sha
from tests.integration.daemon import RawQmp, reference_command, running_daemon

pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(
        shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
        reason="qemu-img or qemu-io missing",
    ),
]

NODES = Cmd("query-named-block-nodes", {"flat": True})
BITMAPS_EXT = 0x23852875
SIZE = 4 << 20

#: (name, qemu-img bitmap options) in directory order.
STORED: list[tuple[str, list[str]]] = [
    ("b0", []),
    ("g512", ["-g", "512"]),
    ("dis", ["--disable"]),
    ("big", ["-g", "2M"]),
]


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def find_directory(path: Path) -> tuple[int, int, int, int]:
    """(position of the bitmaps header extension's data, count, directory size, offset)."""
    with open(path, "rb") as f:
        header = f.read(1 << 16)
    (header_length,) = struct.unpack_from(">I", header, 100)
    pos = header_length
    while True:
        ext_type, ext_len = struct.unpack_from(">II", header, pos)
        assert ext_type != 0, "no bitmaps extension"
        if ext_type == BITMAPS_EXT:
            count, _, dir_size, dir_offset = struct.unpack_from(">IIQQ", header, pos + 8)
            return pos + 8, count, dir_size, dir_offset
        pos += 8 + (ext_len + 7) // 8 * 8


def set_in_use(path: Path, *names: str) -> None:
    """Flag the named bitmaps in_use, as a crash leaves them: bit 0 of the flags at byte 12
    of each directory entry, the directory found through the bitmaps header extension."""
    _, count, dir_size, dir_offset = find_directory(path)
    with open(path, "r+b") as f:
        f.seek(dir_offset)
        directory = bytearray(f.read(dir_size))
        entry, found = 0, set()
        for _ in range(count):
            name_size, extra = struct.unpack_from(">HI", directory, entry + 18)
            start = entry + 24 + extra
            name = directory[start : start + name_size].decode()
            if name in names:
                (flags,) = struct.unpack_from(">I", directory, entry + 12)
                struct.pack_into(">I", directory, entry + 12, flags | 1)
                found.add(name)
            entry += (24 + extra + name_size + 7) // 8 * 8
        assert found == set(names), (found, names)
        f.seek(dir_offset)
        f.write(directory)


def bitmapped(d: Path, name: str, in_use: tuple[str, ...] = ()) -> None:
    """`$D/<name>`: 4 MiB qcow2 with the STORED bitmaps, dirtied by qemu-io (which keeps the
    enabled ones), then `in_use` flagged."""
    img = str(d / name)
    run("qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE))
    for bitmap, opts in STORED:
        run("qemu-img", "bitmap", "--add", *opts, img, bitmap)
    run("qemu-io", "-f", "qcow2", "-c", "write 0 1", "-c", "write 1M 70k",
        "-c", "write 3999k 1k", img)  # fmt: skip
    if in_use:
        set_in_use(d / name, *in_use)


def make_images(d: Path) -> None:
    bitmapped(d, "rw.qcow2")
    bitmapped(d, "bad.qcow2", in_use=("b0", "big"))
    bitmapped(d, "ro.qcow2", in_use=("big",))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(d / "v2.qcow2"), "1M")


def qcow2(node: str, image: str, *opts: str) -> list[str]:
    """A file node `<node>f` and a qcow2 node `<node>` on `$D/<image>`."""
    extra = "".join(f",{o}" for o in opts)
    return [
        "--blockdev", f"driver=file,filename=$D/{image},node-name={node}f{extra}",
        "--blockdev", f"driver=qcow2,file={node}f,node-name={node}{extra}",
    ]  # fmt: skip


ARGS = [
    *qcow2("rw", "rw.qcow2"),
    *qcow2("bad", "bad.qcow2"),
    *qcow2("ro", "ro.qcow2", "read-only=on"),
    *qcow2("v2", "v2.qcow2"),
]
NAMES = [name for name, _ in STORED]


def check_transcript(compat: Compat, steps: list[Cmd | ExpectEof]) -> None:
    """Run `steps` on both daemons over the ARGS nodes. (A node's ImageInfo lists the
    image's bitmap directory, with its in-use flags, and its host allocation.)"""
    compat.check_transcript(steps, args=ARGS, setup=make_images)


def test_loaded_bitmaps(compat: Compat) -> None:
    check_transcript(
        compat,
        [
            NODES,
            *(sha(node, name) for node in ("rw", "bad", "ro") for name in NAMES),
            Cmd("quit"),
            ExpectEof(),
        ],
    )


def test_verbs_on_loaded_bitmaps(compat: Compat) -> None:
    verbs = ("clear", "enable", "disable", "remove")
    check_transcript(
        compat,
        [
            # Consistent on a read-write node.
            on("clear", "rw", "b0"),
            sha("rw", "b0"),
            on("disable", "rw", "g512"),
            on("enable", "rw", "dis"),
            merge("rw", "b0", "g512"),
            sha("rw", "b0"),
            # Read-only node: consistent "b0", inconsistent "big".
            *(on(v, "ro", "b0") for v in ("clear", "enable", "disable", "enable")),
            merge("ro", "b0", "g512"),
            merge("rw", "dis", {"node": "ro", "name": "g512"}),
            *(on(v, "ro", "big") for v in (*verbs, "disable")),
            sha("ro", "big"),
            # Inconsistent on a read-write node.
            *(on(v, "bad", "b0") for v in ("clear", "enable", "disable")),
            sha("bad", "b0"),
            merge("bad", "b0", "g512"),
            merge("bad", "g512", "b0"),
            merge("rw", "b0", {"node": "bad", "name": "b0"}),
            merge("rw", "b0", {"node": "ro", "name": "big"}),
            # Persistent additions.
            add("v2", "n", persistent=True),
            add("v2", "n"),
            add("ro", "n", persistent=True),
            add("rwf", "n", persistent=True),
            add("rw", "g", persistent=True, granularity=512),
            add("rw", "h", persistent=True, granularity=1 << 31),
            add("rw", "b0", persistent=True),
            add("rw", "b0"),
            add("bad", "b0"),
            add("ro", "big", persistent=True),
            NODES,
            # Resizes (with two inconsistent ones: test_resize_names_first_inconsistent).
            Cmd("block_resize", {"node-name": "rw", "size": SIZE * 2}),
            Cmd("block_resize", {"node-name": "ro", "size": SIZE * 2}),
            *(sha("rw", name) for name in (*NAMES, "g", "h")),
            on("remove", "bad", "b0"),
            Cmd("block_resize", {"node-name": "bad", "size": SIZE * 2}),
            on("remove", "bad", "big"),
            Cmd("block_resize", {"node-name": "bad", "size": SIZE * 2}),
            NODES,
            Cmd("quit"),
            ExpectEof(),
        ],
    )


NBD = ["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"]
EXPORT = ["--export", "type=nbd,id=e0,node-name=rw,writable=on"]

# (command, arguments) or ("qemu-io", command line for the export rw).
LIFE_STEPS: list[tuple[str, Any]] = [
    ("qemu-io", "write 2M 1"),
    ("block-dirty-bitmap-remove", {"node": "rw", "name": "g512"}),
    ("info", None),
    (
        "block-dirty-bitmap-add",
        {"node": "rw", "name": "new", "persistent": True, "granularity": 4096},
    ),
    (
        "block-dirty-bitmap-add",
        {"node": "rw", "name": "off", "persistent": True, "disabled": True},
    ),
    ("block-dirty-bitmap-add", {"node": "rw", "name": "temp"}),
    ("block-dirty-bitmap-disable", {"node": "rw", "name": "b0"}),
    ("qemu-io", "write -P 7 300k 100k"),
    (
        "transaction",
        {
            "actions": [
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {
                        "node": "rw",
                        "name": "t1",
                        "persistent": True,
                        "granularity": 65536 * 4,
                    },
                },
                {"type": "block-dirty-bitmap-remove", "data": {"node": "rw", "name": "big"}},
            ]
        },
    ),
    ("qemu-io", "write -z 3M 8k"),
    ("block-dirty-bitmap-merge", {"node": "rw", "target": "off", "bitmaps": ["new"]}),
    ("block-dirty-bitmap-add", {"node": "ro", "name": "lost", "persistent": True}),
    ("block-dirty-bitmap-remove", {"node": "bad", "name": "big"}),
    ("info", None),
]


def qemu_img_json(d: Path, *args: str) -> Any:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=30)
    out = proc.stdout.replace(str(d), "$D")
    value: Any = json.loads(out) if out.strip().startswith("{") else out
    return {"rc": proc.returncode, "out": value, "err": proc.stderr.replace(str(d), "$D")}


def stored_bitmaps(d: Path, image: str, *, force_share: bool = False) -> Any:
    """`qemu-img info --output=json` of `$D/<image>`, reduced to its bitmaps (name, flags,
    granularity), or the error if there is none."""
    opts = ["-U"] if force_share else []
    info = qemu_img_json(d, "info", *opts, "--output=json", str(d / image))
    if not isinstance(info["out"], dict):
        return info
    return info["out"]["format-specific"]["data"].get("bitmaps")


def dirty_bitmaps(client: RawQmp) -> dict[str, Any]:
    nodes = client.cmd("query-named-block-nodes", {"flat": True})
    return {n["node-name"]: n.get("dirty-bitmaps") for n in nodes.get("return", [])}


def reference_read(workdir: Path, image: Path) -> Any:
    """Open `image` read-only in the REFERENCE qsd; its bitmaps as qsd lists them and the
    sha256 of each."""
    workdir.mkdir()
    args = [
        "--blockdev",
        f"driver=qcow2,node-name=q,read-only=on,file.driver=file,file.filename={image}",
    ]
    with (
        running_daemon(reference_command(), args, workdir) as daemon,
        daemon.connect_qmp() as client,
    ):
        client.negotiate()
        listed = dirty_bitmaps(client)["q"] or []
        hashes = {
            b["name"]: client.cmd(
                "x-debug-block-dirty-bitmap-sha256", {"node": "q", "name": b["name"]}
            )
            for b in listed
        }
        client.cmd("quit")
        daemon.wait_exit(10)
    return {"listed": listed, "sha256": hashes}


IMAGES = ("rw.qcow2", "bad.qcow2", "ro.qcow2")


def test_stored_bitmaps_after_nbd_writes_and_quit(compat: Compat) -> None:
    pair = compat.daemons([*ARGS, *NBD, *EXPORT], make_images)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        d = daemon.workdir
        client = compat.connect(daemon)
        client.negotiate()
        records: list[Any] = []
        for name, value in LIFE_STEPS:
            if name == "qemu-io":
                records.append(qemu_io_nbd(d, "rw", value))
            elif name == "info":
                # While open read-write, every stored bitmap is flagged in-use on disk.
                records.append({image: stored_bitmaps(d, image, force_share=True)
                                for image in IMAGES})  # fmt: skip
            else:
                records.append(client.cmd(name, value))
            records.append(dirty_bitmaps(client))
        for name in ("b0", "dis", "new", "off", "t1", "temp"):
            records.append(client.cmd("x-debug-block-dirty-bitmap-sha256",
                                      {"node": "rw", "name": name}))  # fmt: skip
        records.append(client.cmd("quit"))
        records.append({"eof": client.at_eof(10), "exit": daemon.wait_exit(10)})
        records.append({"stderr": Normaliser(d).output(daemon.stderr)})
        for image in IMAGES:
            check = qemu_img_json(d, "check", "--output=json", str(d / image))
            # Where clusters land is ours to choose; their number and the errors are not.
            check["out"].pop("fragmented-clusters", None)
            read = reference_read(d / f"read-{image}", d / image)
            records.append(
                {
                    "image": image,
                    "bitmaps": stored_bitmaps(d, image),
                    "check": check,
                    "read-by-qsd": read,
                }
            )
        out[side] = normalise_transcript(records, d)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))


# -- Differences found while writing these tests, now fixed ------------------------------------


def test_resize_names_first_inconsistent(compat: Compat) -> None:
    """block_resize of "bad" (b0 and big in-use): qsd refuses with
    "Bitmap 'b0' is inconsistent and cannot be used"."""
    check_transcript(compat, [Cmd("block_resize", {"node-name": "bad", "size": SIZE * 2})])


def test_new_bitmaps_stored_newest_first(compat: Compat) -> None:
    """Persistent bitmaps a, b, c added (in that order) to rw.qcow2 are appended to the
    directory as c, b, a by qsd; the directory is compared as qemu-img lists it."""
    pair = compat.daemons(ARGS, make_images)
    stored: dict[str, Any] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        for name in ("a", "b", "c"):
            reply = client.cmd(
                "block-dirty-bitmap-add", {"node": "rw", "name": name, "persistent": True}
            )
            assert reply == {"return": {}}, reply
        client.cmd("quit")
        assert daemon.wait_exit(10) == 0
        stored[side] = stored_bitmaps(daemon.workdir, "rw.qcow2")
    assert stored["ours"] == stored["reference"]


def test_remove_of_stored_bitmap_keeps_allocation(compat: Compat) -> None:
    """`actual-size` of bad.qcow2 (qcow2 and file node) after removing a consistent and an
    inconsistent stored bitmap: 770048 on qsd throughout (the freed bitmap clusters are
    discarded whatever pass-discard-other says, which pays for the new directory's)."""
    pair = compat.daemons(ARGS, make_images)
    sizes: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        seen = []
        for name in ("g512", "b0"):
            assert client.cmd("block-dirty-bitmap-remove", {"node": "bad", "name": name}) == {
                "return": {}
            }
            nodes = client.cmd("query-named-block-nodes", {"flat": True})["return"]
            seen.append({n["node-name"]: n["image"]["actual-size"] for n in nodes
                         if n["node-name"] in ("bad", "badf")})  # fmt: skip
        sizes[side] = seen
    assert sizes["ours"] == sizes["reference"]


# -- Broken bitmap directories and tables: the open error, qsd's text ----------------------------

# what -> (where, offset, struct format, new value from (count, directory size)): `where` is
# "ext" (the header extension's data), "dir" (the first directory entry) or "table" (the first
# entry's bitmap table).
Breakage = tuple[str, int, str, Callable[[int, int], int]]
BREAKAGES: dict[str, Breakage] = {
    "directory past the end": ("ext", 16, ">Q", lambda n, size: 1 << 40),
    "directory 8 bytes longer": ("ext", 8, ">Q", lambda n, size: size + 8),
    "directory 8 bytes shorter": ("ext", 8, ">Q", lambda n, size: size - 8),
    "one bitmap more announced": ("ext", 0, ">I", lambda n, size: n + 1),
    "granularity 256": ("dir", 17, ">B", lambda n, size: 8),
    "granularity 2^40": ("dir", 17, ">B", lambda n, size: 40),
    "type 2": ("dir", 16, ">B", lambda n, size: 2),
    "reserved flag": ("dir", 12, ">I", lambda n, size: 0x10),
    "table unaligned": ("dir", 0, ">Q", lambda n, size: 0x10200),
    "table size wrong": ("dir", 8, ">I", lambda n, size: 5),
    "extra data": ("dir", 20, ">I", lambda n, size: 8),
    "table entry reserved bit": ("table", 0, ">Q", lambda n, size: 0x2),
}


def broken(what: str) -> Callable[[Path], None]:
    """A setup making $D/broken.qcow2 with one field of its bitmaps broken."""
    place, offset, code, value = BREAKAGES[what]

    def setup(d: Path) -> None:
        image = d / "broken.qcow2"
        bitmapped(d, "broken.qcow2")
        ext, count, dir_size, dir_offset = find_directory(image)
        with open(image, "r+b") as f:
            base = {"ext": ext, "dir": dir_offset}.get(place)
            if base is None:
                f.seek(dir_offset)
                (base,) = struct.unpack(">Q", f.read(8))
            f.seek(base + offset)
            f.write(struct.pack(code, value(count, dir_size)))

    return setup


@pytest.mark.parametrize("what", list(BREAKAGES))
def test_broken_bitmaps_refuse_the_open_as_qsd(compat: Compat, what: str) -> None:
    node = "driver=qcow2,node-name=d,file.driver=file,file.filename=$D/broken.qcow2,read-only=on"
    compat.check_cli(cli("--blockdev", node, setup=broken(what)))


def over_blkdebug(node: str, image: str, rule: dict[str, Any]) -> Cmd:
    """blockdev-add of a qcow2 node on `image` through a blkdebug node failing writes with
    ENOSPC as `rule` arms it."""
    debug = {"driver": "blkdebug", "node-name": f"{node}-dbg", "inject-error": [
        {"errno": 28, **rule}], "image": {"driver": "file", "filename": image}}  # fmt: skip
    return Cmd("blockdev-add", {"driver": "qcow2", "node-name": node, "file": debug})


def test_failed_in_use_mark_refuses_the_open(compat: Compat) -> None:
    """A read-write open first flags the stored bitmaps in use; when that write fails, qsd
    refuses the open with "Can't update bitmap directory: No space left on device". (qsd
    leaves the image's bitmaps inconsistent then; ours leaves it as it was.)"""
    compat.check_transcript(
        [over_blkdebug("q", "$D/rw.qcow2", {"event": "pwritev", "immediately": True})],
        setup=make_images,
    )


@pytest.mark.parametrize("closed_by", ["blockdev-del", "quit"])
def test_failed_store_at_close_is_reported(compat: Compat, closed_by: str) -> None:
    """Bitmaps that cannot be stored as the node closes (the first cluster allocation arms
    ENOSPC for every write after it) are lost with qsd's report: "Lost persistent bitmaps
    during inactivation of node 'q': Failed to allocate clusters for bitmap 'b0': No space
    left on device", without the program name in front while a command (blockdev-del)
    runs, with it at exit (quit)."""
    lines = {}
    for side, daemon in compat.daemons([], make_images).items():
        steps = [
            over_blkdebug("q", str(daemon.workdir / "rw.qcow2"), {"event": "cluster_alloc"}),
            Cmd("block-dirty-bitmap-add", {"node": "q", "name": "new", "persistent": True}),
        ]
        if closed_by == "blockdev-del":
            steps.append(Cmd("blockdev-del", {"node-name": "q"}))
        client = compat.connect(daemon)
        client.negotiate()
        for step in steps:
            assert client.cmd(step.name, step.args) == {"return": {}}, side
        client.cmd("quit")
        assert daemon.wait_exit(10) == 0
        lines[side] = [
            Normaliser(daemon.workdir).text(line)
            for line in daemon.stderr.splitlines()
            if "Lost persistent bitmaps" in line
        ]
    prefix = "" if closed_by == "blockdev-del" else "PROG: "
    expected = (
        f"{prefix}Lost persistent bitmaps during inactivation of node 'q': Failed to allocate "
        f"clusters for bitmap '{NAMES[0]}': No space left on device"
    )
    assert lines == {"ours": [expected], "reference": [expected]}
