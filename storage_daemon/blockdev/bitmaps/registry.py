"""The dirty bitmaps of each node: named ones (lookups and checks with qsd's texts, the
write-path hook) and the anonymous ones operations keep, all as query-named-block-nodes shows.

Domain ring, no I/O. io.py reads `ARMED` before marking, so a daemon without bitmaps pays
one module attribute read per write. Invariant: ARMED is True whenever some live node has a
named bitmap (it may stay True after such a node is freed); names are unique per node; every
bitmap, named or not, has a creation number and qsd lists them newest first; a bitmap with a
successor is busy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

from storage_daemon.blockdev.bitmaps.core import Bits
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.errors import QmpError

SECTOR = 512
MIN_GRANULARITY = 512
MAX_NAME = 1023  # bytes (QEMU's BDRV_BITMAP_MAX_NAME_SIZE)
DEFAULT_GRANULARITY = 65536

ARMED = False  # read by io.py before every write; True while some node may have a bitmap
_bitmaps: WeakKeyDictionary[BlockNode, list[DirtyBitmap]] = WeakKeyDictionary()
_anonymous: WeakKeyDictionary[BlockNode, list[AnonymousBitmap]] = WeakKeyDictionary()
_created = itertools.count()


def next_seq() -> int:
    """A creation number: qsd keeps each node's bitmaps in one list, newest first."""
    return next(_created)


@dataclass(eq=False)
class DirtyBitmap:
    """One named bitmap of a node (QEMU's BdrvDirtyBitmap)."""

    name: str
    bits: Bits
    enabled: bool = True
    persistent: bool = False
    busy: bool = False  # held by an operation (a transaction removing it, a backup)
    # Loaded from a read-only image: may be read and disabled, never changed.
    readonly: bool = False
    # Stored flagged in_use (not saved properly): never loaded, only removable.
    inconsistent: bool = False
    # While a backup holds the bitmap, the writes are recorded here instead (QEMU's
    # successor); the job's end folds it back in one way or the other.
    successor: Bits | None = None
    seq: int = field(default_factory=next_seq)
    successor_seq: int = -1  # the successor's creation number (qsd lists it as a bitmap)

    def info(self) -> dict[str, Any]:
        """One BlockDirtyInfo entry, members in qsd's order."""
        info = {
            "name": self.name,
            "recording": self.enabled,
            "persistent": self.persistent,
            "busy": self.busy,
            "granularity": self.bits.granularity,
            "count": self.bits.count,
        }
        if self.inconsistent:
            info["inconsistent"] = True
        return info

    def successor_info(self) -> dict[str, Any]:
        """The successor as qsd lists it: anonymous, recording as the bitmap did."""
        assert self.successor is not None
        return anonymous_info(self.enabled, self.successor.granularity, self.successor.count)

    def check_usable(self, *, allow_ro: bool = False, allow_inconsistent: bool = False) -> None:
        """qsd's bdrv_dirty_bitmap_check, in its order: busy, read-only, inconsistent
        (`allow_*` leave a check out, as the verbs that may use such a bitmap do)."""
        if self.busy:
            raise QmpError(
                f"Bitmap '{self.name}' is currently in use by another operation and cannot be used"
            )
        if self.readonly and not allow_ro:
            raise QmpError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if self.inconsistent and not allow_inconsistent:
            raise QmpError(f"Bitmap '{self.name}' is inconsistent and cannot be used")


def anonymous_info(recording: bool, granularity: int, count: int) -> dict[str, Any]:
    """A BlockDirtyInfo entry without a name (never persistent, never busy)."""
    return {
        "recording": recording,
        "persistent": False,
        "busy": False,
        "granularity": granularity,
        "count": count,
    }


class AnonymousBitmap:
    """A bitmap without a name that an operation keeps on a node (block-copy's copy bitmap,
    the copy-before-write filter's done and access bitmaps): only query-named-block-nodes sees
    it, through `info`, which reads the owner's own state."""

    __slots__ = ("info", "seq")

    def __init__(self, info: Callable[[], dict[str, Any]]) -> None:
        self.info = info
        self.seq = next_seq()


def attach_anonymous(node: BlockNode, info: Callable[[], dict[str, Any]]) -> AnonymousBitmap:
    bitmap = AnonymousBitmap(info)
    _anonymous.setdefault(node, []).append(bitmap)
    return bitmap


def release_anonymous(node: BlockNode, bitmap: AnonymousBitmap) -> None:
    found = _anonymous.get(node)
    if found is not None and bitmap in found:
        found.remove(bitmap)
        if not found:
            del _anonymous[node]


