"""A bitmap held by a backup: busy, with a successor that takes the new writes, folded back
at the job's end by abdicate (keep only the new writes) or reclaim (keep everything).

Test ring (unit): registry functions on in-memory bitmaps, no daemon.
"""

from __future__ import annotations

import pytest

from storage_daemon.blockdev.bitmaps import registry
from storage_daemon.blockdev.bitmaps.core import Bits
from storage_daemon.errors import QmpError


class _Node:
    """Stands for a BlockNode: the registry only keys its lists by node."""


def _bitmap() -> tuple[_Node, registry.DirtyBitmap]:
    node = _Node()
    bitmap = registry.DirtyBitmap("b0", Bits(1 << 20, 4096))
    registry.attach(node, bitmap)  # type: ignore[arg-type]
    bitmap.bits.set(0, 512)
    return node, bitmap


def test_frozen_bitmap_is_busy_and_writes_go_to_successor() -> None:
    node, bitmap = _bitmap()
    registry.freeze(bitmap)
    assert bitmap.busy and bitmap.info()["busy"] is True
    registry.mark(node, 65536, 1)  # type: ignore[arg-type]
    assert bitmap.bits.count == 4096  # the frozen bits do not change
    assert bitmap.successor is not None and bitmap.successor.count == 4096
    with pytest.raises(QmpError, match="currently in use by another operation"):
        registry.freeze(bitmap)
    registry.release(node, bitmap)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keep", "runs"), [(False, [(65536, 4096)]), (True, [(0, 4096), (65536, 4096)])]
)
def test_abdicate_and_reclaim(keep: bool, runs: list[tuple[int, int]]) -> None:
    node, bitmap = _bitmap()
    registry.freeze(bitmap)
    registry.mark(node, 65536, 100)  # type: ignore[arg-type]
    (registry.reclaim if keep else registry.abdicate)(bitmap)
    assert not bitmap.busy and bitmap.successor is None
    assert bitmap.bits.dirty_runs() == runs
    registry.mark(node, 8192, 1)  # type: ignore[arg-type]
    assert bitmap.bits.is_dirty(2)  # recording into the bitmap itself again
    registry.release(node, bitmap)  # type: ignore[arg-type]


def test_disabled_bitmap_records_nothing_while_frozen() -> None:
    node, bitmap = _bitmap()
    bitmap.enabled = False
    registry.freeze(bitmap)
    registry.mark(node, 65536, 100)  # type: ignore[arg-type]
    registry.abdicate(bitmap)
    assert bitmap.bits.count == 0
    registry.release(node, bitmap)  # type: ignore[arg-type]
