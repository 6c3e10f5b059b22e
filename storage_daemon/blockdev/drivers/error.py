"""The `error` driver (our extension) and the swap that puts one in place of a fenced node.

Domain ring. An error node has a size and no children and fails every request with one
errno, so the users of a node that became unusable (fatal qcow2 corruption) see a clean,
permanent EIO instead of a half-dead driver. Invariant: the swap moves every edge of the
fenced node at once, through one permission transaction, and the fenced node keeps its name.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any, NoReturn

from storage_daemon.blockdev.driver import BlockDriver, BlockStatus, ChildOpener
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph

ERRNOS: dict[str, int] = {
    "eio": errno.EIO,
    "enospc": errno.ENOSPC,
    "eperm": errno.EPERM,
    "eacces": errno.EACCES,
    "erofs": errno.EROFS,
    "enomedium": errno.ENOMEDIUM,
    "enotsup": errno.ENOTSUP,
    "einval": errno.EINVAL,
    "eshutdown": errno.ESHUTDOWN,
}
_NAME_MAX = 31
_SUFFIX = "-error"


class ErrorDriver(BlockDriver):
    name = "error"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.size = 0
        self.errno_name = "eio"
        self.code = errno.EIO

    async def open(self, options: Any, opener: ChildOpener) -> None:
        if options.size < 0:
            raise QmpError("Parameter 'size' expects a non-negative number below 2^63")
        self.size = int(options.size)
        if options.errno is not None:
            self.errno_name = str(getattr(options.errno, "value", options.errno))
        self.code = ERRNOS[self.errno_name]

    def strong_options(self) -> dict[str, Any]:
        return {"size": self.size, "errno": self.errno_name}

    def getlength(self) -> int:
        return self.size

    def _fail(self) -> NoReturn:
        raise OSError(self.code, os.strerror(self.code))

    async def preadv(self, offset: int, length: int) -> bytes:
        self._fail()

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self._fail()

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        self._fail()

    async def pdiscard(self, offset: int, length: int) -> None:
        self._fail()

    async def flush(self) -> None:
        self._fail()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        self._fail()

    async def truncate(self, size: int) -> None:
        raise QmpError(os.strerror(self.code))


def _replacement_name(graph: BlockGraph, node: BlockNode) -> str | None:
    """`<name>-error` (`-error2`, ... when taken), within qsd's 31 characters; None for
    implicit `#block` nodes, which get an implicit name too."""
    if node.implicit:
        return None
    for serial in range(1, 1000):
        suffix = _SUFFIX if serial == 1 else f"{_SUFFIX}{serial}"
        name = node.name[: _NAME_MAX - len(suffix)] + suffix
        if graph.find(name) is None:
            return name
    raise QmpError(f"No free node name to replace node '{node.name}'")


async def swap_in_error_node(graph: BlockGraph, node: BlockNode, reason: str) -> BlockNode | None:
    """Move every user of `node` to a new EIO node of the same size; emit BLOCK_NODE_REPLACED.

    The fenced node stays in the graph under its name, without users (its own children stay
    attached, so its image stays locked until it is deleted). Runs at most once per node.
    """
    from storage_daemon.qapi.runtime import visit_input

    if graph.find(node.name) is not node:
        return None
    spec: dict[str, Any] = {
        "driver": "error",
        "size": node.driver.getlength(),
        "errno": "eio",
        "read-only": node.options.read_only,
    }
    name = _replacement_name(graph, node)
    if name is not None:
        spec["node-name"] = name
    options = visit_input("BlockdevOptions", spec)
    replacement = await graph.add(options, monitor_owned=node.monitor_owned)
    replacement.options.active = node.options.active
    graph.replace_node(node, replacement)
    # Nothing uses the fenced node now; let the user delete it.
    node.monitor_owned = True
    graph.emit(
        "BLOCK_NODE_REPLACED",
        {"node-name": node.name, "new-node-name": replacement.name, "reason": reason},
    )
    return replacement
