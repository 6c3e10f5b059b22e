"""The reply half of the NBD server connection: each `reply_*` answers one request.

Pure ring (a mixin of `protocol.ServerConnection`, bytes out). Invariant: every request is
answered exactly once (`_reply_state` 0 -> 1 for chunks -> 2 when final), `in_flight`
counts the requests not answered yet, and READ data is never copied (headers only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from storage_daemon.export.nbd.constants import Cmd, CmdFlag, NbdErrno, nbd_errno
from storage_daemon.export.nbd.handshake import MetaContext, NbdUsageError
from storage_daemon.export.nbd.transmission import (
    Request,
    block_status_chunks,
    check_read_piece,
    data_chunk_header,
    error_chunk,
    hole_chunk,
    none_chunk,
    simple_reply,
)

_DF = int(CmdFlag.DF)


class Replies:
    """Reply encoders and the bookkeeping of what is answered (see the module docstring)."""

    structured_replies: bool
    in_flight: int
    meta_contexts: tuple[MetaContext, ...]

    def _finish(self, req: Request) -> None:
        if req._reply_state == 2:
            raise NbdUsageError(f"request {req.cookie:#x} already answered")
        req._reply_state = 2
        self.in_flight -= 1

    def _chunk(self, req: Request, offset: int, length: int, done: bool) -> None:
        if req._reply_state == 2:
            raise NbdUsageError(f"request {req.cookie:#x} already answered")
        if not self.structured_replies:
            raise NbdUsageError("chunked replies need structured replies")
        if req.command is not Cmd.READ:
            raise NbdUsageError("data/hole chunks answer READ only")
        if length >= 0:
            check_read_piece(req, offset, length)
        req._reply_state = 1
        if done:
            self._finish(req)

    def _first(self, req: Request, command: Cmd | None) -> None:
        if (req.command is command) is (command is None):
            raise NbdUsageError(f"wrong reply method for {req.command.name}")
        if req._reply_state:
            raise NbdUsageError(f"request {req.cookie:#x} already (partly) answered")
        self._finish(req)

    def reply_ok(self, req: Request) -> bytes:
        """Success for every command but READ and BLOCK_STATUS (a simple reply, as qsd sends)."""
        command = req.command
        if command is Cmd.BLOCK_STATUS or command is Cmd.READ:
            raise NbdUsageError(f"use the dedicated reply method for {command.name}")
        if req._reply_state:  # (`_first`, inlined: the reply of every WRITE)
            raise NbdUsageError(f"request {req.cookie:#x} already (partly) answered")
        req._reply_state = 2
        self.in_flight -= 1
        return simple_reply(req.cookie, 0)

    def reply_read(self, req: Request) -> bytes:
        """Header of a complete READ answer; send it, then exactly `req.length` data bytes.

        Simple mode: the 16-byte simple reply. Structured: one OFFSET_DATA chunk with DONE (a
        NONE chunk, and no data, for a zero-length read). Honours DF trivially (one chunk).
        """
        self._first(req, Cmd.READ)
        if not self.structured_replies:
            return simple_reply(req.cookie, 0)
        if not req.length:
            return none_chunk(req.cookie)
        return data_chunk_header(req.cookie, req.offset, req.length, True)

    def read_chunk_data(self, req: Request, offset: int, length: int, done: bool = False) -> bytes:
        """Header of one OFFSET_DATA chunk (structured only); send `length` data bytes after it."""
        self._chunk(req, offset, length, done)
        return data_chunk_header(req.cookie, offset, length, done)

    def read_chunk_hole(self, req: Request, offset: int, length: int, done: bool = False) -> bytes:
        """A complete OFFSET_HOLE chunk (structured only): `length` bytes reading as zeroes."""
        self._chunk(req, offset, length, done)
        return hole_chunk(req.cookie, offset, length, done)

    def reply_hole(self, req: Request) -> bytes:
        """A complete READ answer of one OFFSET_HOLE chunk covering the whole request (all of
        it reads as zeroes): structured replies only, a non-empty request without DF."""
        if (
            req._reply_state
            or req.command is not Cmd.READ
            or not self.structured_replies
            or not req.length
            or req.flags & _DF
        ):
            raise NbdUsageError(f"request {req.cookie:#x} cannot be answered by one hole")
        req._reply_state = 2
        self.in_flight -= 1
        return hole_chunk(req.cookie, req.offset, req.length, True)

    def reply_done(self, req: Request) -> bytes:
        """The final NONE chunk closing a chunked READ."""
        self._chunk(req, 0, -1, True)
        return none_chunk(req.cookie)

    def reply_error(
        self, req: Request, host_errno: int, message: str = "", offset: int | None = None
    ) -> bytes:
        """Final error answer: an ERROR (or ERROR_OFFSET) chunk, or a simple reply.

        `host_errno` is an `OSError.errno`, mapped to the NBD value here. In simple mode a READ
        error must be sent instead of `reply_read`'s header, never after it. Allowed after
        data/hole chunks of a structured READ.
        """
        err = nbd_errno(host_errno)
        if err == NbdErrno.OK:
            raise NbdUsageError("reply_error needs a non-zero errno")
        self._finish(req)
        if not self.structured_replies:
            return simple_reply(req.cookie, err)
        return error_chunk(req.cookie, err, message, offset)

    def reply_block_status(
        self, req: Request, extents: Mapping[int, Sequence[tuple[int, int]]]
    ) -> bytes:
        """All BLOCK_STATUS chunks for `req`: `extents[context_id]` = [(length, flags), ...].

        Every negotiated context must be present with at least one extent starting at
        `req.offset`. Extents starting past the request are dropped, at most 2^20 are sent;
        with REQ_ONE only the first is sent, clamped to the request length.
        """
        ids = [c.id for c in self.meta_contexts]
        if sorted(extents) != sorted(ids):
            raise NbdUsageError(f"extents for contexts {sorted(extents)}, negotiated {ids}")
        self._first(req, Cmd.BLOCK_STATUS)
        return block_status_chunks(req, ids, extents)
