"""QEMU's rule for what a format node takes on its backing (COW) child (pure perm ring).

Test ring (unit). Invariant checked: the backing edge reads consistently only when the
node's own users do, and lets others write only when those users share writes.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm, cow_child_perm

perms = st.integers(min_value=0, max_value=int(PERM_ALL)).map(Perm)


def test_writer_alone_reads_nothing_below() -> None:
    # drive-backup sync=none: the job only writes the target; its backing edge takes nothing.
    assert cow_child_perm(Perm.WRITE, PERM_ALL) == (
        PERM_NONE,
        Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE,
    )


def test_reader_that_refuses_writers() -> None:
    assert cow_child_perm(Perm.CONSISTENT_READ, Perm.CONSISTENT_READ) == (
        Perm.CONSISTENT_READ,
        Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
    )


@given(perms, perms)
def test_rule(perm: Perm, shared: Perm) -> None:
    wanted, sharing = cow_child_perm(perm, shared)
    assert wanted == perm & Perm.CONSISTENT_READ
    assert sharing & (Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
    assert bool(sharing & Perm.WRITE) == bool(shared & Perm.WRITE)
    assert bool(sharing & Perm.RESIZE) == bool(shared & Perm.WRITE)
