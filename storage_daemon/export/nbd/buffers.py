"""Recycled payload buffers for the NBD core: large WRITE payloads land in reused memory.

Pure ring (no I/O, no clock, no threads). Invariant: a buffer is handed out again only when
nothing but this pool references it (its CPython reference count), so a caller still holding
the payload, a view of it, or a pool thread still writing it to disk never sees it change.
"""

from __future__ import annotations

from sys import getrefcount

MIN_SIZE = 64 * 1024
"""Smaller payloads are cheap to allocate (and usually copied out of the receive buffer)."""
MAX_BYTES = 2 * 1024 * 1024 + 8192
"""What one pool keeps at most: eight 256 KiB nbdcopy payloads, or two 1 MiB fio writes, each
with room for a request header in front (a payload that lands in place, protocol.py). Large
writes are still busy on the file's writer thread while the next ones arrive (copier.py)."""

_probe = [bytearray(1)]
_IDLE_REFS = getrefcount(_probe[0])
"""The count `getrefcount(bufs[i])` sees for a buffer referenced by the list only (measured,
not assumed, so the test below holds for whatever the interpreter adds for the call)."""
del _probe


class BufferPool:
    """Bytearrays of recently used sizes, reused once their last user has dropped them.

    A fresh `bytearray(n)` costs a malloc and a memset of `n` bytes (~10 us for 256 KiB),
    and lands on cold memory; a reused one costs neither. Contents of a returned buffer are
    unspecified (old data): the caller overwrites all of it before anyone may read it.
    """

    __slots__ = ("_bufs", "_bytes", "max_bytes", "min_size")

    def __init__(self, *, min_size: int = MIN_SIZE, max_bytes: int = MAX_BYTES) -> None:
        self.min_size = min_size
        self.max_bytes = max_bytes
        self._bufs: list[bytearray] = []
        self._bytes = 0

    def get(self, length: int) -> bytearray:
        """A bytearray of exactly `length` bytes, reused when an idle one of that size exists."""
        if length < self.min_size or length > self.max_bytes:
            return bytearray(length)
        bufs = self._bufs
        idle = -1
        for i in range(len(bufs)):
            if getrefcount(bufs[i]) == _IDLE_REFS:
                if len(bufs[i]) == length:
                    return bufs[i]
                if idle < 0:
                    idle = i
        buf = bytearray(length)
        if self._bytes + length > self.max_bytes and idle >= 0:
            # Make room: forget an idle buffer of another size (sizes change rarely).
            self._bytes -= len(bufs[idle])
            del bufs[idle]
        if self._bytes + length <= self.max_bytes:
            bufs.append(buf)
            self._bytes += length
        return buf

    @property
    def kept(self) -> int:
        """Bytes held by the pool (busy or idle)."""
        return self._bytes

    def clear(self) -> None:
        """Forget every buffer (the ones still in use live on with their users)."""
        self._bufs.clear()
        self._bytes = 0
