"""NBD wire constants: magics, flags, option/reply/command codes, limits and errno mapping.

Pure ring: plain values only, no I/O. Every number here is fixed by the public NBD protocol
(doc/proto.md) or measured on qemu-storage-daemon 7.2; never change one without a wire capture.
"""

from __future__ import annotations

import errno as _errno
from enum import IntEnum, IntFlag

# --- magics -----------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # b"IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- limits (qsd 7.2) -------------------------------------------------------------------------

MAX_STRING_LENGTH = 4096
"""Export names, descriptions, context names and messages are at most this many bytes."""
MAX_OPTION_LENGTH = 32 * 1024 * 1024
"""Option payloads above this close the connection (qsd: 'len (N ) is larger than max len')."""
MAX_PARSED_OPTION_LENGTH = 1024 * 1024
"""INFO/GO/META payloads above this are drained and refused instead of being buffered."""
MAX_PAYLOAD = 32 * 1024 * 1024
"""READ/WRITE/CACHE lengths above this are refused with EINVAL (WRITE also disconnects)."""
BLOCK_SIZE_MIN = 1
BLOCK_SIZE_PREFERRED = 4096
BLOCK_SIZE_MAX = MAX_PAYLOAD
MAX_EXTENTS_PER_CHUNK = 1 << 20
NAME_TRUNCATE = 80
"""qsd quotes at most this many bytes of an unknown export name, followed by '...'."""
EXPORT_NAME_ZEROES = 124


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


OPTION_NAMES: dict[int, str] = {
    Opt.EXPORT_NAME: "export name",
    Opt.ABORT: "abort",
    Opt.LIST: "list",
    Opt.STARTTLS: "starttls",
    Opt.INFO: "info",
    Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply",
    Opt.LIST_META_CONTEXT: "list meta context",
    Opt.SET_META_CONTEXT: "set meta context",
}
"""Names qsd uses in option error messages; absent codes print as '<unknown>'."""

_REP_ERR = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9


class InfoType(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


COMMAND_NAMES: dict[int, str] = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.DISC: "disconnect",
    Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim",
    Cmd.CACHE: "cache",
    Cmd.WRITE_ZEROES: "write zeroes",
    Cmd.BLOCK_STATUS: "block status",
}
"""Names qsd uses in transmission error messages; others print as '<unknown>'."""


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1


class NbdErrno(IntEnum):
    """Error numbers on the wire; fixed by the spec, independent of the host's errno values."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# qsd 7.2's table, checked errno by errno with blkdebug-injected failures: EACCES is not in it
# (it reaches the client as EINVAL, like every errno the table does not name).
_ERRNO_TO_NBD: dict[int, NbdErrno] = {
    0: NbdErrno.OK,
    _errno.EPERM: NbdErrno.EPERM,
    _errno.EROFS: NbdErrno.EPERM,
    _errno.EIO: NbdErrno.EIO,
    _errno.ENOMEM: NbdErrno.ENOMEM,
    _errno.EINVAL: NbdErrno.EINVAL,
    _errno.ENOSPC: NbdErrno.ENOSPC,
    _errno.EDQUOT: NbdErrno.ENOSPC,
    _errno.EFBIG: NbdErrno.ENOSPC,
    _errno.EOVERFLOW: NbdErrno.EOVERFLOW,
    _errno.ENOTSUP: NbdErrno.ENOTSUP,
    _errno.EOPNOTSUPP: NbdErrno.ENOTSUP,
    _errno.ESHUTDOWN: NbdErrno.ESHUTDOWN,
}


def nbd_errno(host_errno: int) -> NbdErrno:
    """Map a host errno (an `OSError.errno`) to the NBD wire value; unknown values -> EINVAL."""
    return _ERRNO_TO_NBD.get(host_errno, NbdErrno.EINVAL)


# Meta contexts ---------------------------------------------------------------------------------

CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXT_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
CONTEXT_ID_BASE_ALLOCATION = 0
CONTEXT_ID_ALLOCATION_DEPTH = 1
CONTEXT_ID_FIRST_BITMAP = 2
"""qsd 7.2 numbers contexts by kind, not by selection order: base 0, depth 1, bitmap i -> 2+i."""

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
