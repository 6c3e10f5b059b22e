"""QEMU's JSON dialect for QMP: an incremental stream parser and the matching printer.

Pure core (ring 1): bytes in, values and `JsonParseError`s out; no I/O, no clock.
Invariant: results depend only on the concatenated input, never on how it was split into
`feed()` calls, and memory per message is bounded by the limits given to `JsonStream`.

Behaviour follows qemu-storage-daemon 7.2 as observed on the wire (see
../shared/reference/qsd-behaviour.md): single-quoted strings are accepted, a lexical error
reports "stray '<text>'" and skips input up to the next structural character or control byte,
a syntax error is reported once the message's brackets balance, and object keys print in the
order of QEMU's hash table (`qdict_order`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum, auto

from storage_daemon.qdict import qdict_order

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]

# QEMU's limits: total bytes of a message's tokens, number of tokens, bracket nesting.
MAX_MESSAGE_BYTES = 64 << 20
MAX_TOKENS = 2 << 20
MAX_DEPTH = 1024

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class JsonParseError:
    """One rejected message; `desc` is qsd's full text ("JSON parse error, ...")."""

    desc: str
    # The rejected bytes, for messages that quote them raw; not part of equality.
    stray: bytes | None = field(default=None, compare=False)


class _Tok(Enum):
    LCURLY = auto()
    RCURLY = auto()
    LSQUARE = auto()
    RSQUARE = auto()
    COMMA = auto()
    COLON = auto()
    STRING = auto()
    INTEGER = auto()
    FLOAT = auto()
    KEYWORD = auto()


_PUNCT = {
    ord("{"): _Tok.LCURLY,
    ord("}"): _Tok.RCURLY,
    ord("["): _Tok.LSQUARE,
    ord("]"): _Tok.RSQUARE,
    ord(","): _Tok.COMMA,
    ord(":"): _Tok.COLON,
}


class _Lex(Enum):
    START = auto()
    RECOVERY = auto()  # after a lexical error: skip to a resynchronisation point
    STRING = auto()
    ESCAPE = auto()
    ZERO = auto()  # "0" or "-0"
    NEG = auto()  # "-"
    DIGITS = auto()  # nonzero integer part
    DOT = auto()  # "1."
    FRACTION = auto()  # "1.5"
    EXP = auto()  # "1e"
    EXP_SIGN = auto()  # "1e-"
    EXP_DIGITS = auto()  # "1e5"
    KEYWORD = auto()


_WS = re.compile(rb"[ \t\r\n]*")
_DIGITS = re.compile(rb"[0-9]*")
_LETTERS = re.compile(rb"[a-z]*")
# Inside a string: everything but the quote, backslash, control bytes and 0xFE/0xFF.
_DQ_RUN = re.compile(rb'[^"\\\x00-\x1f\xfe\xff]*')
_SQ_RUN = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]*")
# Recovery skips everything but structural characters, control bytes (tab excepted), 0xFE/0xFF.
_RECOVERY_SKIP = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]*")

_BACKSLASH = ord("\\")
_SIMPLE_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


def _noncharacter_class() -> str:
    parts = ["\ufdd0-\ufdef"]
    parts += [chr((plane << 16) | 0xFFFE) + chr((plane << 16) | 0xFFFF) for plane in range(17)]
    return "[" + "".join(parts) + "]"


_NONCHARACTER = re.compile(_noncharacter_class())


def _is_valid_codepoint(cp: int) -> bool:
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return False
    return not (0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE)


class _StringError(Exception):
    pass


