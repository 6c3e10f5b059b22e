"""Persistent dirty bitmaps of qcow2 images across runs of our daemon, checked with real tools.

Integration ring: our daemon runs as a subprocess, qemu-io writes through its NBD export, and
the image is judged afterwards by qemu-img (info, check) and by the reference qsd, which
exports the bitmaps read-only (`bitmaps=`) for `nbdinfo --map=qemu:dirty-bitmap:NAME`.
Invariant: every process is stopped by its PID; expected bitmaps are computed here from the
byte ranges written, at the bitmap's granularity, never read back from our own daemon.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon import (
    DaemonProcess,
    RawQmp,
    ours_command,
    reference_command,
    running_daemon,
)

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-img", "qemu-io", "nbdinfo"))
    or not Path(reference_command()[0]).exists(),
    reason="qemu-img, qemu-io, nbdinfo or qemu-storage-daemon missing",
)

Runs = list[tuple[int, int]]

# --- tools ---------------------------------------------------------------------------------


def qemu_img(*args: str | int | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)


def create(image: Path, size: int, *, cluster: int = 65536) -> None:
    out = qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", image, size)
    assert out.returncode == 0, out.stderr


def add_bitmap(image: Path, name: str, granularity: int = 65536, *, disabled: bool = False) -> None:
    extra = ["--disable"] if disabled else []
    out = qemu_img("bitmap", "--add", "-g", str(granularity), *extra, image, name)
    assert out.returncode == 0, out.stderr


def stored(image: Path, *, force_share: bool = False) -> dict[str, dict[str, Any]]:
    """The bitmap directory as qemu-img reads it: name -> {flags, granularity}, in order."""
    args = ["info", "--output=json", *(["-U"] if force_share else []), str(image)]
    out = qemu_img(*args)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)["format-specific"]["data"]
    return {b["name"]: b for b in data.get("bitmaps", [])}


def flags(image: Path, *, force_share: bool = False) -> dict[str, set[str]]:
    return {n: set(b["flags"]) for n, b in stored(image, force_share=force_share).items()}


def check(image: Path) -> tuple[int, str]:
    out = qemu_img("check", image)
    return out.returncode, out.stdout + out.stderr


def assert_clean(image: Path) -> None:
    rc, text = check(image)
    assert rc == 0, text


def qemu_io(image_uri: str, *commands: str, fmt: str = "raw") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    out = subprocess.run([*args, image_uri], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "failed" not in out.stdout + out.stderr, out


def nbd_uri(sock: Path) -> str:
    return f"nbd+unix:///disk0?socket={sock}"


# --- expectations --------------------------------------------------------------------------


def merge(runs: Iterable[tuple[int, int]]) -> Runs:
    out: Runs = []
    for off, length in sorted(runs):
        if length <= 0:
            continue
        if out and off <= out[-1][0] + out[-1][1]:
            start, old = out[-1]
            out[-1] = (start, max(old, off + length - start))
        else:
            out.append((off, length))
    return out


def expected(size: int, granularity: int, written: Iterable[tuple[int, int]]) -> Runs:
    """The dirty byte ranges a bitmap shows after writes of `written`: whole granules,
    the last one clipped to the image size."""
    runs = []
    for off, length in written:
        first = off // granularity * granularity
        end = min(size, -(-(off + length) // granularity) * granularity)
        runs.append((first, end - first))
    return merge(runs)


# --- daemons -------------------------------------------------------------------------------


def blockdev(image: Path, *, read_only: bool = False) -> list[str]:
    ro = ",read-only=on" if read_only else ""
    return [
        "--blockdev", f"driver=file,node-name=file0,filename={image}{ro}",
        "--blockdev", f"driver=qcow2,node-name=disk0,file=file0{ro}",
    ]  # fmt: skip


def export_args(sock: Path, *, writable: bool = True, bitmaps: Sequence[str] = ()) -> list[str]:
    spec = f"type=nbd,id=exp0,node-name=disk0,name=disk0,writable={'on' if writable else 'off'}"
    spec += "".join(f",bitmaps.{i}={name}" for i, name in enumerate(bitmaps))
    return ["--nbd-server", f"addr.type=unix,addr.path={sock}", "--export", spec]


@contextmanager
def ours(workdir: Path, image: Path, *, export: bool = True) -> Iterator[DaemonProcess]:
    """Our daemon with the image read-write (exported as disk0 on workdir/nbd.sock)."""
    args = blockdev(image) + (export_args(workdir / "nbd.sock") if export else [])
    with running_daemon(ours_command(), args, workdir, ready_timeout=20) as daemon:
        yield daemon


def stop_gracefully(daemon: DaemonProcess) -> None:
    status = daemon.stop(timeout=30)
    assert status == 0, daemon.stderr
    assert "Lost persistent bitmaps" not in daemon.stderr, daemon.stderr


def qmp(daemon: DaemonProcess) -> RawQmp:
    """A negotiated QMP client (use it in a `with`, so it is closed on failure)."""
    client = daemon.connect_qmp(timeout=20)
    try:
        assert client.negotiate() == {"return": {}}
    except BaseException:
        client.close()
        raise
    return client


def ok(client: RawQmp, name: str, args: dict[str, Any] | None = None) -> Any:
    reply = client.cmd(name, args)
    assert "return" in reply, (name, args, reply)
    return reply["return"]


def node_bitmaps(client: RawQmp) -> dict[str, dict[str, Any]]:
    nodes = ok(client, "query-named-block-nodes", {"flat": True})
    (disk,) = [n for n in nodes if n["node-name"] == "disk0"]
    return {b["name"]: b for b in disk.get("dirty-bitmaps", [])}


def dirty_maps(workdir: Path, image: Path, names: Sequence[str]) -> dict[str, Runs]:
    """Each bitmap's dirty ranges as the reference qsd exports them (image opened read-only,
    sharing, so it may run beside a read-only user)."""
    workdir.mkdir()
    sock = workdir / "nbd.sock"
    args = blockdev(image, read_only=True) + export_args(sock, writable=False, bitmaps=names)
    maps: dict[str, Runs] = {}
    with running_daemon(reference_command(), args, workdir, monitor="none") as qsd:
        for name in names:
            out = subprocess.run(
                ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", nbd_uri(sock)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, (out.stderr, qsd.stderr)
            extents = json.loads(out.stdout)
            maps[name] = merge((e["offset"], e["length"]) for e in extents if e["type"] & 1)
    return maps


def opens_in_qsd(workdir: Path, image: Path) -> dict[str, dict[str, Any]]:
    """The reference qsd opens the image read-write and lists its bitmaps (then quits)."""
    workdir.mkdir()
    with (
        running_daemon(reference_command(), blockdev(image), workdir) as qsd,
        qmp(qsd) as client,
    ):
        return node_bitmaps(client)


# --- a. incremental-backup safety ----------------------------------------------------------

SIZE_A = (16 << 20) + 3 * 512  # not a multiple of any granularity used: a short last granule


def test_bitmaps_record_writes_through_a_graceful_stop(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    create(image, SIZE_A)
    add_bitmap(image, "b0")  # 64 KiB
    add_bitmap(image, "b4k", 4096)
    add_bitmap(image, "b1m", 1 << 20)
    before = [(3 << 20, 1024), (14 << 20, 1 << 20), (SIZE_A - 512, 512)]
    qemu_io(str(image), *(f"write {o} {n}" for o, n in before), fmt="qcow2")
    grans = {"b0": 65536, "b4k": 4096, "b1m": 1 << 20}
    assert dirty_maps(tmp_path / "pre", image, list(grans)) == {
        n: expected(SIZE_A, g, before) for n, g in grans.items()
    }

    writes = [
        (0, 4096),
        (65536 - 512, 1024),  # across a 64 KiB granule boundary
        (5 << 20, 200 << 10),
        (9 << 20, 65536),  # exactly one granule
        (SIZE_A - 2048, 1024),
    ]
    # The discard covers clusters written before (on a hole qsd records nothing).
    zeroes, discard = (12 << 20, 8192), ((14 << 20) + 65536, 131072)
    with ours(tmp_path / "ours", image) as daemon:
        assert flags(image, force_share=True) == {
            "b0": {"in-use", "auto"},
            "b4k": {"in-use", "auto"},
            "b1m": {"in-use", "auto"},
        }
        qemu_io(
            nbd_uri(daemon.workdir / "nbd.sock"),
            *(f"write -P 0x5a {o} {n}" for o, n in writes),
            f"write -z {zeroes[0]} {zeroes[1]}",
            f"discard {discard[0]} {discard[1]}",
        )
        stop_gracefully(daemon)

    assert flags(image) == {"b0": {"auto"}, "b4k": {"auto"}, "b1m": {"auto"}}
    assert {n: b["granularity"] for n, b in stored(image).items()} == grans
    assert_clean(image)
    done = [*before, *writes, zeroes, discard]
    assert dirty_maps(tmp_path / "post", image, list(grans)) == {
        n: expected(SIZE_A, g, done) for n, g in grans.items()
    }


# --- b. kill -9 leaves them in use -----------------------------------------------------------


def test_kill9_leaves_bitmaps_in_use_and_they_can_be_removed(tmp_path: Path) -> None:
    image = tmp_path / "b.qcow2"
    create(image, 4 << 20)
    add_bitmap(image, "b0")
    add_bitmap(image, "b1", disabled=True)
    add_bitmap(image, "b2", 8192)
    with ours(tmp_path / "run1", image) as daemon:
        qemu_io(nbd_uri(daemon.workdir / "nbd.sock"), "write 0 64k", "flush")
        os.kill(daemon.pid, signal.SIGKILL)
        assert daemon.wait_exit(10) == -signal.SIGKILL

    assert flags(image) == {"b0": {"in-use", "auto"}, "b1": {"in-use"}, "b2": {"in-use", "auto"}}
    rc, text = check(image)
    assert rc in (0, 3), text  # leaks allowed, corruption not

    with ours(tmp_path / "run2", image, export=False) as daemon:
        with qmp(daemon) as client:
            found = node_bitmaps(client)
            assert list(found) == ["b2", "b1", "b0"]  # newest first, as qsd lists them
            for info in found.values():
                assert info["inconsistent"] is True, info
                assert info["persistent"] is True and info["recording"] is False, info
                assert info["count"] == 0, info
            reply = client.cmd("block-dirty-bitmap-clear", {"node": "disk0", "name": "b1"})
            assert reply["error"]["desc"] == "Bitmap 'b1' is inconsistent and cannot be used"
            ok(client, "block-dirty-bitmap-remove", {"node": "disk0", "name": "b0"})
            # Removed from the image at once, not only at close.
            assert flags(image, force_share=True) == {"b1": {"in-use"}, "b2": {"in-use", "auto"}}
            assert list(node_bitmaps(client)) == ["b2", "b1"]
        stop_gracefully(daemon)

    # The ones never loaded stay as they were: in use, still removable later.
    assert flags(image) == {"b1": {"in-use"}, "b2": {"in-use", "auto"}}
    assert_clean(image)
    assert set(opens_in_qsd(tmp_path / "qsd", image)) == {"b1", "b2"}


def test_dirty_lazy_refcounts_image_with_bitmaps_is_repaired(tmp_path: Path) -> None:
    """A crash with lazy refcounts leaves refcounts behind the tables *and* the bitmaps in use
    (qemu-io killing itself with sigraise, as QEMU's own tests do). A read-write open repairs
    the refcounts counting the bitmaps' clusters (none freed under them), as qsd does."""
    image = tmp_path / "lazy.qcow2"
    out = qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", image, 16 << 20)
    assert out.returncode == 0, out.stderr
    add_bitmap(image, "b0")
    add_bitmap(image, "b1", 4096)
    qemu_io(str(image), "write -P 1 0 1M", fmt="qcow2")
    crash = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 2 4M 4M", "-c", "sigraise 9", str(image)],
        capture_output=True,
        timeout=60,
    )
    assert crash.returncode == -signal.SIGKILL, crash
    rc, text = check(image)
    assert rc == 2, text  # refcounts behind the tables: errors, until repaired
    with ours(tmp_path / "run", image, export=False) as daemon:
        with qmp(daemon) as client:
            assert {n: b["inconsistent"] for n, b in node_bitmaps(client).items()} == {
                "b1": True,
                "b0": True,
            }
            ok(client, "block-dirty-bitmap-remove", {"node": "disk0", "name": "b1"})
            ok(client, "block-dirty-bitmap-add", {"node": "disk0", "name": "n", "persistent": True})
        stop_gracefully(daemon)
    assert_clean(image)
    assert flags(image) == {"b0": {"in-use", "auto"}, "n": {"auto"}}
    assert set(opens_in_qsd(tmp_path / "qsd", image)) == {"b0", "n"}


