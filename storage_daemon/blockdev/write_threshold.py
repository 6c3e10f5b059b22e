"""Write thresholds (block-set-write-threshold): an offset past which a write fires
BLOCK_WRITE_THRESHOLD once, then the threshold clears itself, as qsd does.

Domain ring, no I/O. The generic I/O path reads `ARMED` first, so a daemon without thresholds
pays one module attribute read per write. Invariant: a stored threshold is in [1, 2**64) and
ARMED is True whenever one is stored (it may stay True after a node with one is freed).
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from storage_daemon.blockdev.node import BlockNode

EVENT = "BLOCK_WRITE_THRESHOLD"
_U64 = 1 << 64

ARMED = False  # read by io.py before every write; True while some node may have a threshold
# Weak, so that a node deleted with a threshold set does not stay alive for it.
_thresholds: WeakKeyDictionary[BlockNode, int] = WeakKeyDictionary()


def set_threshold(node: BlockNode, threshold: int) -> None:
    """Set `node`'s threshold in bytes; 0 disables it. qsd takes the value as a uint64 and
    accepts negative numbers, wrapping them (-1 is 2**64 - 1, which no write reaches)."""
    global ARMED
    value = threshold % _U64
    if value:
        _thresholds[node] = value
    else:
        _thresholds.pop(node, None)
    ARMED = bool(_thresholds)


def threshold(node: BlockNode) -> int:
    """`node`'s threshold as query-named-block-nodes shows it: a signed 64-bit number (qsd
    prints the stored uint64 through an int field, so 2**64 - 5 shows as -5)."""
    value = _thresholds.get(node, 0)
    return value - _U64 if value >= 1 << 63 else value


def check(node: BlockNode, end: int) -> None:
    """A write (or zero write, or discard that reaches the driver) is about to cover bytes up
    to `end` of `node`: fire the event when that passes the threshold, and clear it.

    qsd checks when the request starts, before the driver runs, so a write that then fails
    still fires it; the end is the request's, after alignment padding, as the node sees it.
    """
    global ARMED
    value = _thresholds.get(node)
    if value is None or end <= value:
        return
    del _thresholds[node]
    ARMED = bool(_thresholds)
    graph = node.graph
    if graph is not None:
        graph.emit(
            EVENT,
            {"node-name": node.name, "amount-exceeded": end - value, "write-threshold": value},
        )