def _decode_raw(raw: bytes) -> str:
    """Decode unescaped string bytes as QEMU does: UTF-8, plus C0 80 for U+0000,
    rejecting surrogates, overlongs and noncharacters."""
    if raw.isascii():
        return raw.decode("ascii")
    try:
        text = raw.replace(b"\xc0\x80", b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        raise _StringError("invalid UTF-8 sequence in string") from None
    if _NONCHARACTER.search(text):
        raise _StringError("invalid UTF-8 sequence in string")
    return text


def _decode_string(token: bytes) -> str:
    """The value of a complete string token (quotes included)."""
    end = len(token) - 1
    pos = 1
    parts: list[str] = []
    while True:
        bs = token.find(b"\\", pos, end)
        if bs < 0:
            parts.append(_decode_raw(token[pos:end]))
            return "".join(parts)
        parts.append(_decode_raw(token[pos:bs]))
        c = token[bs + 1]
        simple = _SIMPLE_ESCAPES.get(c)
        if simple is not None:
            parts.append(simple)
            pos = bs + 2
            continue
        if c != ord("u"):
            raise _StringError("invalid escape sequence in string")
        cp = _hex4(token, bs)
        pos = bs + 6
        if 0xD800 <= cp <= 0xDBFF:
            if token[pos : pos + 2] == b"\\u" and _HEX4.match(token, pos + 2):
                low = int(token[pos + 2 : pos + 6], 16)
                if 0xDC00 <= low <= 0xDFFF:
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
                    pos += 6
            if cp <= 0xFFFF:
                raise _StringError(_bad_escape(token, bs))
        if not _is_valid_codepoint(cp):
            raise _StringError(_bad_escape(token, bs))
        parts.append(chr(cp))


def _hex4(token: bytes, bs: int) -> int:
    if not _HEX4.match(token, bs + 2) or bs + 6 > len(token) - 1:
        raise _StringError(_bad_escape(token, bs))
    return int(token[bs + 2 : bs + 6], 16)


def _bad_escape(token: bytes, bs: int) -> str:
    return _lossy(token[bs : bs + 6]) + " is not a valid Unicode character"


def _lossy(raw: bytes) -> str:
    """Raw input quoted back in an error message; invalid UTF-8 becomes U+FFFD."""
    return raw.decode("utf-8", errors="replace")


def _number(kind: _Tok, text: bytes) -> int | float:
    if kind is _Tok.INTEGER:
        value = int(text)
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
    return float(text)


# Parser frames: what the innermost open container expects next.
class _Want(Enum):
    VALUE = auto()  # a value (top level, after ',' in a list, after ':' in a dict)
    VALUE_OR_CLOSE = auto()  # just after '['
    LIST_SEP = auto()  # ',' or ']'
    KEY_OR_CLOSE = auto()  # just after '{'
    KEY = auto()  # after ',' in a dict
    COLON = auto()
    DICT_SEP = auto()  # ',' or '}'


class _Frame:
    __slots__ = ("container", "is_key", "key", "want")

    def __init__(self, container: list[JsonValue] | dict[str, JsonValue], want: _Want) -> None:
        self.container = container
        self.want = want
        self.key: str | None = None
        self.is_key = False  # this container is being parsed as an object key


class _Done:
    """Marker: the message ended with a complete value."""


class _Parser:
    """Incremental LL(1) parser over tokens. Reports the same first error a recursive-descent
    parser run over the whole message would; once failed it ignores tokens until reset."""

    def __init__(self) -> None:
        self.stack: list[_Frame] = []
        self.error: str | None = None
        self.result: JsonValue = None
        self.complete = False

    def token(self, kind: _Tok, text: bytes) -> None:
        if self.error is not None or self.complete:
            return
        try:
            self._token(kind, text)
        except _StringError as exc:
            self.error = str(exc)

    def _token(self, kind: _Tok, text: bytes) -> None:
        want = self.stack[-1].want if self.stack else _Want.VALUE
        if want is _Want.COLON:
            if kind is not _Tok.COLON:
                self.error = "missing : in object pair"
            else:
                self.stack[-1].want = _Want.VALUE
            return
        if want is _Want.LIST_SEP or want is _Want.DICT_SEP:
            close = _Tok.RSQUARE if want is _Want.LIST_SEP else _Tok.RCURLY
            if kind is _Tok.COMMA:
                self.stack[-1].want = _Want.VALUE if want is _Want.LIST_SEP else _Want.KEY
            elif kind is close:
                self._close()
            else:
                self.error = (
                    "expected separator in list"
                    if want is _Want.LIST_SEP
                    else "expected separator in dict"
                )
            return
        if kind is _Tok.RSQUARE and want is _Want.VALUE_OR_CLOSE:
            self._close()
            return
        if kind is _Tok.RCURLY and want is _Want.KEY_OR_CLOSE:
            self._close()
            return
        as_key = want is _Want.KEY or want is _Want.KEY_OR_CLOSE
        if kind is _Tok.LSQUARE or kind is _Tok.LCURLY:
            if kind is _Tok.LSQUARE:
                frame = _Frame([], _Want.VALUE_OR_CLOSE)
            else:
                frame = _Frame({}, _Want.KEY_OR_CLOSE)
            frame.is_key = as_key
            self.stack.append(frame)
            return
        value = self._scalar(kind, text)
        if self.error is not None:
            return
        if as_key:
            if not isinstance(value, str):
                self.error = "key is not a string in object"
            else:
                self.stack[-1].key = value
                self.stack[-1].want = _Want.COLON
            return
        self._store(value)

    def _scalar(self, kind: _Tok, text: bytes) -> JsonValue:
        if kind is _Tok.STRING:
            return _decode_string(text)
        if kind is _Tok.INTEGER or kind is _Tok.FLOAT:
            return _number(kind, text)
        if kind is _Tok.KEYWORD:
            if text == b"true":
                return True
            if text == b"false":
                return False
            if text == b"null":
                return None
            self.error = f"invalid keyword '{_lossy(text)}'"
            return None
        self.error = "expecting value"
        return None

    def _close(self) -> None:
        frame = self.stack.pop()
        if frame.is_key:
            self.error = "key is not a string in object"
            return
        self._store(frame.container)

    def _store(self, value: JsonValue) -> None:
        if not self.stack:
            self.result = value
            self.complete = True
            return
        frame = self.stack[-1]
        container = frame.container
        if isinstance(container, list):
            container.append(value)
            frame.want = _Want.LIST_SEP
            return
        assert frame.key is not None
        if frame.key in container:
            self.error = "duplicate key"
            return
        container[frame.key] = value
        frame.want = _Want.DICT_SEP


class JsonStream:
    """Splits a byte stream into JSON messages the way QEMU's lexer and streamer do.

    `feed(data)` returns, in order, every message completed by `data`: a parsed value, or a
    `JsonParseError` for a rejected one. `finish()` flushes at end of input. Lexer state is
    kept between calls, so each byte is examined a bounded number of times however the input
    is split. Limits (defaults are QEMU's): `max_bytes` over a message's tokens (whitespace
    not counted), `max_tokens`, and `max_depth` open brackets.
    """

    def __init__(
        self,
        *,
        max_bytes: int = MAX_MESSAGE_BYTES,
        max_tokens: int = MAX_TOKENS,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_tokens = max_tokens
        self.max_depth = max_depth
        self._state = _Lex.START
        self._quote = 0
        self._tok = bytearray()
        self._out: list[JsonValue | JsonParseError] = []
        self._reset_message()

    def _reset_message(self) -> None:
        self._braces = 0
        self._brackets = 0
        self._msg_bytes = 0
        self._msg_tokens = 0
        self._parser = _Parser()

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the message in progress (a rough memory measure)."""
        return self._msg_bytes + len(self._tok)

    def feed(self, data: bytes) -> list[JsonValue | JsonParseError]:
        self._lex(bytes(data))
        out, self._out = self._out, []
        return out

    def finish(self) -> list[JsonValue | JsonParseError]:
        """End of input: complete a pending number or keyword, reject a pending string, and
        report a message left open as "premature EOI"."""
        state = self._state
        if state in (_Lex.ZERO, _Lex.DIGITS, _Lex.FRACTION, _Lex.EXP_DIGITS):
            kind = _Tok.FLOAT if state in (_Lex.FRACTION, _Lex.EXP_DIGITS) else _Tok.INTEGER
            self._emit(kind)
        elif state is _Lex.KEYWORD:
            self._emit(_Tok.KEYWORD)
        elif state not in (_Lex.START, _Lex.RECOVERY):
            self._lex_error()
        self._state = _Lex.START
        if self._msg_tokens:
            parser = self._parser
            self._reset_message()
            self._out.append(
                JsonParseError("JSON parse error, " + (parser.error or "premature EOI"))
            )
        out, self._out = self._out, []
        return out

    # -- lexer ---------------------------------------------------------------------------

    def _lex(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        tok = self._tok
        while pos < n:
            state = self._state
            if state is _Lex.START:
                pos = _WS.match(data, pos).end()  # type: ignore[union-attr]
                if pos >= n:
                    break
                c = data[pos]
                pos += 1
                punct = _PUNCT.get(c)
                if punct is not None:
                    tok.append(c)
                    self._emit(punct)
                elif c == 0x22 or c == 0x27:  # " or '
                    tok.append(c)
                    self._quote = c
                    self._state = _Lex.STRING
                elif c == 0x30:
                    tok.append(c)
                    self._state = _Lex.ZERO
                elif 0x31 <= c <= 0x39:
                    tok.append(c)
                    self._state = _Lex.DIGITS
                elif c == 0x2D:
                    tok.append(c)
                    self._state = _Lex.NEG
                elif 0x61 <= c <= 0x7A:
                    tok.append(c)
                    self._state = _Lex.KEYWORD
                else:
                    tok.append(c)
                    self._lex_error()
            elif state is _Lex.RECOVERY:
                pos = _RECOVERY_SKIP.match(data, pos).end()  # type: ignore[union-attr]
                if pos < n:
                    self._state = _Lex.START  # the byte at pos is looked at again
            elif state is _Lex.STRING:
                run = (_DQ_RUN if self._quote == 0x22 else _SQ_RUN).match(data, pos)
                end = run.end()  # type: ignore[union-attr]
                tok += data[pos:end]
                pos = end
                if len(tok) > self.max_bytes:
                    self._too_big()
                    continue
                if pos >= n:
                    break
                c = data[pos]
                pos += 1
                tok.append(c)
                if c == self._quote:
                    self._emit(_Tok.STRING)
                elif c == _BACKSLASH:
                    self._state = _Lex.ESCAPE
                else:
                    self._lex_error()
            elif state is _Lex.ESCAPE:
                c = data[pos]
                pos += 1
                tok.append(c)
                if c < 0x20 or c >= 0xFE:
                    self._lex_error()
                else:
                    self._state = _Lex.STRING
            elif state is _Lex.KEYWORD:
                end = _LETTERS.match(data, pos).end()  # type: ignore[union-attr]
                tok += data[pos:end]
                pos = end
                if len(tok) > self.max_bytes:
                    self._too_big()
                elif pos < n:
                    self._emit(_Tok.KEYWORD)
            else:
                pos = self._lex_number(data, pos)

        self._tok = tok

    def _lex_number(self, data: bytes, pos: int) -> int:
        tok = self._tok
        state = self._state
        if state in (_Lex.DIGITS, _Lex.FRACTION, _Lex.EXP_DIGITS):
            end = _DIGITS.match(data, pos).end()  # type: ignore[union-attr]
            tok += data[pos:end]
            pos = end
            if len(tok) > self.max_bytes:
                self._too_big()
                return pos
            if pos >= len(data):
                return pos
        c = data[pos]
        is_digit = 0x30 <= c <= 0x39
        if state is _Lex.NEG:
            if c == 0x30:
                self._state = _Lex.ZERO
            elif is_digit:
                self._state = _Lex.DIGITS
            else:
                tok.append(c)
                self._lex_error()
                return pos + 1
            tok.append(c)
            return pos + 1
        if state is _Lex.DOT or state is _Lex.EXP_SIGN:
            tok.append(c)
            if is_digit:
                self._state = _Lex.FRACTION if state is _Lex.DOT else _Lex.EXP_DIGITS
            else:
                self._lex_error()
            return pos + 1
        if state is _Lex.EXP:
            tok.append(c)
            if is_digit:
                self._state = _Lex.EXP_DIGITS
            elif c == 0x2B or c == 0x2D:
                self._state = _Lex.EXP_SIGN
            else:
                self._lex_error()
            return pos + 1
        # ZERO, DIGITS, FRACTION, EXP_DIGITS: the token may end here.
        if state is _Lex.ZERO and is_digit:
            tok.append(c)
            self._lex_error()
            return pos + 1
        if c == 0x2E and state in (_Lex.ZERO, _Lex.DIGITS):
            tok.append(c)
            self._state = _Lex.DOT
            return pos + 1
        # QEMU's lexer takes no exponent right after a bare zero: "0e5" is 0 then "e5".
        if (c == 0x65 or c == 0x45) and state in (_Lex.DIGITS, _Lex.FRACTION):
            tok.append(c)
            self._state = _Lex.EXP
            return pos + 1
        kind = _Tok.INTEGER if state in (_Lex.ZERO, _Lex.DIGITS) else _Tok.FLOAT
        self._emit(kind)
        return pos  # the terminating byte is looked at again

    def _lex_error(self) -> None:
        text = bytes(self._tok)
        self._tok.clear()
        self._state = _Lex.RECOVERY
        self._reset_message()
        self._out.append(
            JsonParseError(f"JSON parse error, stray '{_lossy(text).split(chr(0))[0]}'", text)
        )

    def _too_big(self) -> None:
        # QEMU hands the oversized partial token on and starts lexing afresh after it.
        self._tok.clear()
        self._state = _Lex.START
        self._reset_message()
        self._out.append(JsonParseError("JSON token size limit exceeded"))

    # -- streamer ------------------------------------------------------------------------

    def _emit(self, kind: _Tok) -> None:
        text = bytes(self._tok)
        self._tok.clear()
        self._state = _Lex.START
        if kind is _Tok.LCURLY:
            self._braces += 1
        elif kind is _Tok.RCURLY:
            self._braces -= 1
        elif kind is _Tok.LSQUARE:
            self._brackets += 1
        elif kind is _Tok.RSQUARE:
            self._brackets -= 1
        if self._msg_bytes + len(text) + 1 > self.max_bytes:
            self._limit("JSON token size limit exceeded")
            return
        if self._msg_tokens + 1 > self.max_tokens:
            self._limit("JSON token count limit exceeded")
            return
        if self._braces + self._brackets > self.max_depth:
            self._limit("JSON nesting depth limit exceeded")
            return
        self._msg_bytes += len(text)
        self._msg_tokens += 1
        self._parser.token(kind, text)
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return
        parser = self._parser
        self._reset_message()
        if parser.error is not None:
            self._out.append(JsonParseError("JSON parse error, " + parser.error))
        elif parser.complete:
            self._out.append(parser.result)
        else:  # unreachable for balanced input; kept as a safe answer
            self._out.append(JsonParseError("JSON parse error, premature EOI"))

    def _limit(self, desc: str) -> None:
        self._reset_message()
        self._out.append(JsonParseError(desc))


# -- output ------------------------------------------------------------------------------

_ESCAPE_SCAN = re.compile(r"(\\\\)|\\u([0-9a-f]{4})")


def _quote(s: str) -> str:
    out = json.dumps(s)  # ASCII-only; escapes control characters and non-ASCII as \uxxxx
    if "\\u" in out:
        # Upper-case hex as QEMU prints it. A literal "\u" in the text is "\\u" here, and the
        # regex only fires after an unescaped backslash because json.dumps doubles them.
        out = _ESCAPE_SCAN.sub(_upper_escape, out)
    if "\x7f" in out:
        out = out.replace("\x7f", "\\u007F")
    return out


def _upper_escape(m: re.Match[str]) -> str:
    if m.group(1):
        return m.group(1)
    return "\\u" + m.group(2).upper()


def _float(x: float) -> str:
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    return format(x, ".17g")


def to_json(value: object, *, pretty: bool = False, qdict: bool = True) -> str:
    """Serialise like QEMU: `", "` and `": "` separators, ASCII-only output with upper-case
    `\\uXXXX` escapes, floats as `%.17g`. With `qdict`, object members come out in QDict hash
    order (what qsd prints); otherwise in each dict's own order. `pretty` is QEMU's
    pretty-printer (4-space indent, empty containers still broken over two lines), with
    bare `\\n` line breaks: callers that need `\\r\\n` convert. Iterative, so values nested
    as deep as the parser accepts print without hitting Python's recursion limit."""
    out: list[str] = []
    # Open containers: (iterator over (key or None, child), closing bracket, level); `firsts`
    # says whether the container on the same depth has printed no member yet.
    stack: list[tuple[Iterator[tuple[str | None, object]], str, int]] = []
    firsts: list[bool] = []
    level = 0
    current: object = value
    key: str | None = None
    while True:
        if stack:
            entry_iter, closer, lvl = stack[-1]
            nxt = next(entry_iter, None)
            if nxt is None:
                stack.pop()
                firsts.pop()
                if pretty:
                    out.append("\n" + "    " * lvl + closer)
                else:
                    out.append(closer)
                if not stack:
                    break
                continue
            key, current = nxt
            if firsts[-1]:
                firsts[-1] = False
                if pretty:
                    out.append("\n" + "    " * (lvl + 1))
            elif pretty:
                out.append(",\n" + "    " * (lvl + 1))
            else:
                out.append(", ")
            if key is not None:
                out.append(_quote(key))
                out.append(": ")
            level = lvl + 1
        if isinstance(current, dict):
            keys = qdict_order(current) if qdict else list(current)
            out.append("{")
            stack.append((iter([(str(k), current[k]) for k in keys]), "}", level))
            firsts.append(True)
            continue
        if isinstance(current, list | tuple):
            out.append("[")
            stack.append((iter([(None, item) for item in current]), "]", level))
            firsts.append(True)
            continue
        out.append(_scalar_json(current))
        if not stack:
            break
    return "".join(out)


def _scalar_json(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return _float(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
