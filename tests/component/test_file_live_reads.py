"""The file driver's data-extent cache and live reads (views of a tmpfs image's page cache).

Component ring: nodes made through blockdev-add, I/O through the generic path. Checked: the
cached extent saves the SEEK_HOLE probe yet every hole-making operation drops it; live views
are only given for known data extents on tmpfs, only through raw, never for holes (reading a
hole through a mapping would allocate it); a view outliving its node holds no lock bytes and
shares no open file description with the node's descriptor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.file import FileDriver, syscalls
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.qapi.runtime import command_args

# Build the schema visitor's tables and import the command modules now, not inside a test
# whose event loop would be reported as blocked.
command_args("blockdev-add", {"driver": "null-co", "node-name": "warm-up"})
Daemon()

RW = Perm.CONSISTENT_READ | Perm.WRITE
MiB = 1 << 20


class Parent:
    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


def lock_bytes(path: Path) -> list[int]:
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found: list[int] = []
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if fields[1] != "->" and fields[5] == dev:
                end = int(fields[7]) if fields[7] != "EOF" else int(fields[6])
                found.extend(range(int(fields[6]), end + 1))
    return sorted(found)


async def add(daemon: Daemon, **args: Any) -> BlockNode:
    await daemon.run_command("blockdev-add", args)
    return daemon.graph.lookup(args["node-name"])


def attach(daemon: Daemon, node: BlockNode, perm: Perm = RW) -> BdrvChild:
    return daemon.graph.attach(Parent(), node, "root", ChildRole.PRIMARY, perm, PERM_ALL)


def access_modes_of(path: Path) -> list[int]:
    """O_ACCMODE of every descriptor of this process open on `path`."""
    modes = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != str(path):
                continue
            with open(f"/proc/self/fdinfo/{name}") as info:
                flags = next(line for line in info if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        modes.append(int(flags.split()[1], 8) & os.O_ACCMODE)
    return modes


def image(path: Path, data: bytes, size: int) -> Path:
    """`data` at offset 0, a hole from there to `size`."""
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return path


def test_freed_buffers_stay_in_the_heap() -> None:
    # glibc here: the thresholds are set (and setting them again is a no-op).
    assert syscalls.keep_freed_buffers() is True
    assert syscalls.keep_freed_buffers() is True


async def test_data_extent_cache_spares_probes_and_forgets_on_holes(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[int] = []
    real = syscalls.find_allocation

    def counting(fd: int, offset: int, length: int) -> tuple[bool, int]:
        probes.append(offset)
        return real(fd, offset, length)

    monkeypatch.setattr(syscalls, "find_allocation", counting)
    img = image(scratch / "img", os.urandom(2 * MiB), 4 * MiB)
    daemon = Daemon()
    node = await add(
        daemon, driver="file", **{"node-name": "f", "filename": str(img), "discard": "unmap"}
    )
    edge = attach(daemon, node)
    drv = node.driver
    assert isinstance(drv, FileDriver)

    def extent(status: Any) -> tuple[int, bool]:
        return status.length, status.data

    assert extent(await io.block_status(edge, 0, 4 * MiB)) == (2 * MiB, True)
    assert extent(await io.block_status(edge, MiB, 4 * MiB)) == (MiB, True)  # from the cache
    assert extent(await io.block_status(edge, 4096, 8192)) == (8192, True)
    assert probes == [0]
    assert extent(await io.block_status(edge, 3 * MiB, MiB)) == (MiB, False)  # holes: probed
    assert probes == [0, 3 * MiB]

    await io.pdiscard(edge, 0, MiB)  # punches a hole: the cached extent must go
    assert extent(await io.block_status(edge, 0, 4 * MiB)) == (MiB, False)
    assert extent(await io.block_status(edge, MiB, 4 * MiB)) == (MiB, True)
    await io.pwrite_zeroes(edge, MiB, MiB, may_unmap=True)
    assert extent(await io.block_status(edge, MiB, 3 * MiB)) == (3 * MiB, False)
    await io.pwrite(edge, 0, os.urandom(MiB))
    assert extent(await io.block_status(edge, 0, 4 * MiB)) == (MiB, True)
    daemon.graph.detach(edge)
    resizer = attach(daemon, node, RW | Perm.RESIZE)
    await io.truncate(resizer, 512 * 1024)
    await io.truncate(resizer, 4 * MiB)  # the grown part is a hole again
    assert extent(await io.block_status(resizer, 0, 4 * MiB)) == (512 * 1024, True)
    assert extent(await io.block_status(resizer, 512 * 1024, 4 * MiB)) == (
        4 * MiB - 512 * 1024,
        False,
    )
    daemon.graph.detach(resizer)
    await daemon.run_command("blockdev-del", {"node-name": "f"})


async def raw_over_file(daemon: Daemon, img: Path) -> BdrvChild:
    await add(daemon, driver="file", **{"node-name": "f", "filename": str(img)})
    return attach(daemon, await add(daemon, driver="raw", **{"node-name": "r", "file": "f"}))


async def test_live_reads_only_for_known_data_on_tmpfs(shm_dir: Path) -> None:
    data = os.urandom(2 * MiB)
    img = image(shm_dir / "img", data, 4 * MiB)
    daemon = Daemon()
    edge = await raw_over_file(daemon, img)

    got, live = await io.pread_live(edge, 0, 65536)
    assert (bytes(got), live) == (data[:65536], False)  # extent not known yet: a copy
    await io.block_status(edge, 0, 4 * MiB)
    got, live = await io.pread_live(edge, 4096, 256 * 1024)
    assert live and isinstance(got, memoryview) and got.readonly
    assert bytes(got) == data[4096 : 4096 + 256 * 1024]
    del got

    blocks = os.stat(img).st_blocks
    hole, live = await io.pread_live(edge, 3 * MiB, 65536)
    assert (bytes(hole), live) == (bytes(65536), False)
    across, live = await io.pread_live(edge, 2 * MiB - 4096, 8192)
    assert (bytes(across), live) == (data[-4096:] + bytes(4096), False)
    assert os.stat(img).st_blocks == blocks  # reading the hole did not allocate it

    # A plain pread never gets a view, and a live one sees later writes (it is no copy).
    plain = await io.pread(edge, 0, 4096)
    assert not (isinstance(plain, memoryview) and plain.readonly)
    view, live = await io.pread_live(edge, 0, 4096)
    assert live
    await io.pwrite(edge, 0, b"\xaa" * 4096)
    assert bytes(view) == b"\xaa" * 4096 and bytes(plain) == data[:4096]
    del view
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": "r"})
    await daemon.run_command("blockdev-del", {"node-name": "f"})


async def test_live_reads_stop_below_other_drivers(shm_dir: Path) -> None:
    img = image(shm_dir / "img", os.urandom(MiB), MiB)
    daemon = Daemon()
    await add(daemon, driver="file", **{"node-name": "f", "filename": str(img)})
    cor = await add(daemon, driver="copy-on-read", **{"node-name": "c", "file": "f"})
    edge = attach(daemon, cor)
    await io.block_status(edge, 0, MiB)
    got, live = await io.pread_live(edge, 0, 65536)
    assert not live and not (isinstance(got, memoryview) and got.readonly)
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": "c"})
    await daemon.run_command("blockdev-del", {"node-name": "f"})


async def test_a_view_outliving_the_node_holds_no_lock_bytes(shm_dir: Path) -> None:
    data = os.urandom(MiB)
    img = image(shm_dir / "img", data, MiB)
    daemon = Daemon()
    edge = await raw_over_file(daemon, img)
    await io.block_status(edge, 0, MiB)
    view, live = await io.pread_live(edge, 0, 65536)
    assert live and lock_bytes(img)
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": "r"})
    await daemon.run_command("blockdev-del", {"node-name": "f"})
    assert lock_bytes(img) == []  # qemu-img may take the image now
    assert bytes(view) == data[:65536]  # while a reply still being sent keeps its data
    # ... through a read-only descriptor of its own, not a dup sharing the image's locks.
    assert access_modes_of(img) == [os.O_RDONLY]
    del view
    assert access_modes_of(img) == []
