"""Permission arithmetic and conflict messages (pure core)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.blockdev.perm import (
    PERM_ALL,
    Perm,
    PermUser,
    cumulative,
    find_conflict,
    perm_list,
    perm_names,
)

perms = st.integers(min_value=0, max_value=int(PERM_ALL)).map(Perm)


def test_names_in_qsd_orders() -> None:
    assert perm_names(Perm.WRITE | Perm.RESIZE) == ["write", "resize"]
    assert perm_list(PERM_ALL) == ["resize", "write-unchanged", "write", "consistent-read"]


def test_conflict_message_matches_qsd() -> None:
    q0 = PermUser(
        "node 'q0' (uses node 'f0' as 'file' child)",
        Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE,
        Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
    )
    q0b = PermUser("node 'q0b' (uses node 'f0' as 'file' child)", q0.perm, q0.shared)
    # Newest user first, as the graph keeps them: q0b refuses what q0 holds.
    assert find_conflict("f0", [q0b, q0]) == (
        "Permission conflict on node 'f0': permissions 'write, resize' are both required by "
        "node 'q0' (uses node 'f0' as 'file' child) and unshared by node 'q0b' "
        "(uses node 'f0' as 'file' child)."
    )


@given(st.lists(st.tuples(perms, perms), max_size=5))
def test_no_conflict_iff_every_use_is_shared_by_all_others(pairs: list[tuple[Perm, Perm]]) -> None:
    users = [PermUser(f"user {i}", p, s) for i, (p, s) in enumerate(pairs)]
    expected_ok = all(not (a.perm & ~b.shared) for a in users for b in users if a is not b)
    assert (find_conflict("n", users) is None) == expected_ok


@given(st.lists(st.tuples(perms, perms), max_size=5))
def test_cumulative_is_union_and_intersection(pairs: list[tuple[Perm, Perm]]) -> None:
    users = [PermUser("u", p, s) for p, s in pairs]
    perm, shared = cumulative(users)
    for user in users:
        assert user.perm & ~perm == 0
        assert shared & ~user.shared == 0