# --- c. reopen read-only stores, reopen read-write marks in use ------------------------------


def reopen(client: RawQmp, image: Path, read_only: bool) -> None:
    ok(
        client,
        "blockdev-reopen",
        {
            "options": [
                {"driver": "qcow2", "node-name": "disk0", "file": "file0", "read-only": read_only}
            ]
        },
    )


def test_reopen_read_only_stores_and_read_write_marks_in_use(tmp_path: Path) -> None:
    image = tmp_path / "c.qcow2"
    size = 8 << 20
    create(image, size)
    add_bitmap(image, "b0")
    add_bitmap(image, "b2", 4096, disabled=True)
    first, second = [(0, 4096), (3 << 20, 70 << 10)], [(6 << 20, 512), (size - 4096, 4096)]
    workdir = tmp_path / "ours"
    workdir.mkdir()
    sock = workdir / "nbd.sock"
    args = [*blockdev(image), "--nbd-server", f"addr.type=unix,addr.path={sock}"]
    export = {"type": "nbd", "id": "e0", "node-name": "disk0", "name": "disk0", "writable": True}
    with running_daemon(ours_command(), args, workdir, ready_timeout=20) as daemon:
        with qmp(daemon) as client:
            ok(client, "block-export-add", export)
            qemu_io(nbd_uri(sock), *(f"write {o} {n}" for o, n in first))
            ok(client, "block-export-del", {"id": "e0"})
            client.wait_event("BLOCK_EXPORT_DELETED")

            reopen(client, image, True)
            assert flags(image, force_share=True) == {"b0": {"auto"}, "b2": set()}
            # The reference opens it beside us (we hold it read-only now) and reads the bits.
            assert dirty_maps(tmp_path / "ro", image, ["b0", "b2"]) == {
                "b0": expected(size, 65536, first),
                "b2": [],
            }
            info = node_bitmaps(client)
            assert info["b0"]["count"] == 3 * 65536 and info["b0"]["recording"] is True

            reopen(client, image, False)
            assert flags(image, force_share=True) == {"b0": {"in-use", "auto"}, "b2": {"in-use"}}
            ok(client, "block-export-add", export)
            qemu_io(nbd_uri(sock), *(f"write {o} {n}" for o, n in second))
        stop_gracefully(daemon)

    assert flags(image) == {"b0": {"auto"}, "b2": set()}
    assert_clean(image)
    assert dirty_maps(tmp_path / "post", image, ["b0", "b2"]) == {
        "b0": expected(size, 65536, first + second),
        "b2": [],
    }