def node_length(node: BlockNode) -> int:
    """The length a bitmap covers: the node's, in whole sectors (as qsd's bdrv_getlength)."""
    return -(-node.driver.getlength() // SECTOR) * SECTOR


def default_granularity(node: BlockNode) -> int:
    """qsd's default: the node's cluster size within [4 KiB, 64 KiB], else 64 KiB."""
    cluster = node.driver.image_info_extra().get("cluster-size")
    if isinstance(cluster, int) and cluster > 0:
        return min(DEFAULT_GRANULARITY, max(4096, cluster))
    return DEFAULT_GRANULARITY


def bitmaps(node: BlockNode) -> list[DirtyBitmap]:
    """The node's bitmaps, newest first (empty when it has none)."""
    return _bitmaps.get(node, [])


def find(node: BlockNode, name: str) -> DirtyBitmap | None:
    for bitmap in _bitmaps.get(node, ()):
        if bitmap.name == name:
            return bitmap
    return None


def lookup(graph: Any, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """qsd's block_dirty_bitmap_lookup: the node, then the bitmap, with its texts."""
    node = graph.find(node_name)
    if node is None:
        raise QmpError(f"Node '{node_name}' not found")
    bitmap = find(node, name)
    if bitmap is None:
        raise QmpError(f"Dirty bitmap '{name}' not found")
    return node, bitmap


def create(
    graph: Any,
    node_name: str,
    name: str,
    granularity: int | None,
    persistent: bool,
    disabled: bool,
) -> tuple[BlockNode, DirtyBitmap]:
    """block-dirty-bitmap-add, its checks in qsd's order; returns the new bitmap."""
    if not name:
        raise QmpError("Bitmap name cannot be empty")
    node: BlockNode = graph.lookup(node_name)
    if granularity is None:
        granularity = default_granularity(node)
    elif granularity < MIN_GRANULARITY or granularity & (granularity - 1):
        raise QmpError("Granularity must be power of 2 and at least 512")
    if persistent:
        node.driver.check_can_store_bitmap(name, granularity)
    if find(node, name) is not None:
        raise QmpError(f"Bitmap already exists: {name}")
    if len(name.encode()) > MAX_NAME:
        raise QmpError(f"Bitmap name too long: {name}")
    bitmap = DirtyBitmap(
        name, Bits(node_length(node), granularity), enabled=not disabled, persistent=persistent
    )
    attach(node, bitmap)
    return node, bitmap


def attach(node: BlockNode, bitmap: DirtyBitmap) -> None:
    global ARMED
    _bitmaps.setdefault(node, []).insert(0, bitmap)
    ARMED = True


def release(node: BlockNode, bitmap: DirtyBitmap) -> None:
    """Drop the bitmap from its node (no check: callers made qsd's)."""
    global ARMED
    found = _bitmaps.get(node)
    if found is not None and bitmap in found:
        found.remove(bitmap)
        if not found:
            del _bitmaps[node]
    ARMED = bool(_bitmaps)


def merge(graph: Any, node_name: str, target: str, sources: list[Any]) -> tuple[DirtyBitmap, Bits]:
    """block-dirty-bitmap-merge: every source into `target`, all or nothing. Sources are
    names on `node_name` or objects with `node` and `name`. Returns the target and a copy
    of its bits before the merge (a transaction's undo)."""
    node, dst = lookup(graph, node_name, target)
    scratch = Bits(dst.bits.length, dst.bits.granularity)
    for source in sources:
        if isinstance(source, str):
            src = find(node, source)
            if src is None:
                raise QmpError(f"Dirty bitmap '{source}' not found")
        else:
            src = lookup(graph, source.node, source.name)[1]
        src.check_usable(allow_ro=True)
        if src.bits.length != scratch.length:
            raise QmpError(
                f"Bitmaps are of different sizes (destination size is {scratch.length}, "
                f"source size is {src.bits.length}) and can't be merged"
            )
        scratch.merge_from(src.bits)
    dst.check_usable()
    backup = dst.bits.copy()
    dst.bits.merge_from(scratch)
    return dst, backup


def mark(node: BlockNode, offset: int, length: int) -> None:
    """A write, zero write or discard covered `[offset, offset+length)` of `node`."""
    for bitmap in _bitmaps.get(node, ()):
        if bitmap.enabled:
            (bitmap.successor or bitmap.bits).set(offset, length)


def freeze(bitmap: DirtyBitmap, seq: int | None = None) -> None:
    """A backup takes the bitmap: it is busy, and new writes go to a fresh successor
    (created as number `seq`, taken from `next_seq()` when the job began, as qsd's is)."""
    bitmap.check_usable()
    bitmap.busy = True
    bitmap.successor = Bits(bitmap.bits.length, bitmap.bits.granularity)
    bitmap.successor_seq = next_seq() if seq is None else seq


def abdicate(bitmap: DirtyBitmap) -> None:
    """The backup's bits are consumed: the bitmap becomes what was written meanwhile (qsd
    renames the successor, so the bitmap takes the successor's place in the list)."""
    if bitmap.successor is not None:
        bitmap.bits, bitmap.successor = bitmap.successor, None
        bitmap.seq = bitmap.successor_seq
    bitmap.busy = False


def reclaim(bitmap: DirtyBitmap) -> None:
    """The backup's bits are kept: what was written meanwhile is merged back in."""
    if bitmap.successor is not None:
        bitmap.bits.merge_from(bitmap.successor)
        bitmap.successor = None
    bitmap.busy = False


def resize(node: BlockNode) -> None:
    """The node changed size (block_resize): its bitmaps follow."""
    length = node_length(node)
    for bitmap in _bitmaps.get(node, ()):
        bitmap.bits.resize(length)
        if bitmap.successor is not None:
            bitmap.successor.resize(length)


def infos(node: BlockNode) -> list[dict[str, Any]]:
    """Every bitmap of the node, named or not, newest first (query-named-block-nodes)."""
    found: list[tuple[int, Callable[[], dict[str, Any]]]] = []
    for bitmap in _bitmaps.get(node, ()):
        found.append((bitmap.seq, bitmap.info))
        if bitmap.successor is not None:
            found.append((bitmap.successor_seq, bitmap.successor_info))
    found += [(anon.seq, anon.info) for anon in _anonymous.get(node, ())]
    found.sort(key=lambda item: item[0], reverse=True)
    return [info() for _, info in found]
