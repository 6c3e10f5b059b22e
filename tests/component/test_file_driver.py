"""The `file` driver in process: open errors, data path on sparse files, O_DIRECT, and the
OFD lock bytes its permissions leave in /proc/locks (two nodes of one daemon conflict)."""

from __future__ import annotations

import asyncio
import errno
import glob
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.file import FileDriver, pool, posix, syscalls
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError

RW = Perm.CONSISTENT_READ | Perm.WRITE
MiB = 1 << 20


class Parent:
    """A non-node user (as an export or a job attaches)."""

    def parent_description(self, child: BdrvChild) -> str:
        return f"an unnamed block device (uses node '{child.node.name}' as 'root' child)"


def lock_bytes(path: Path) -> list[int]:
    """Every byte of `path` locked by anyone, from /proc/locks (ranges expanded, one entry
    per holder: two fds holding byte 100 give [100, 100])."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found: list[int] = []
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if fields[1] == "->":  # a blocked waiter, not a held lock
                continue
            if fields[5] == dev:
                end = int(fields[7]) if fields[7] != "EOF" else int(fields[6])
                found.extend(range(int(fields[6]), end + 1))
    return sorted(found)


def sparse(scratch: Path, size: int = 4 * MiB, name: str = "img") -> Path:
    path = scratch / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


async def add(daemon: Daemon, **args: Any) -> BlockNode:
    args = {"driver": "file", **args}
    await daemon.run_command("blockdev-add", args)
    return daemon.graph.lookup(args["node-name"])


def drv(node: BlockNode) -> FileDriver:
    assert isinstance(node.driver, FileDriver)
    return node.driver


async def open_error(daemon: Daemon, **args: Any) -> QmpError:
    with pytest.raises(QmpError) as info:
        await add(daemon, **{"node-name": "x", **args})
    assert daemon.graph.find("x") is None
    return info.value


def attach(daemon: Daemon, node: BlockNode, perm: Perm, shared: Perm = PERM_ALL) -> BdrvChild:
    return daemon.graph.attach(Parent(), node, "root", ChildRole.PRIMARY, perm, shared)


def fd_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def open_fds_of(path: Path) -> int:
    return sum(1 for fd in glob.glob("/proc/self/fd/*") if _readlink(fd) == str(path))


def _readlink(link: str) -> str:
    try:
        return os.readlink(link)
    except OSError:
        return ""


def read_only_sysfs_file() -> str:
    """A sysfs attribute without a write method: even root gets EACCES opening it rw."""
    for candidate in (
        "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size",
        "/sys/kernel/address_bits",
        "/sys/kernel/profiling",
    ):
        try:
            os.close(os.open(candidate, os.O_RDONLY))
            os.close(os.open(candidate, os.O_RDWR))
        except PermissionError:
            return candidate
        except OSError:
            continue
    pytest.skip("no read-only sysfs attribute to open")


def direct_io_supported(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    return True


# --- open ---------------------------------------------------------------------------------


async def test_open_errors_use_qsd_texts(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    (scratch / "dir").mkdir()
    missing = scratch / "missing"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"filename": str(missing)}, f"Could not open '{missing}': No such file or directory"),
        ({"filename": str(scratch / "dir")}, f"Could not open '{scratch / 'dir'}': Is a directory"),
        (
            {"filename": str(scratch / "dir"), "read-only": True},
            f"'file' driver requires '{scratch / 'dir'}' to be a regular file",
        ),
        ({"filename": "/dev/null"}, "'file' driver requires '/dev/null' to be a regular file"),
        ({"filename": ""}, "The 'file' block driver requires a file name"),
        # Checked before the open, and before the missing file.
        (
            {"filename": str(missing), "pr-manager": "pm0"},
            "No persistent reservation manager with id 'pm0'",
        ),
        # Checked after the open.
        (
            {"filename": str(missing), "aio": "native"},
            f"Could not open '{missing}': No such file or directory",
        ),
        (
            {"filename": str(img), "aio": "native"},
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ),
        (
            {"filename": str(img), "force-share": True},
            "force-share=on can only be used with read-only images",
        ),
        (
            {"filename": f"file:{img}"},
            f"Could not open 'file:{img}': No such file or directory",
        ),
    ]
    for args, message in cases:
        assert (await open_error(daemon, **args)).desc == message, args
    assert open_fds_of(img) == 0  # failed opens leave no fd behind


async def test_o_direct_refused_by_filesystem(scratch: Path) -> None:
    path = read_only_sysfs_file()
    daemon = Daemon()
    err = await open_error(daemon, filename=path, **{"read-only": True, "cache": {"direct": True}})
    assert err.desc == f"Could not open '{path}': filesystem does not support O_DIRECT"


async def test_accepted_options(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    accepted: list[dict[str, Any]] = [
        {"aio": "threads"},
        {"aio": "io_uring"},
        {"aio-max-batch": -1},
        {"aio-max-batch": 100000},
        {"drop-cache": False},
        {"x-check-cache-dropped": True},
        {"locking": "on"},
        {"locking": "off"},
        {"locking": "auto"},
        {"read-only": True, "force-share": True},
    ]
    if direct_io_supported(img):
        accepted.append({"aio": "native", "cache": {"direct": True}})
    for extra in accepted:
        node = await add(daemon, **{"node-name": "n", "filename": str(img), **extra})
        assert drv(node).getlength() == 4 * MiB
        await daemon.run_command("blockdev-del", {"node-name": "n"})
    assert open_fds_of(img) == 0


async def test_read_only_and_auto_read_only_open_modes(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    ro = await add(daemon, **{"node-name": "ro", "filename": str(img), "read-only": True})
    assert fd_flags(drv(ro).fd) & os.O_ACCMODE == os.O_RDONLY
    rw = await add(daemon, **{"node-name": "rw", "filename": str(img)})
    assert fd_flags(drv(rw).fd) & os.O_ACCMODE == os.O_RDWR
    # qsd: auto-read-only opens read-only, and read-write only while a writer is attached.
    auto = await add(daemon, **{"node-name": "auto", "filename": str(img), "auto-read-only": True})
    assert fd_flags(drv(auto).fd) & os.O_ACCMODE == os.O_RDONLY
    reader = attach(daemon, auto, Perm.CONSISTENT_READ)
    assert fd_flags(drv(auto).fd) & os.O_ACCMODE == os.O_RDONLY
    writer = attach(daemon, auto, RW, PERM_ALL & ~Perm.RESIZE)
    assert fd_flags(drv(auto).fd) & os.O_ACCMODE == os.O_RDWR
    await io.pwrite(writer, 0, b"w" * 512)
    assert img.read_bytes()[:512] == b"w" * 512
    daemon.graph.detach(writer)
    assert fd_flags(drv(auto).fd) & os.O_ACCMODE == os.O_RDONLY
    assert bytes(await io.pread(reader, 0, 512)) == b"w" * 512
    daemon.graph.detach(reader)
    assert open_fds_of(img) == 3  # the retired fds were closed


async def test_auto_read_only_writer_on_unwritable_file() -> None:
    path = read_only_sysfs_file()
    daemon = Daemon()
    await open_error(daemon, filename=path)  # Permission denied without auto-read-only
    node = await add(daemon, **{"node-name": "s", "filename": path, "auto-read-only": True})
    assert not node.read_only  # qsd keeps "ro": false; only the fd is read-only
    with pytest.raises(QmpError) as info:
        attach(daemon, node, RW)
    assert info.value.desc == f"Could not open '{path}': Permission denied"
    assert not node.parents
    attach(daemon, node, Perm.CONSISTENT_READ)


# --- data path ----------------------------------------------------------------------------


async def test_read_write_flush_and_block_status_on_a_sparse_file(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    node = await add(daemon, **{"node-name": "f", "filename": str(img)})
    d = drv(node)
    assert await d.block_status(0, 4 * MiB) == await d.block_status(0, 4 * MiB)
    status = await d.block_status(0, 4 * MiB)
    assert (status.length, status.data, status.zero) == (4 * MiB, False, True)
    assert bytes(await d.preadv(0, 4096)) == bytes(4096)

    payload = os.urandom(64 * 1024)
    await d.pwritev(MiB, payload, False)
    await d.pwritev(2 * MiB, memoryview(payload)[:4096], True)  # FUA: RWF_DSYNC
    await d.flush()
    assert bytes(await d.preadv(MiB, len(payload))) == payload
    assert img.read_bytes()[MiB : MiB + len(payload)] == payload
    extents = [await d.block_status(off, 4 * MiB - off) for off in (0, MiB, MiB + 65536)]
    assert [(s.length, s.data, s.zero) for s in extents] == [
        (MiB, False, True),
        (65536, True, False),
        (MiB - 65536, False, True),
    ]
    assert await d.actual_size() == os.stat(img).st_blocks * 512 > 0
    assert d.image_info_extra() == {"dirty-flag": False}
    info = await daemon.run_command("query-named-block-nodes", None)
    assert info[0]["image"]["actual-size"] == os.stat(img).st_blocks * 512


async def test_reads_from_cold_and_cached_pages_and_past_eof(scratch: Path) -> None:
    daemon = Daemon()
    img = scratch / "img"
    data = os.urandom(3 * 4096 + 100)
    img.write_bytes(data)
    node = await add(daemon, **{"node-name": "f", "filename": str(img)})
    d = drv(node)
    fd = os.open(img, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: RWF_NOWAIT must fall back
    finally:
        os.close(fd)
    assert bytes(await d.preadv(0, len(data))) == data
    assert bytes(await d.preadv(0, len(data))) == data  # cached now: served on the loop
    assert bytes(await d.preadv(4096, 8192)) == data[4096 : 4096 + 8192]
    os.truncate(img, 4096)  # shrunk behind our back: what is gone reads as zeroes
    assert bytes(await d.preadv(0, 8192)) == data[:4096] + bytes(4096)


async def test_zeroes_discard_and_truncate(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    node = await add(daemon, **{"node-name": "f", "filename": str(img), "discard": "unmap"})
    d = drv(node)
    await d.pwritev(0, b"\xff" * (2 * MiB), False)
    await d.flush()
    blocks = os.stat(img).st_blocks
    # unmap allowed and discard=unmap: punched, reads zero, space returned
    await d.pwrite_zeroes(0, MiB, True, False)
    assert bytes(await d.preadv(0, MiB)) == bytes(MiB)
    assert os.stat(img).st_blocks < blocks
    status = await d.block_status(0, 2 * MiB)
    assert (status.length, status.data, status.zero) == (MiB, False, True)
    # without unmap: zeroes that stay allocated
    await d.pwrite_zeroes(MiB, 4096, False, True)
    assert bytes(await d.preadv(MiB - 4096, 3 * 4096)) == bytes(2 * 4096) + b"\xff" * 4096
    # zeroes past EOF grow the file
    await d.pwrite_zeroes(4 * MiB, MiB, False, False)
    assert d.getlength() == os.stat(img).st_size == 5 * MiB
    assert bytes(await d.preadv(4 * MiB, MiB)) == bytes(MiB)
    # discard punches a hole
    await d.pdiscard(MiB + 4096, 4096)
    assert bytes(await d.preadv(MiB + 4096, 4096)) == bytes(4096)
    status = await d.block_status(MiB + 4096, 4096)
    assert (status.data, status.zero) == (False, True)
    # truncate (block_resize) both ways
    await d.truncate(3 * MiB)
    assert d.getlength() == os.stat(img).st_size == 3 * MiB
    await d.truncate(6 * MiB)
    assert d.getlength() == os.stat(img).st_size == 6 * MiB


async def test_growing_an_empty_file_writes_its_first_block(scratch: Path) -> None:
    """qsd's allocate_first_block: growing from length 0 allocates (zeroes) the first block;
    a file grown to less than a sector becomes a sector long; growing a non-empty file
    allocates nothing."""
    daemon = Daemon()
    for name, size, length in (("a", MiB, MiB), ("b", 100, 512), ("c", 8192, 8192)):
        img = scratch / name
        img.write_bytes(b"")
        d = drv(await add(daemon, **{"node-name": name, "filename": str(img)}))
        await d.truncate(size)
        assert (d.getlength(), os.stat(img).st_size) == (length, length)
        assert os.stat(img).st_blocks * 512 >= 512
        assert img.read_bytes() == bytes(length)
    c = drv(daemon.graph.lookup("c"))
    before = os.stat(scratch / "c").st_blocks
    await c.truncate(4 * MiB)
    assert os.stat(scratch / "c").st_blocks == before


async def test_discard_ignored_unless_discard_unmap(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    node = await add(daemon, **{"node-name": "f", "filename": str(img)})
    d = drv(node)
    await d.pwritev(0, b"\x01" * 4096, False)
    await d.pdiscard(0, 4096)
    await d.pwrite_zeroes(4096, 4096, True, False)  # unmap wanted, but discard=ignore
    assert bytes(await d.preadv(0, 4096)) == b"\x01" * 4096
    assert (await d.block_status(0, 4096)).data


async def test_no_flush_skips_fdatasync(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    daemon = Daemon()
    img = sparse(scratch)
    plain = await add(daemon, **{"node-name": "a", "filename": str(img)})
    nf = await add(daemon, **{"node-name": "b", "filename": str(img), "cache": {"no-flush": True}})
    await drv(nf).flush()
    assert synced == []
    await drv(plain).flush()
    assert synced == [drv(plain).fd]


async def test_o_direct_alignment_and_unaligned_eof(scratch: Path) -> None:
    img = scratch / "img"
    data = os.urandom(MiB + 1000)  # an EOF that is not sector aligned
    img.write_bytes(data)
    if not direct_io_supported(img):
        pytest.skip(f"{scratch} does not support O_DIRECT")
    daemon = Daemon()
    node = await add(daemon, **{"node-name": "f", "filename": str(img), "cache": {"direct": True}})
    d = drv(node)
    assert fd_flags(d.fd) & os.O_DIRECT
    assert d.request_alignment in (512, 1024, 2048, 4096)
    align = d.request_alignment
    edge = attach(daemon, node, RW, PERM_ALL & ~Perm.RESIZE)
    # The generic path aligns requests for the driver (read-modify-write for writes).
    assert bytes(await io.pread(edge, 3, 5000)) == data[3:5003]
    assert bytes(await io.pread(edge, MiB - 24, 1024)) == data[MiB - 24 :]
    patch = os.urandom(700)
    await io.pwrite(edge, 100, patch)
    expected = data[:100] + patch + data[800:]
    assert bytes(await d.preadv(0, 2 * align)) == expected[: 2 * align]
    # A write reaching the unaligned EOF: padded for O_DIRECT, and the padding cut off again.
    await io.pwrite(edge, MiB, b"t" * 1000)
    assert os.stat(img).st_size == MiB + 1000
    assert img.read_bytes() == expected[:MiB] + b"t" * 1000
    await io.flush(edge)


async def test_o_direct_alignment_of_a_file_starting_with_a_hole(scratch: Path) -> None:
    """A 1-byte O_DIRECT read of a hole works (nothing is read from the device), which
    proves nothing: the probe then takes MAX_ALIGN, as qsd does."""
    img = sparse(scratch, MiB)
    if not direct_io_supported(img):
        pytest.skip(f"{scratch} does not support O_DIRECT")
    fd = os.open(img, os.O_RDONLY | os.O_DIRECT)
    try:
        try:
            os.pread(fd, 1, 0)
        except OSError as err:
            assert err.errno == errno.EINVAL
            pytest.skip("this filesystem checks alignment for holes too")
        assert syscalls.probe_request_alignment(fd, os.fstat(fd)) == syscalls.MAX_ALIGN
    finally:
        os.close(fd)


# --- locking ------------------------------------------------------------------------------


async def test_lock_bytes_follow_permissions(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    await daemon.run_command(
        "blockdev-add",
        {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": str(img)}},
    )
    raw = daemon.graph.lookup("r")
    assert lock_bytes(img) == []  # a node nobody uses takes no permissions, so no bytes
    # A writable raw export, measured on qsd: 100-101 held, 203 (resize) unshared.
    writer = attach(daemon, raw, RW, PERM_ALL & ~Perm.RESIZE)
    assert lock_bytes(img) == [100, 101, 203]
    reader = attach(daemon, raw, Perm.CONSISTENT_READ, PERM_ALL & ~Perm.WRITE_UNCHANGED)
    assert lock_bytes(img) == [100, 101, 202, 203]
    daemon.graph.detach(writer)
    assert lock_bytes(img) == [100, 202]
    daemon.graph.detach(reader)
    assert lock_bytes(img) == []


async def test_locking_off_takes_no_bytes(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    node = await add(daemon, **{"node-name": "f", "filename": str(img), "locking": "off"})
    attach(daemon, node, RW | Perm.RESIZE, Perm.CONSISTENT_READ)
    assert lock_bytes(img) == []


async def test_two_nodes_of_one_daemon_conflict_like_qsd(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    a = await add(daemon, **{"node-name": "a", "filename": str(img)})
    b = await add(daemon, **{"node-name": "b", "filename": str(img)})
    # a writes and refuses to share write and resize (a qcow2 node on it, in qsd)
    attach(daemon, a, RW | Perm.RESIZE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
    assert lock_bytes(img) == [100, 101, 103, 201, 203]
    with pytest.raises(QmpError) as info:
        attach(daemon, b, RW, PERM_ALL)
    assert info.value.desc == 'Failed to get "write" lock'
    assert info.value.hint == f"Is another process using the image [{img}]?"
    with pytest.raises(QmpError) as info:
        attach(daemon, b, Perm.CONSISTENT_READ, PERM_ALL & ~Perm.RESIZE)
    assert info.value.desc == 'Failed to get shared "resize" lock'
    # Nothing of the failed attempts stays behind, on the node or in the lock table.
    assert not b.parents and b.perm == Perm(0)
    assert lock_bytes(img) == [100, 101, 103, 201, 203]
    attach(daemon, b, Perm.CONSISTENT_READ, PERM_ALL)  # a plain reader coexists
    assert lock_bytes(img) == [100, 100, 101, 103, 201, 203]  # one 100 per fd


async def test_failed_change_keeps_the_previous_locks(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    a = await add(daemon, **{"node-name": "a", "filename": str(img)})
    b = await add(daemon, **{"node-name": "b", "filename": str(img)})
    reader = attach(daemon, b, Perm.CONSISTENT_READ, PERM_ALL & ~Perm.WRITE)
    attach(daemon, a, Perm.CONSISTENT_READ, PERM_ALL & ~Perm.RESIZE)
    before = lock_bytes(img)
    assert before == [100, 100, 201, 203]
    with pytest.raises(QmpError) as info:
        daemon.graph.set_edge_perm(reader, Perm.CONSISTENT_READ | Perm.RESIZE, PERM_ALL)
    assert info.value.desc == 'Failed to get "resize" lock'
    assert lock_bytes(img) == before and reader.perm == Perm.CONSISTENT_READ


async def test_deleting_the_node_releases_its_locks(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    node = await add(daemon, **{"node-name": "f", "filename": str(img)})
    edge = attach(daemon, node, RW, Perm.CONSISTENT_READ)
    assert lock_bytes(img) == [100, 101, 201, 202, 203]
    daemon.graph.detach(edge)
    await daemon.run_command("blockdev-del", {"node-name": "f"})
    assert lock_bytes(img) == [] and open_fds_of(img) == 0


async def test_force_share_drops_unshare_bytes(scratch: Path) -> None:
    daemon = Daemon()
    img = sparse(scratch)
    await daemon.run_command(
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "r",
            "read-only": True,
            "force-share": True,
            "file": {"driver": "file", "filename": str(img)},
        },
    )
    attach(daemon, daemon.graph.lookup("r"), Perm.CONSISTENT_READ, PERM_ALL & ~Perm.RESIZE)
    assert lock_bytes(img) == [100]  # qsd: the file child shares everything


def test_fallocate_reports_errno(scratch: Path) -> None:
    fd = os.open(scratch / "f", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as info:
            syscalls.fallocate(fd, 0, 0, 4096)  # EBADF: not open for writing
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)


# --- fast paths: tmpfs inline I/O and the driver's thread pool ----------------------------


def tmpfs_dir() -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    fd = os.open(shm, os.O_RDONLY)
    try:
        if syscalls.filesystem_type(fd) != syscalls.TMPFS_MAGIC:
            pytest.skip("/dev/shm is not tmpfs")
    finally:
        os.close(fd)
    return shm


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def shm_img() -> Iterator[Path]:
    path = tmpfs_dir() / f"sd-test-{os.getpid()}-{id(object())}.img"
    path.touch()
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_filesystem_type_tells_tmpfs_from_others(scratch: Path) -> None:
    shm = tmpfs_dir()
    fd = os.open(shm, os.O_RDONLY)
    proc = os.open("/proc/self", os.O_RDONLY)
    try:
        assert syscalls.filesystem_type(fd) == syscalls.TMPFS_MAGIC
        assert syscalls.filesystem_type(proc) == 0x9FA0  # PROC_SUPER_MAGIC
    finally:
        os.close(fd)
        os.close(proc)


async def test_tmpfs_small_io_runs_inline_large_io_on_the_pool(
    shm_img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs: list[str] = []
    real_submit = pool.submit

    def counting_submit(loop: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        jobs.append(getattr(func, "__name__", repr(func)))
        return real_submit(loop, func, *args, **kwargs)

    monkeypatch.setattr(pool, "submit", counting_submit)
    os.truncate(shm_img, 4 * MiB)
    daemon = Daemon()
    d = drv(await add(daemon, **{"node-name": "f", "filename": str(shm_img)}))
    jobs.clear()
    small = os.urandom(posix.INLINE_MAX)
    await d.pwritev(4096, small, False)
    await d.pwritev(MiB, small[:512], True)  # FUA (RWF_DSYNC) inline too
    assert bytes(await d.preadv(4096, len(small))) == small
    assert bytes(await d.preadv(MiB, 512)) == small[:512]
    assert jobs == []  # never a thread hop
    big = os.urandom(posix.INLINE_MAX + 4096)
    await d.pwritev(2 * MiB, big, False)
    assert bytes(await d.preadv(2 * MiB, len(big))) == big
    assert jobs == ["write_full", "read_bytes"]
    data = read_file(shm_img)
    assert data[4096 : 4096 + len(small)] == small and data[2 * MiB : 2 * MiB + len(big)] == big
    await d.pwritev(4 * MiB, b"t" * 100, False)  # growing the file inline
    assert d.getlength() == 4 * MiB + 100 == os.stat(shm_img).st_size
    os.truncate(shm_img, 8192)  # shrunk behind our back: the rest reads as zeroes
    assert bytes(await d.preadv(4096, 8192)) == small[:4096] + bytes(4096)
    assert bytes(await d.preadv(8192, 4096)) == bytes(4096)


async def test_non_tmpfs_writes_use_the_pool(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = sparse(scratch)
    fd = os.open(img, os.O_RDONLY)
    try:
        if syscalls.filesystem_type(fd) == syscalls.TMPFS_MAGIC:
            pytest.skip("the scratch directory is on tmpfs")
    finally:
        os.close(fd)
    jobs: list[str] = []
    real_submit = pool.submit

    def counting_submit(loop: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        jobs.append(getattr(func, "__name__", repr(func)))
        return real_submit(loop, func, *args, **kwargs)

    monkeypatch.setattr(pool, "submit", counting_submit)
    daemon = Daemon()
    d = drv(await add(daemon, **{"node-name": "f", "filename": str(img)}))
    await d.pwritev(0, b"w" * 4096, False)
    assert jobs == ["write_full"]  # a buffered write may wait for the disk: never inline


async def test_pool_results_errors_and_cancelled_waiters() -> None:
    loop = asyncio.get_running_loop()
    assert await asyncio.gather(*(pool.submit(loop, pow, i, 2) for i in range(32))) == [
        i * i for i in range(32)
    ]
    with pytest.raises(OSError) as info:
        await pool.submit(loop, os.fstat, -1)
    assert info.value.errno == errno.EBADF

    gate = threading.Event()
    ended = asyncio.Event()
    done_calls: list[bool] = []

    def on_done() -> None:
        done_calls.append(gate.is_set())
        ended.set()

    future = pool.submit(loop, gate.wait, 10.0, on_done=on_done)
    waiter = asyncio.ensure_future(future)
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert future.cancelled() and done_calls == []  # the syscall still runs
    gate.set()
    await asyncio.wait_for(ended.wait(), 10)
    assert done_calls == [True]  # once, after the job really ended


async def test_close_waits_for_a_cancelled_request_still_in_the_pool(scratch: Path) -> None:
    img = sparse(scratch)
    daemon = Daemon()
    node = await add(daemon, **{"node-name": "f", "filename": str(img)})
    d = drv(node)
    gate = threading.Event()
    started = threading.Event()

    def slow_job(fd: int) -> int:
        started.set()
        gate.wait(10.0)
        return os.fstat(fd).st_size  # the fd must still be open here

    fd = d.fd
    request = asyncio.ensure_future(d._run(slow_job))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10.0)
    request.cancel()
    closing = asyncio.ensure_future(d.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # waits for the syscall, which still has its fd
    assert os.fstat(fd).st_size == 4 * MiB
    gate.set()
    await asyncio.wait_for(closing, 10)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed once the job ended