def test_read_only_open_then_reopen_read_write_marks_in_use(tmp_path: Path) -> None:
    """Opened read-only, the bitmaps stay untouched on disk (a reader may run beside us);
    turned read-write, they are flagged in use before any write, then stored at close."""
    image = tmp_path / "c2.qcow2"
    size = 4 << 20
    create(image, size)
    add_bitmap(image, "b0", 4096)
    pre = [(1 << 20, 512)]
    qemu_io(str(image), *(f"write {o} {n}" for o, n in pre), fmt="qcow2")
    workdir = tmp_path / "ours"
    workdir.mkdir()
    sock = workdir / "nbd.sock"
    args = [*blockdev(image, read_only=True), "--nbd-server", f"addr.type=unix,addr.path={sock}"]
    writes = [(0, 4096), (size - 512, 512)]
    with running_daemon(ours_command(), args, workdir, ready_timeout=20) as daemon:
        assert flags(image, force_share=True) == {"b0": {"auto"}}
        with qmp(daemon) as client:
            info = node_bitmaps(client)["b0"]
            assert info["count"] == 4096 and info.get("inconsistent", False) is False, info
            reply = client.cmd("block-dirty-bitmap-clear", {"node": "disk0", "name": "b0"})
            assert "error" in reply, reply  # read-only while the node is
            ok(
                client,
                "blockdev-reopen",
                {
                    "options": [
                        {"driver": "file", "node-name": "file0", "filename": str(image)},
                    ]
                },
            )
            reopen(client, image, False)
            assert flags(image, force_share=True) == {"b0": {"in-use", "auto"}}
            ok(
                client,
                "block-export-add",
                {
                    "type": "nbd",
                    "id": "e0",
                    "node-name": "disk0",
                    "name": "disk0",
                    "writable": True,
                },
            )
            qemu_io(nbd_uri(sock), *(f"write {o} {n}" for o, n in writes))
        stop_gracefully(daemon)

    assert flags(image) == {"b0": {"auto"}}
    assert_clean(image)
    assert dirty_maps(tmp_path / "post", image, ["b0"]) == {
        "b0": expected(size, 4096, pre + writes)
    }


