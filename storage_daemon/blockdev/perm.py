"""Block permissions: the four bits, their wire names and the conflict rule (pure ring).

A node's users (edges from parent nodes, exports, jobs) each declare what they use (`perm`)
and what they let others use (`shared`). Two users conflict when one uses a bit the other does
not share. The texts are qsd's, so conflict errors read the same as on the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag


class Perm(IntFlag):
    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8


PERM_NONE = Perm(0)
PERM_ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
# The bits a writer needs; a read-only node can grant none of them.
PERM_WRITERS = Perm.WRITE | Perm.RESIZE

_NAMES = {
    Perm.CONSISTENT_READ: "consistent-read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write-unchanged",
    Perm.RESIZE: "resize",
}
_BITS = (Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE)


def perm_names(perm: Perm) -> list[str]:
    """QAPI names (BlockPermission) in ascending bit order, as the queries list them."""
    return [_NAMES[bit] for bit in _BITS if perm & bit]


def perm_words(perm: Perm) -> str:
    """The permissions as qsd's messages name them: "consistent read, write unchanged"
    (words, not the QAPI names), in ascending bit order."""
    return ", ".join(_NAMES[bit].replace("-", " ") for bit in _BITS if perm & bit)


def perm_list(perm: Perm) -> list[str]:
    """Names as x-debug-query-block-graph lists them (descending bit order)."""
    return list(reversed(perm_names(perm)))


def lock_bit_index(bit: Perm) -> int:
    """The bit's index i; the file driver locks bytes 100+i and 200+i for it."""
    return _BITS.index(bit)


@dataclass(frozen=True)
class PermUser:
    """One user of a node, as the conflict check sees it."""

    description: str  # "node 'q0' (uses node 'f0' as 'file' child)"
    perm: Perm
    shared: Perm


def find_conflict(node_name: str, users: Sequence[PermUser]) -> str | None:
    """qsd's message for the first pair of users that cannot coexist, or None.

    `users` is newest first, as QEMU keeps a node's parents: the newest user that refuses to
    share is named as "unshared by".
    """
    for refuser in users:
        for holder in users:
            if holder is refuser:
                continue
            clash = holder.perm & ~refuser.shared
            if clash:
                return (
                    f"Permission conflict on node '{node_name}': permissions "
                    f"'{perm_words(clash)}' are both required by "
                    f"{holder.description} and unshared by {refuser.description}."
                )
    return None


def cow_child_perm(perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
    """What a node whose users need `perm` and share `shared` takes on its COW (backing)
    child: consistent-read only when its users read consistently (a writer alone reads
    nothing below), and write/resize shared only when its users let the data change."""
    wanted = perm & Perm.CONSISTENT_READ
    sharing = Perm.WRITE | Perm.RESIZE if shared & Perm.WRITE else PERM_NONE
    return wanted, sharing | Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


def cumulative(users: Sequence[PermUser]) -> tuple[Perm, Perm]:
    """What all users together need, and what all of them let others use."""
    perm = PERM_NONE
    shared = PERM_ALL
    for user in users:
        perm |= user.perm
        shared &= user.shared
    return perm, shared
