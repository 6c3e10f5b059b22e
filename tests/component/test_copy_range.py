"""copy_range on real graphs: file and raw nodes from blockdev-add over real files, copied by
the kernel; the fallback cases (other drivers, O_DIRECT, detect-zeroes, a source range past
EOF, files on two filesystems) copy nothing and say so; the checks and accounting of the
generic I/O path hold; short kernel copies and a source that ends early are finished.

Component ring: an in-process daemon, real files in the scratch dir and in /dev/shm.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import copy_range as cr
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers import preload
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from tests.unit.test_io_layer import Parent

preload()  # as the daemon does before it is ready: no driver import on the event loop

MIB = 1 << 20
RW = Perm.CONSISTENT_READ | Perm.WRITE


def pattern(size: int, seed: int = 1) -> bytes:
    block = bytes((i * 7 + seed) & 0xFF for i in range(4096))
    return (block * (size // 4096 + 1))[:size]


def make_file(path: Path, size: int, data: bytes = b"") -> Path:
    with path.open("wb") as f:
        f.write(data)
        f.truncate(size)
    return path


@pytest.fixture
async def daemon() -> Any:
    d = Daemon()
    try:
        yield d
    finally:
        await d.shutdown()


async def add(daemon: Daemon, spec: dict[str, Any]) -> BlockNode:
    await daemon.run_command("blockdev-add", spec)
    return daemon.graph.lookup(spec["node-name"])


async def raw_on_file(daemon: Daemon, name: str, path: Path, **raw: Any) -> BlockNode:
    await add(daemon, {"driver": "file", "node-name": f"{name}-file", "filename": str(path)})
    return await add(daemon, {"driver": "raw", "node-name": name, "file": f"{name}-file", **raw})


def attach(daemon: Daemon, node: BlockNode, perm: Perm = RW) -> BdrvChild:
    return daemon.graph.attach(Parent(), node, "root", ChildRole.PRIMARY, perm, PERM_ALL)


async def test_raw_to_raw_is_copied_by_the_kernel_and_accounted(
    daemon: Daemon, scratch: Path
) -> None:
    data = pattern(3 * MIB)
    src = await raw_on_file(daemon, "src", make_file(scratch / "src.img", 4 * MIB, data))
    dst = await raw_on_file(daemon, "dst", make_file(scratch / "dst.img", 4 * MIB))
    s, d = attach(daemon, src), attach(daemon, dst)
    assert await cr.copy_range(s, 512 * 1024, d, MIB, 2 * MIB)
    on_disk = (scratch / "dst.img").read_bytes()
    assert on_disk[MIB : 3 * MIB] == data[512 * 1024 : 512 * 1024 + 2 * MIB]
    assert on_disk[:MIB] == bytes(MIB) and on_disk[3 * MIB :] == bytes(MIB)
    for name in ("src", "src-file"):
        stats = daemon.graph.lookup(name).stats
        assert (stats.rd_operations, stats.rd_bytes) == (1, 2 * MIB)
        assert stats.wr_operations == 0
    for name in ("dst", "dst-file"):
        stats = daemon.graph.lookup(name).stats
        assert (stats.wr_operations, stats.wr_bytes) == (1, 2 * MIB)
        assert stats.wr_highest_offset == 3 * MIB
        assert stats.rd_operations == 0
    # The written node counts as changed: the next flush reaches the driver.
    assert daemon.graph.lookup("dst-file").io_state.write_gen > 0


async def test_a_kernel_copy_marks_bitmaps_and_fires_the_write_threshold(
    daemon: Daemon, scratch: Path
) -> None:
    """The copy bypasses io.pwrite but not what it does around a write: the destination's
    dirty bitmaps (at each node's own offsets) and its write threshold."""
    events: list[tuple[str, Any]] = []
    daemon.events.subscribe(lambda name, data, ts: events.append((name, data)))
    src = await raw_on_file(daemon, "src", make_file(scratch / "src.img", 4 * MIB, pattern(MIB)))
    dst = await raw_on_file(daemon, "dst", make_file(scratch / "dst.img", 4 * MIB), offset=MIB)
    for node in ("dst", "dst-file"):
        await daemon.run_command("block-dirty-bitmap-add", {"node": node, "name": "b"})
    await daemon.run_command(
        "block-set-write-threshold", {"node-name": "dst-file", "write-threshold": 2 * MIB}
    )
    assert await cr.copy_range(attach(daemon, src), 0, attach(daemon, dst), 512 * 1024, MIB)
    infos = await daemon.run_command("query-named-block-nodes", {"flat": True})
    counts = {
        i["node-name"]: i["dirty-bitmaps"][0]["count"] for i in infos if i.get("dirty-bitmaps")
    }
    assert counts == {"dst": MIB, "dst-file": MIB}
    threshold = [data for name, data in events if name == "BLOCK_WRITE_THRESHOLD"]
    assert threshold == [
        {"node-name": "dst-file", "amount-exceeded": MIB // 2, "write-threshold": 2 * MIB}
    ]


async def test_raw_offsets_are_added(daemon: Daemon, scratch: Path) -> None:
    data = pattern(2 * MIB, seed=3)
    src = await raw_on_file(
        daemon, "src", make_file(scratch / "s.img", 2 * MIB, data), offset=MIB, size=MIB
    )
    dst = await raw_on_file(daemon, "dst", make_file(scratch / "d.img", 2 * MIB), offset=65536)
    assert await cr.copy_range(attach(daemon, src), 4096, attach(daemon, dst), 8192, 65536)
    on_disk = (scratch / "d.img").read_bytes()
    assert on_disk[65536 + 8192 : 65536 + 8192 + 65536] == data[MIB + 4096 : MIB + 4096 + 65536]
    assert on_disk.count(0) == len(on_disk) - 65536 + data[MIB + 4096 : MIB + 69632].count(0)
    assert daemon.graph.lookup("dst-file").stats.wr_highest_offset == 65536 + 8192 + 65536


async def test_file_nodes_directly(daemon: Daemon, scratch: Path) -> None:
    data = pattern(MIB, seed=5)
    src = await add(
        daemon,
        {"driver": "file", "node-name": "s", "filename": str(make_file(scratch / "s", MIB, data))},
    )
    dst = await add(
        daemon,
        {"driver": "file", "node-name": "d", "filename": str(make_file(scratch / "d", MIB))},
    )
    assert await cr.copy_range(attach(daemon, src), 0, attach(daemon, dst), 0, MIB)
    assert (scratch / "d").read_bytes() == data


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = Path(tempfile.mkdtemp(prefix="copy-range-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_two_filesystems_fall_back(daemon: Daemon, scratch: Path, shm_dir: Path) -> None:
    """ext4/xfs and tmpfs: the kernel answers EXDEV; nothing copied, nothing accounted."""
    src = await raw_on_file(daemon, "src", make_file(scratch / "s", MIB, pattern(MIB)))
    dst = await raw_on_file(daemon, "dst", make_file(shm_dir / "d", MIB))
    if os.stat(scratch).st_dev == os.stat(shm_dir).st_dev:
        pytest.skip("scratch is on tmpfs too")
    s, d = attach(daemon, src), attach(daemon, dst)
    assert not await cr.copy_range(s, 0, d, 0, MIB)
    # Remembered for the pair: the next request is refused without asking the kernel.
    src_file, dst_file = daemon.graph.lookup("src-file"), daemon.graph.lookup("dst-file")
    assert dst_file in cr._refused[src_file]
    assert not await cr.copy_range(s, 0, d, 0, MIB)
    assert (shm_dir / "d").read_bytes() == bytes(MIB)
    for name in ("src", "src-file", "dst", "dst-file"):
        stats = daemon.graph.lookup(name).stats
        assert stats.rd_operations == stats.wr_operations == stats.failed_wr_operations == 0


async def test_tmpfs_to_tmpfs(daemon: Daemon, shm_dir: Path) -> None:
    data = pattern(MIB, seed=9)
    src = await raw_on_file(daemon, "src", make_file(shm_dir / "s", MIB, data))
    dst = await raw_on_file(daemon, "dst", make_file(shm_dir / "d", MIB))
    assert await cr.copy_range(attach(daemon, src), 0, attach(daemon, dst), 0, MIB)
    assert (shm_dir / "d").read_bytes() == data


@pytest.fixture
def qcow2_image(scratch: Path) -> Path:
    path = scratch / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    return path  # made outside the event loop


@pytest.mark.parametrize(
    "case", ["null-source", "qcow2-target", "detect-zeroes", "direct", "past-eof", "child-zeroes"]
)
async def test_not_applicable_copies_nothing(
    daemon: Daemon, scratch: Path, qcow2_image: Path, case: str
) -> None:
    src_path = make_file(scratch / "s", MIB, pattern(MIB))
    dst_path = make_file(scratch / "d", MIB)
    if case == "null-source":
        src = await add(daemon, {"driver": "null-co", "node-name": "src", "size": MIB})
    else:
        src = await raw_on_file(daemon, "src", src_path)
    if case == "qcow2-target":
        dst = await add(
            daemon,
            {"driver": "qcow2", "node-name": "dst",
             "file": {"driver": "file", "filename": str(qcow2_image)}},
        )  # fmt: skip
    elif case == "detect-zeroes":
        dst = await raw_on_file(daemon, "dst", dst_path, **{"detect-zeroes": "on"})
    elif case == "child-zeroes":
        await add(
            daemon,
            {"driver": "file", "node-name": "dst-file", "filename": str(dst_path),
             "detect-zeroes": "on"},
        )  # fmt: skip
        dst = await add(daemon, {"driver": "raw", "node-name": "dst", "file": "dst-file"})
    elif case == "direct":
        await add(
            daemon,
            {"driver": "file", "node-name": "dst-file", "filename": str(dst_path),
             "cache": {"direct": True}},
        )  # fmt: skip
        dst = await add(daemon, {"driver": "raw", "node-name": "dst", "file": "dst-file"})
    else:
        dst = await raw_on_file(daemon, "dst", dst_path)
    offset = MIB - 4096 if case == "past-eof" else 0
    assert not await cr.copy_range(attach(daemon, src), offset, attach(daemon, dst), 0, 8192)
    assert dst_path.read_bytes() == bytes(MIB)
    assert dst.stats.wr_operations == dst.stats.invalid_wr_operations == 0


async def test_write_checks_of_the_io_path(daemon: Daemon, scratch: Path) -> None:
    src = await raw_on_file(daemon, "src", make_file(scratch / "s", MIB, pattern(MIB)))
    dst = await raw_on_file(daemon, "dst", make_file(scratch / "d", MIB))
    s = attach(daemon, src)
    reader = attach(daemon, dst, Perm.CONSISTENT_READ)
    with pytest.raises(OSError) as info:
        await cr.copy_range(s, 0, reader, 0, 4096)
    assert info.value.errno == errno.EPERM
    writer = attach(daemon, dst)
    with pytest.raises(OSError) as info:
        await cr.copy_range(s, 0, writer, MIB - 4096, 8192)  # past the target's end
    assert info.value.errno == errno.EIO
    assert dst.stats.invalid_wr_operations == 1
    assert (scratch / "d").read_bytes() == bytes(MIB)


async def test_read_only_target_is_eperm(daemon: Daemon, scratch: Path) -> None:
    src = await raw_on_file(daemon, "src", make_file(scratch / "s", MIB, pattern(MIB)))
    dst = await raw_on_file(daemon, "dst", make_file(scratch / "d", MIB), **{"read-only": True})
    edge = BdrvChild(Parent(), dst, "root", ChildRole.PRIMARY, RW, PERM_ALL)  # not attached
    with pytest.raises(OSError) as info:
        await cr.copy_range(attach(daemon, src), 0, edge, 0, 4096)
    assert info.value.errno == errno.EPERM


async def test_a_parent_node_with_resize_may_grow_the_file(daemon: Daemon, scratch: Path) -> None:
    data = pattern(MIB, seed=11)
    src = await raw_on_file(daemon, "src", make_file(scratch / "s", MIB, data))
    dst = await raw_on_file(daemon, "dst", make_file(scratch / "d", 65536))
    file_node = daemon.graph.lookup("dst-file")
    # A format node growing its file holds RESIZE on its file edge (never attached here).
    edge = BdrvChild(dst, file_node, "grow", ChildRole.DATA, RW | Perm.RESIZE, PERM_ALL)
    assert await cr.copy_range(attach(daemon, src), 0, edge, MIB, MIB)
    assert file_node.driver.getlength() == 2 * MIB
    assert (scratch / "d").read_bytes()[MIB:] == data


def test_short_kernel_copies_are_continued(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_file_range may copy less than asked: the loop goes on until all is copied."""
    data = pattern(MIB, seed=13)
    make_file(scratch / "s", MIB, data)
    make_file(scratch / "d", MIB)
    real = os.copy_file_range
    calls: list[int] = []

    def short(src: int, dst: int, count: int, src_off: int, dst_off: int) -> int:
        calls.append(count)
        return real(src, dst, min(count, 100_000), src_off, dst_off)

    monkeypatch.setattr(os, "copy_file_range", short)
    src_fd = os.open(scratch / "s", os.O_RDONLY)
    dst_fd = os.open(scratch / "d", os.O_RDWR)
    try:
        assert cr._kernel_copy(src_fd, dst_fd, 0, 0, MIB) is True
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert len(calls) == -(-MIB // 100_000)
    assert (scratch / "d").read_bytes() == data


def test_source_ending_early_leaves_zeroes(scratch: Path) -> None:
    """A source shorter than the range (shrunk by someone else): the rest reads as zeroes."""
    data = pattern(65536, seed=17)
    make_file(scratch / "s", 65536, data)
    make_file(scratch / "d", MIB, b"\xff" * MIB)
    src_fd = os.open(scratch / "s", os.O_RDONLY)
    dst_fd = os.open(scratch / "d", os.O_RDWR)
    try:
        assert cr._kernel_copy(src_fd, dst_fd, 0, 0, 3 * 65536)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    on_disk = (scratch / "d").read_bytes()
    assert on_disk[:65536] == data
    assert on_disk[65536 : 3 * 65536] == bytes(2 * 65536)
    assert on_disk[3 * 65536 :] == b"\xff" * (MIB - 3 * 65536)


def test_refusal_after_a_partial_copy_is_finished_by_hand(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(MIB, seed=19)
    make_file(scratch / "s", MIB, data)
    make_file(scratch / "d", MIB)
    real = os.copy_file_range
    calls = [0]

    def refuse_later(src: int, dst: int, count: int, src_off: int, dst_off: int) -> int:
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real(src, dst, 65536, src_off, dst_off)

    monkeypatch.setattr(os, "copy_file_range", refuse_later)
    src_fd = os.open(scratch / "s", os.O_RDONLY)
    dst_fd = os.open(scratch / "d", os.O_RDWR)
    try:
        assert cr._kernel_copy(src_fd, dst_fd, 0, 0, MIB) is True
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert (scratch / "d").read_bytes() == data


def test_real_errors_are_raised(scratch: Path) -> None:
    make_file(scratch / "s", MIB, pattern(MIB))
    make_file(scratch / "d", MIB)
    src_fd = os.open(scratch / "s", os.O_RDONLY)
    dst_fd = os.open(scratch / "d", os.O_RDONLY)  # not writable: EBADF
    try:
        with pytest.raises(OSError) as info:
            cr._kernel_copy(src_fd, dst_fd, 0, 0, 4096)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert info.value.errno == errno.EBADF


async def test_kernel_errors_are_accounted_as_failed_writes(daemon: Daemon, scratch: Path) -> None:
    """An auto-read-only file node nobody took WRITE on has a read-only fd: the kernel's
    EBADF is a real error, raised and counted as a failed write."""
    src = await raw_on_file(daemon, "src", make_file(scratch / "s", MIB, pattern(MIB)))
    dst = await add(
        daemon,
        {"driver": "file", "node-name": "d", "filename": str(make_file(scratch / "d", MIB)),
         "auto-read-only": True},
    )  # fmt: skip
    edge = BdrvChild(Parent(), dst, "root", ChildRole.PRIMARY, RW, PERM_ALL)  # not attached
    with pytest.raises(OSError) as info:
        await cr.copy_range(attach(daemon, src), 0, edge, 0, 4096)
    assert info.value.errno == errno.EBADF
    assert dst.stats.failed_wr_operations == 1 and dst.stats.wr_operations == 0