# --- d. disabled bitmaps, many bitmaps, a big one --------------------------------------------


def test_disabled_bitmaps_stay_disabled_and_unchanged(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    size = 8 << 20
    create(image, size)
    add_bitmap(image, "dis")
    add_bitmap(image, "live", 4096)
    pre = [(1 << 20, 4096)]
    qemu_io(str(image), *(f"write {o} {n}" for o, n in pre), fmt="qcow2")
    assert qemu_img("bitmap", "--disable", image, "dis").returncode == 0
    early, late = [(2 << 20, 8192)], [(5 << 20, 65536), (0, 512)]
    with ours(tmp_path / "ours", image) as daemon:
        with qmp(daemon) as client:
            uri = nbd_uri(daemon.workdir / "nbd.sock")
            qemu_io(uri, *(f"write {o} {n}" for o, n in early))
            ok(client, "block-dirty-bitmap-disable", {"node": "disk0", "name": "live"})
            ok(
                client,
                "block-dirty-bitmap-add",
                {"node": "disk0", "name": "added", "persistent": True, "granularity": 16384},
            )
            qemu_io(uri, *(f"write {o} {n}" for o, n in late))
        stop_gracefully(daemon)

    # Directory order kept, the bitmap added at run time after the loaded ones.
    assert list(stored(image)) == ["dis", "live", "added"]
    assert flags(image) == {"dis": set(), "live": set(), "added": {"auto"}}
    assert stored(image)["added"]["granularity"] == 16384
    assert_clean(image)
    assert dirty_maps(tmp_path / "post", image, ["dis", "live", "added"]) == {
        "dis": expected(size, 65536, pre),
        "live": expected(size, 4096, pre + early),
        "added": expected(size, 16384, late),
    }


def test_twenty_bitmaps_round_trip(tmp_path: Path) -> None:
    image = tmp_path / "many.qcow2"
    size = 32 << 20
    create(image, size)
    rng = random.Random(20)
    names = [f"bm{i:02d}-" + "x" * rng.randrange(0, 30) for i in range(20)]
    grans = {n: 1 << (9 + i % 12) for i, n in enumerate(names)}
    disabled = {n for i, n in enumerate(names) if i % 5 == 4}
    for n in names:
        add_bitmap(image, n, grans[n], disabled=n in disabled)
    writes = [(rng.randrange(0, size - 70000) // 512 * 512, rng.randrange(1, 140) * 512)]
    writes += [(rng.randrange(0, size - 70000), rng.randrange(1, 70000)) for _ in range(15)]
    with ours(tmp_path / "ours", image) as daemon:
        qemu_io(nbd_uri(daemon.workdir / "nbd.sock"), *(f"write {o} {n}" for o, n in writes))
        stop_gracefully(daemon)

    assert list(stored(image)) == names
    assert flags(image) == {n: set() if n in disabled else {"auto"} for n in names}
    assert {n: b["granularity"] for n, b in stored(image).items()} == grans
    assert_clean(image)
    assert dirty_maps(tmp_path / "post", image, names) == {
        n: [] if n in disabled else expected(size, grans[n], writes) for n in names
    }


def test_megabyte_bitmap_over_many_clusters_round_trips(tmp_path: Path) -> None:
    """4 GiB + 3 sectors at 512-byte granularity: 8388611 granules, 1 MiB + 1 byte of bits in
    1025 data clusters of 1 KiB (most of them all-zero, so left unallocated) and a table of
    1025 entries over 9 clusters; run twice through our daemon (load, then store again)."""
    image = tmp_path / "big.qcow2"
    size = (4 << 30) + 1536
    create(image, size, cluster=1024)
    add_bitmap(image, "big", 512)
    add_bitmap(image, "small", 1 << 20)
    first = [(0, 512), (1 << 30, 3 << 20), ((3 << 30) + 4096, 100), (size - 512, 512)]
    second = [(2 << 30, 4096), ((1 << 30) + (3 << 20), 512)]
    for n, batch in enumerate((first, second)):
        with ours(tmp_path / f"run{n}", image) as daemon:
            qemu_io(nbd_uri(daemon.workdir / "nbd.sock"), *(f"write {o} {n}" for o, n in batch))
            stop_gracefully(daemon)
        assert flags(image) == {"big": {"auto"}, "small": {"auto"}}
        assert_clean(image)
    assert dirty_maps(tmp_path / "post", image, ["big", "small"]) == {
        "big": expected(size, 512, first + second),
        "small": expected(size, 1 << 20, first + second),
    }


# --- e. crash safety of the store ------------------------------------------------------------

CRASH_SIZE = 1 << 30
CRASH_ROUNDS = 5


def crash_image(image: Path) -> tuple[list[str], list[tuple[int, int]]]:
    """An image with 24 bitmaps of small granularity and writes spread over the whole disk,
    so that storing them writes about a thousand data clusters (~0.4 s in our daemon)."""
    create(image, CRASH_SIZE, cluster=4096)
    names = [f"c{i:02d}" for i in range(24)]
    for i, n in enumerate(names):
        add_bitmap(image, n, 512 << (i % 3))
    writes = [(off, 512) for off in range(0, CRASH_SIZE, 8 << 20)]
    return names, writes


def kill_during_close(workdir: Path, image: Path, writes: Runs, extra: float) -> None:
    """Our daemon: writes, SIGTERM, and SIGKILL `extra` seconds after the image file starts
    to grow (the store allocates its clusters at the end of the file)."""
    with ours(workdir, image) as daemon:
        qemu_io(nbd_uri(workdir / "nbd.sock"), *(f"write {o} {n}" for o, n in writes))
        size = image.stat().st_size
        os.kill(daemon.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while image.stat().st_size == size and daemon.returncode is None:
            assert time.monotonic() < deadline
            time.sleep(0.0002)  # observing the file, not waiting for a fixed time
        if daemon.wait_exit(extra) is None:
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait_exit(10)


def kill_during_remove(workdir: Path, image: Path, writes: Runs, name: str, delay: float) -> None:
    with ours(workdir, image) as daemon:
        qemu_io(nbd_uri(workdir / "nbd.sock"), *(f"write {o} {n}" for o, n in writes))
        with qmp(daemon) as client:
            args = {"node": "disk0", "name": name}
            client.send_json({"execute": "block-dirty-bitmap-remove", "arguments": args})
            assert daemon.wait_exit(delay) is None  # it only exits when killed
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait_exit(10)


def test_kill9_while_storing_or_removing_never_corrupts(tmp_path: Path) -> None:
    image = tmp_path / "template.qcow2"
    names, writes = crash_image(image)
    rng = random.Random(7)
    states = []
    for round_ in range(CRASH_ROUNDS + 2):
        work = tmp_path / f"r{round_}"
        img = tmp_path / f"r{round_}.qcow2"
        shutil.copyfile(image, img)
        remove = names[rng.randrange(len(names))] if round_ >= CRASH_ROUNDS else None
        if remove is None:
            # Spread over the store: from its first allocation to past its end.
            kill_during_close(work, img, writes, 0.5 * (round_ + rng.random()) / CRASH_ROUNDS)
        else:
            kill_during_remove(work, img, writes, remove, rng.uniform(0.0, 0.02))
        rc, text = check(img)
        assert rc in (0, 3), (round_, text)
        on_disk = flags(img)
        if remove is None:
            assert list(on_disk) == names, on_disk
        else:
            assert set(on_disk) in (set(names), set(names) - {remove}), on_disk
        consistent = [n for n in on_disk if "in-use" not in on_disk[n]]
        # Either the old directory (all in use) or the new one (all stored), never a mix.
        assert consistent in ([], list(on_disk)), on_disk
        states.append((rc, len(consistent)))
        in_qsd = opens_in_qsd(tmp_path / f"q{round_}", img)
        assert set(in_qsd) == set(on_disk)
        for n, info in in_qsd.items():
            assert info.get("inconsistent", False) == (n not in consistent), (n, info)
        if consistent:
            maps = dirty_maps(tmp_path / f"m{round_}", img, consistent[::7])
            for n, runs in maps.items():
                gran = 512 << (names.index(n) % 3)
                assert runs == expected(CRASH_SIZE, gran, writes), n
    print("crash rounds (qemu-img check rc, bitmaps stored):", states)
