"""NBD transmission-phase values: the `Request` event and the reply encoders.

Pure ring: precompiled structs, bytes out. Invariant: encoders never copy READ data (they
return headers; the edge writes the data buffer after them) and never emit a chunk the spec
forbids (zero-length extents, more than 2^20 extents, messages over 4096 bytes).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from storage_daemon.export.nbd.constants import (
    MAX_EXTENTS_PER_CHUNK,
    MAX_STRING_LENGTH,
    REPLY_FLAG_DONE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    ReplyType,
)
from storage_daemon.export.nbd.handshake import NbdUsageError

REQUEST = struct.Struct(">IHHQQI")
_U32 = struct.Struct(">I")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")
_HOLE = struct.Struct(">IHHQIQI")
_ERROR_HEAD = struct.Struct(">IHHQIIH")
_OFFSET = struct.Struct(">Q")
_DF = int(CmdFlag.DF)  # a plain int: IntFlag's operators run Python code


@dataclass(slots=True)
class Request:
    """A validated transmission request; answer it with the connection's `reply_*` methods.

    `payload` is set for WRITE only: a memoryview the caller owns (the core reuses its memory
    only once every reference to it and its views is gone, see `buffers.py`).
    Cookies are opaque and may repeat; the core keys nothing on them.
    """

    cookie: int
    command: Cmd
    flags: int
    offset: int
    length: int
    payload: memoryview | None = None
    _reply_state: int = field(default=0, repr=False, compare=False)  # 0 none, 1 chunks, 2 done


def simple_reply(cookie: int, err: int) -> bytes:
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, err, cookie)


def error_chunk(cookie: int, err: int, message: str, offset: int | None = None) -> bytes:
    """A final ERROR chunk (ERROR_OFFSET when `offset` is given) with qsd-style message."""
    text = message.encode()[:MAX_STRING_LENGTH]
    if offset is None:
        head = _ERROR_HEAD.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            ReplyType.ERROR,
            cookie,
            6 + len(text),
            err,
            len(text),
        )
        return head + text
    head = _ERROR_HEAD.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE,
        ReplyType.ERROR_OFFSET,
        cookie,
        14 + len(text),
        err,
        len(text),
    )
    return head + text + _OFFSET.pack(offset)


def none_chunk(cookie: int) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, cookie, 0)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """OFFSET_DATA chunk header; `length` data bytes must follow it on the wire."""
    return _CHUNK_OFFSET.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        ReplyType.OFFSET_DATA,
        cookie,
        8 + length,
        offset,
    )


def hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return _HOLE.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        ReplyType.OFFSET_HOLE,
        cookie,
        12,
        offset,
        length,
    )


def check_read_piece(req: Request, offset: int, length: int) -> None:
    if length <= 0 or offset < req.offset or offset + length > req.offset + req.length:
        raise NbdUsageError(f"chunk {offset}+{length} outside the request")
    if req.flags & _DF and (offset, length) != (req.offset, req.length):
        raise NbdUsageError("DF request: one chunk must cover the whole read")


def block_status_chunks(
    req: Request, ids: Sequence[int], extents: Mapping[int, Sequence[tuple[int, int]]]
) -> bytes:
    """One BLOCK_STATUS chunk per context id, DONE on the last. See `reply_block_status`."""
    chunks: list[bytes] = []
    last = len(ids) - 1
    for i, ctx_id in enumerate(ids):
        flat = _extent_words(req, extents[ctx_id])
        head = _CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE if i == last else 0,
            ReplyType.BLOCK_STATUS,
            req.cookie,
            4 + 4 * len(flat),
        )
        chunks.append(head + _U32.pack(ctx_id) + struct.pack(f">{len(flat)}I", *flat))
    return b"".join(chunks)


def _extent_words(req: Request, extents: Sequence[tuple[int, int]]) -> list[int]:
    if not extents:
        raise NbdUsageError("a BLOCK_STATUS reply needs at least one extent per context")
    flat: list[int] = []
    covered = 0
    for length, flags in extents[:MAX_EXTENTS_PER_CHUNK]:
        if covered >= req.length:
            break
        if not 0 < length <= 0xFFFFFFFF or not 0 <= flags <= 0xFFFFFFFF:
            raise NbdUsageError(f"extent ({length}, {flags}) out of range")
        if req.flags & CmdFlag.REQ_ONE:
            return [min(length, req.length), flags]
        flat += (length, flags)
        covered += length
    return flat
