"""x-blockdev-set-iothread: which iothread object each node is bound to (domain ring).

All I/O runs on the daemon's event loop and its pools, so a binding changes nothing about how
requests run: it is recorded, as qsd's AioContext move is, for every node connected to the
one named (parents and children alike). Invariant: no binding keeps a freed node alive.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from storage_daemon.blockdev.node import BlockNode
from storage_daemon.errors import QmpError

_bindings: WeakKeyDictionary[BlockNode, str] = WeakKeyDictionary()


def backend_user(node: BlockNode) -> bool:
    """Whether something other than a node uses `node` directly (qsd's bdrv_has_blk: an
    export's or a job's BlockBackend)."""
    return any(edge.parent_node is None for edge in node.parents)


def connected(node: BlockNode) -> list[BlockNode]:
    """`node` and every node reachable from it through edges, either way."""
    seen: dict[BlockNode, None] = {node: None}
    todo = [node]
    while todo:
        current = todo.pop()
        neighbours = [edge.node for edge in current.children]
        neighbours += [p for p in (edge.parent_node for edge in current.parents) if p]
        for other in neighbours:
            if other not in seen:
                seen[other] = None
                todo.append(other)
    return list(seen)


def check_movable(node: BlockNode, *, force: bool) -> None:
    """qsd's refusal to move a node an export or a job uses, unless forced."""
    if backend_user(node) and not force:
        raise QmpError(
            f"Node {node.name} is associated with a BlockBackend and could be in use "
            "(use force=true to override this check)"
        )


def bind(node: BlockNode, iothread: str | None) -> None:
    """Bind `node`'s connected nodes to `iothread` (None: the main loop)."""
    for member in connected(node):
        if iothread is None:
            _bindings.pop(member, None)
        else:
            _bindings[member] = iothread


def iothread_of(node: BlockNode) -> str | None:
    """The iothread `node` is bound to, or None for the main loop."""
    return _bindings.get(node)
