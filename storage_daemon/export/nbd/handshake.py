"""NBD handshake helpers: export description, option payload parsers, option reply encoders.

Pure ring: bytes in, values/bytes out; the state machine in `protocol.py` decides when each is
used. Invariant: every parser reads only inside the payload it is given (explicit bounds checks,
no trust in embedded lengths), and every message text matches qsd 7.2 where qsd has one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from storage_daemon.export.nbd.constants import (
    BLOCK_SIZE_MAX,
    BLOCK_SIZE_MIN,
    BLOCK_SIZE_PREFERRED,
    CONTEXT_ALLOCATION_DEPTH,
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_DIRTY_BITMAP_PREFIX,
    CONTEXT_ID_ALLOCATION_DEPTH,
    CONTEXT_ID_BASE_ALLOCATION,
    CONTEXT_ID_FIRST_BITMAP,
    MAX_STRING_LENGTH,
    NAME_TRUNCATE,
    OPTION_NAMES,
    OPTION_REPLY_MAGIC,
    InfoType,
    Opt,
    Rep,
    TransmissionFlag,
)

_OPT_REPLY = struct.Struct(">QIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_OPT_INFO = int(Opt.INFO)
_BLOCK_SIZE_REQD = b"request NBD_INFO_BLOCK_SIZE to use this export"


class NbdUsageError(Exception):
    """The caller misused the protocol core's API (a bug in our code, never the peer's fault)."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the protocol core needs to know about one export; the caller builds it.

    Defaults describe a writable qsd export of a byte-addressable node with more than one
    client allowed (transmission flags 0xded with structured replies, as qsd 7.2 sends).
    """

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_write_zeroes: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = True
    rotational: bool = False
    allocation_depth: bool = False
    bitmaps: tuple[str, ...] = ()
    block_size_min: int = BLOCK_SIZE_MIN
    block_size_preferred: int = BLOCK_SIZE_PREFERRED
    block_size_max: int = BLOCK_SIZE_MAX

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise NbdUsageError(f"export size {self.size} out of range")
        for text in (self.name, self.description, *self.bitmaps):
            if len(text.encode()) > MAX_STRING_LENGTH or "\0" in text:
                raise NbdUsageError(f"NBD string too long or contains NUL: {text[:40]!r}")

    def transmission_flags(self, structured: bool) -> int:
        """The 16-bit flags sent with this export; DF only once structured replies are on."""
        f = TransmissionFlag.HAS_FLAGS
        if self.can_flush:
            f |= TransmissionFlag.SEND_FLUSH
        if self.can_fua:
            f |= TransmissionFlag.SEND_FUA
        if self.rotational:
            f |= TransmissionFlag.ROTATIONAL
        if self.read_only:
            f |= TransmissionFlag.READ_ONLY
        else:
            if self.can_trim:
                f |= TransmissionFlag.SEND_TRIM
            if self.can_write_zeroes:
                f |= TransmissionFlag.SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    f |= TransmissionFlag.SEND_FAST_ZERO
        if structured:
            f |= TransmissionFlag.SEND_DF
        if self.can_multi_conn:
            f |= TransmissionFlag.CAN_MULTI_CONN
        if self.can_cache:
            f |= TransmissionFlag.SEND_CACHE
        return int(f)

    def contexts(self) -> list[tuple[int, str]]:
        """Every meta context this export offers, in qsd's order, with qsd's ids."""
        out = [(CONTEXT_ID_BASE_ALLOCATION, CONTEXT_BASE_ALLOCATION)]
        if self.allocation_depth:
            out.append((CONTEXT_ID_ALLOCATION_DEPTH, CONTEXT_ALLOCATION_DEPTH))
        for i, bitmap in enumerate(self.bitmaps):
            out.append((CONTEXT_ID_FIRST_BITMAP + i, CONTEXT_DIRTY_BITMAP_PREFIX + bitmap))
        return out


@dataclass(frozen=True, slots=True)
class MetaContext:
    """A meta context selected by SET_META_CONTEXT: the id used in BLOCK_STATUS chunks."""

    id: int
    name: str


class OptionError(Exception):
    """A malformed or refused option: answered with an error reply, the handshake goes on."""

    def __init__(self, rep: Rep, message: str | bytes) -> None:
        super().__init__(message)
        self.rep = rep
        self.message = message.encode() if isinstance(message, str) else message


def option_name(opt: int) -> str:
    return OPTION_NAMES.get(opt, "<unknown>")


def option_reply(opt: int, rep: int, payload: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(OPTION_REPLY_MAGIC, opt, rep, len(payload)) + payload


def unknown_export_message(name: bytes) -> bytes:
    shown = name[:NAME_TRUNCATE] + b"..." if len(name) >= NAME_TRUNCATE else name
    return b"export '" + shown + b"' not present"


def _read_name(payload: memoryview, opt: int) -> tuple[bytes, int]:
    """Parse the leading (u32 length, name) pair; returns the name and the offset after it."""
    what = option_name(opt)
    if len(payload) < 4:
        raise OptionError(Rep.ERR_INVALID, f"Inconsistent lengths in option {what}")
    (n,) = _U32.unpack_from(payload, 0)
    if n > MAX_STRING_LENGTH:
        raise OptionError(Rep.ERR_INVALID, f"Invalid name length: {n}")
    if 4 + n > len(payload):
        raise OptionError(Rep.ERR_INVALID, f"Inconsistent lengths in option {what}")
    name = bytes(payload[4 : 4 + n])
    if b"\0" in name:
        raise OptionError(Rep.ERR_INVALID, f"Unexpected embedded NUL in option {what}")
    return name, 4 + n


def parse_info(payload: memoryview, opt: int) -> tuple[bytes, frozenset[int]]:
    """INFO/GO payload -> (export name, requested info types)."""
    name, pos = _read_name(payload, opt)
    if pos + 2 > len(payload):
        raise OptionError(Rep.ERR_INVALID, f"Inconsistent lengths in option {option_name(opt)}")
    (count,) = _U16.unpack_from(payload, pos)
    pos += 2
    end = pos + 2 * count
    if end > len(payload):
        raise OptionError(Rep.ERR_INVALID, f"Inconsistent lengths in option {option_name(opt)}")
    if end != len(payload):
        raise OptionError(Rep.ERR_INVALID, f"option '{option_name(opt)}' has unexpected length")
    requests = frozenset(struct.unpack_from(f">{count}H", payload, pos))
    return name, requests


def parse_meta_name(payload: memoryview, opt: int) -> tuple[bytes, int]:
    """LIST/SET_META_CONTEXT: the export name and where the queries start.

    Split from `parse_meta_queries` because qsd looks the export up before reading queries.
    """
    return _read_name(payload, opt)


def parse_meta_queries(payload: memoryview, pos: int, opt: int) -> list[bytes]:
    """The (u32 count, count x (u32 length, query)) list after the name; bounds-checked."""
    bad = OptionError(Rep.ERR_INVALID, f"Inconsistent lengths in option {option_name(opt)}")
    size = len(payload)
    if pos + 4 > size:
        raise bad
    (count,) = _U32.unpack_from(payload, pos)
    pos += 4
    if count > (size - pos) // 4:
        raise bad
    out: list[bytes] = []
    for _ in range(count):
        if pos + 4 > size:
            raise bad
        (n,) = _U32.unpack_from(payload, pos)
        pos += 4
        if n > size - pos:
            raise bad
        q = bytes(payload[pos : pos + n])
        if b"\0" in q:
            raise OptionError(
                Rep.ERR_INVALID, f"Unexpected embedded NUL in option {option_name(opt)}"
            )
        out.append(q)
        pos += n
    # Bytes after the last query are ignored, as qsd does (qsd then loses sync; we do not).
    return out


def match_contexts(export: ExportInfo, queries: list[bytes], listing: bool) -> list[MetaContext]:
    """The contexts of `export` selected (SET) or listed (LIST) by `queries`, in qsd's order.

    Zero queries list everything and select nothing; the namespace wildcards `base:`, `qemu:`
    and `qemu:dirty-bitmap:` only work for LIST; anything unknown is silently ignored.
    """
    available = export.contexts()
    if not queries:
        return [MetaContext(i, n) for i, n in available] if listing else []
    wanted: set[str] = set()
    for raw in queries:
        if len(raw) > MAX_STRING_LENGTH:
            continue
        try:
            q = raw.decode()
        except UnicodeDecodeError:
            continue
        for _, ctx in available:
            if ctx == q or (
                listing
                and q in ("base:", "qemu:", CONTEXT_DIRTY_BITMAP_PREFIX)
                and ctx.startswith(q)
            ):
                wanted.add(ctx)
    return [MetaContext(i, n) for i, n in available if n in wanted]


def meta_context_reply(opt: int, ctx: MetaContext, listing: bool) -> bytes:
    body = _U32.pack(0 if listing else ctx.id) + ctx.name.encode()
    return option_reply(opt, Rep.META_CONTEXT, body)


def server_reply(export: ExportInfo) -> bytes:
    name = export.name.encode()
    return option_reply(3, Rep.SERVER, _U32.pack(len(name)) + name + export.description.encode())


def info_replies(opt: int, export: ExportInfo, requests: frozenset[int], structured: bool) -> bytes:
    """The REP_INFO replies and the final ACK for INFO/GO, in qsd's order and selection.

    qsd sends NAME only when asked, DESCRIPTION whenever the export has one, BLOCK_SIZE always,
    and EXPORT last. The minimum block size is the export's (its node's request alignment)
    for INFO and for a GO that asked for BLOCK_SIZE, else 1 (such a client may not honour
    it); preferred is at least the minimum. An INFO that did not ask for BLOCK_SIZE on an
    export with a minimum above 1 ends in ERR_BLOCK_SIZE_REQD instead of the ACK (qsd 7.2).
    """
    asked = InfoType.BLOCK_SIZE in requests
    minimum = export.block_size_min if asked or opt == _OPT_INFO else 1
    parts: list[bytes] = []
    if InfoType.NAME in requests:
        parts.append(option_reply(opt, Rep.INFO, _U16.pack(InfoType.NAME) + export.name.encode()))
    if export.description:
        parts.append(
            option_reply(
                opt, Rep.INFO, _U16.pack(InfoType.DESCRIPTION) + export.description.encode()
            )
        )
    parts.append(
        option_reply(
            opt,
            Rep.INFO,
            _INFO_BLOCK_SIZE.pack(
                InfoType.BLOCK_SIZE,
                minimum,
                max(export.block_size_preferred, minimum),
                export.block_size_max,
            ),
        )
    )
    parts.append(
        option_reply(
            opt,
            Rep.INFO,
            _INFO_EXPORT.pack(InfoType.EXPORT, export.size, export.transmission_flags(structured)),
        )
    )
    if opt == _OPT_INFO and not asked and export.block_size_min > 1:
        parts.append(option_reply(opt, Rep.ERR_BLOCK_SIZE_REQD, _BLOCK_SIZE_REQD))
    else:
        parts.append(option_reply(opt, Rep.ACK))
    return b"".join(parts)
