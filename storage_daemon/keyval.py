"""QEMU's keyval option syntax, its JSON option form, and the scalar parsers behind them.

Pure ring: text in, trees of dicts/lists/strings (or JSON values) out; no I/O. Every error is a
`KeyvalError` whose message is byte-for-byte what qemu-storage-daemon 7.2 prints after
`PROG: --option ARG: `; keep the messages and the order in which errors are detected intact.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "KEY_FRAGMENT_MAX",
    "KeyvalError",
    "format_keyval",
    "is_help_option",
    "is_help_request",
    "parse_bool",
    "parse_int",
    "parse_json_option",
    "parse_keyval",
    "parse_keyval_help",
    "parse_size",
    "parse_size_checked",
    "parse_uint",
]

# A key fragment (the text between dots) of this many characters or more is "too long".
KEY_FRAGMENT_MAX = 127

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_INDEX_RE = re.compile(r"[0-9]+")


class KeyvalError(ValueError):
    """A keyval/JSON/number syntax error with qsd's exact wording.

    `hint` holds the extra line(s) qsd prints after the message (without trailing newline),
    e.g. the "Identifiers consist of ..." line; None when there is none.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def is_help_option(text: str) -> bool:
    """QEMU's is_help_option(): `help` or `?`."""
    return text in ("help", "?")


# ---- keyval ---------------------------------------------------------------------------------


def _parse_one(
    root: dict[str, Any], text: str, pos: int, implied_key: str | None
) -> tuple[int, bool]:
    """Parse the element at `pos`; return (position after it, whether it was a help request)."""
    end_key = pos
    while end_key < len(text) and text[end_key] not in "=,":
        end_key += 1
    klen = end_key - pos
    if klen and (end_key == len(text) or text[end_key] != "="):
        if is_help_option(text[pos:end_key]):
            return (end_key + 1 if end_key < len(text) else end_key), True
        if implied_key is not None:
            # "VALUE" stands for "IMPLIED=VALUE"; the value ends at the first ',' (no escaping)
            _put_path(root, implied_key, [implied_key], text[pos:end_key])
            return (end_key + 1 if end_key < len(text) else end_key), False
    key = text[pos:end_key]
    fragments: list[str] = []
    s = 0
    while True:
        frag_m = (
            _INDEX_RE.match(key, s) if s and key[s : s + 1].isdigit() else _NAME_RE.match(key, s)
        )
        flen = frag_m.end() - s if frag_m else 0
        if not flen or (s + flen < len(key) and key[s + flen] != "."):
            raise KeyvalError(f"Invalid parameter '{key}'")
        if flen > KEY_FRAGMENT_MAX:
            whole = s == 0 and flen == len(key)
            word = "Parameter" if whole else "Parameter fragment"
            raise KeyvalError(f"{word} '{key[s : s + flen]}' is too long")
        fragments.append(key[s : s + flen])
        s += flen
        if s >= len(key):
            break
        s += 1  # the '.'
    if end_key >= len(text) or text[end_key] != "=":
        raise KeyvalError(f"Expected '=' after parameter '{key}'")
    i = end_key + 1
    chars: list[str] = []
    while i < len(text):
        if text[i] == ",":
            i += 1
            if i >= len(text) or text[i] != ",":
                break
        chars.append(text[i])
        i += 1
    value = "".join(chars)
    _put_path(root, key, fragments, value)
    return i, False


def _put_path(root: dict[str, Any], key: str, fragments: list[str], value: str) -> None:
    cur = root
    for n, frag in enumerate(fragments[:-1]):
        old = cur.get(frag)
        if old is None:
            old = cur[frag] = {}
        elif not isinstance(old, dict):
            prefix = ".".join(fragments[: n + 1])
            raise KeyvalError(f"Parameters '{prefix}.*' used inconsistently")
        cur = old
    last = fragments[-1]
    if isinstance(cur.get(last), dict):
        raise KeyvalError(f"Parameters '{key}.*' used inconsistently")
    cur[last] = value


def _listify(cur: dict[str, Any], path: str) -> dict[str, Any] | list[Any]:
    has_index = has_member = False
    for k, v in list(cur.items()):
        if k[:1].isdigit():
            has_index = True
        else:
            has_member = True
        if isinstance(v, dict):
            cur[k] = _listify(v, f"{path}{k}.")
    if has_index and has_member:
        raise KeyvalError(f"Parameters '{path}*' used inconsistently")
    if not has_index:
        return cur
    slots: dict[int, Any] = {}
    for k, v in cur.items():
        slots[int(k)] = v  # "1" and "01" share a slot; the later one wins
    items = []
    for i in range(len(cur)):
        if i not in slots:
            raise KeyvalError(f"Parameter '{path}{i}' missing")
        items.append(slots[i])
    return items


def parse_keyval_help(text: str, implied_key: str | None) -> tuple[dict[str, Any], bool]:
    """Parse keyval `text`; return (tree, help requested).

    The tree holds dicts, lists and string leaves. A `help` or `?` element (no `=`) anywhere
    asks for help; parsing still continues and its errors still win.
    """
    root: dict[str, Any] = {}
    wants_help = False
    pos = 0
    implied = implied_key
    while pos < len(text):
        pos, helped = _parse_one(root, text, pos, implied)
        wants_help = wants_help or helped
        implied = None
    tree = _listify(root, "")
    assert isinstance(tree, dict)  # top-level keys are never indices
    return tree, wants_help


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse keyval `text` for an option that offers no help."""
    tree, wants_help = parse_keyval_help(text, implied_key)
    if wants_help:
        raise KeyvalError("Help is not available for this option")
    return tree


def is_help_request(text: str, implied_key: str | None) -> tuple[bool, str | None]:
    """Whether keyval `text` asks for help, and the implied key's value if it has one.

    `--object help` -> (True, None); `--object iothread,help` -> (True, "iothread");
    `--blockdev driver=help` -> (False, ...): a value of `help` is not a help request.
    Text that does not parse is not a help request (the caller will report the error).
    """
    if text.startswith("{"):
        return False, None
    try:
        tree, wants_help = parse_keyval_help(text, implied_key)
    except KeyvalError:
        return False, None
    value = tree.get(implied_key) if implied_key is not None else None
    return wants_help, value if isinstance(value, str) else None


def format_keyval(tree: dict[str, Any]) -> str:
    """Inverse of parse_keyval (no implied key) for trees of non-empty dicts/lists and strings."""
    parts: list[str] = []

    def walk_child(node: Any, key: str) -> None:
        if isinstance(node, (dict, list)):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                walk_child(v, f"{key}.{k}")
        else:
            parts.append(f"{key}={str(node).replace(',', ',,')}")

    for k, v in tree.items():
        walk_child(v, k)
    return ",".join(parts)


# ---- JSON (QEMU's lexer/streamer/parser semantics) ----------------------------------------


def parse_json_option(text: str) -> Any:
    """Parse an option argument in JSON form, with QEMU's error texts.

    The same parser as QMP input (QEMU uses one JSON parser for both): single-quoted strings
    are accepted, integers beyond uint64 become floats. Exactly one JSON value is allowed.
    """
    from storage_daemon.monitor.jsonstream import JsonParseError, JsonStream

    stream = JsonStream()
    items = stream.feed(text.encode("utf-8", errors="surrogateescape"))
    items += stream.finish()
    if not items:
        raise KeyvalError("JSON parse error, premature EOI")
    first = items[0]
    if isinstance(first, JsonParseError):
        if first.stray is not None:  # stderr quotes the bytes as they were given
            stray = first.stray.decode("utf-8", errors="surrogateescape").split("\0")[0]
            raise KeyvalError(f"JSON parse error, stray '{stray}'")
        raise KeyvalError(first.desc)
    if len(items) > 1:
        raise KeyvalError("Expecting at most one JSON value")
    return first


# ---- scalars ---------------------------------------------------------------------------------

_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})
_C_SPACE = " \t\n\v\f\r"
_STRTOL_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_U64 = 2**64


def parse_bool(text: str) -> bool | None:
    """QEMU's qapi_bool_parse: on/yes/true/y and off/no/false/n (case-sensitive)."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def _strtol_base0(text: str) -> tuple[str, int] | None:
    m = _STRTOL_RE.fullmatch(text)
    if m is None:
        return None
    sign, digits = m.groups()
    if digits[:2] in ("0x", "0X"):
        mag = int(digits[2:], 16)
    else:
        mag = int(digits, 8) if digits.startswith("0") else int(digits)
    return sign, mag


def parse_int(text: str) -> int | None:
    """QEMU's qemu_strtoi64(text, NULL, 0): decimal, 0x hex, 0 octal, sign, leading blanks."""
    got = _strtol_base0(text)
    if got is None:
        return None
    sign, mag = got
    val = -mag if sign == "-" else mag
    return val if -(2**63) <= val < 2**63 else None


def parse_uint(text: str) -> int | None:
    """QEMU's qemu_strtou64(text, NULL, 0): like strtoull, `-N` wraps modulo 2**64."""
    got = _strtol_base0(text)
    if got is None:
        return None
    sign, mag = got
    if mag >= _U64:
        return None
    return (-mag) % _U64 if sign == "-" else mag


_SUFFIX = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_DEC_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_HEX_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?(?:0[xX]([0-9a-fA-F]+)|0)")
_FRAC_RE = re.compile(r"\.([0-9]*)(?:([eE][+-]?[0-9]+))?")


def parse_size_checked(text: str) -> tuple[int, bool]:
    """QEMU 7.2's qemu_strtosz: return (bytes, hex-with-suffix deprecation applies).

    Raises ValueError for malformed or negative input and OverflowError for values of 2**64
    or more (qsd words those two cases differently).
    """
    m = _DEC_RE.match(text)
    if m is None:
        raise ValueError(text)
    end = m.end()
    val = int(m.group().strip(_C_SPACE))
    if abs(val) >= _U64:
        raise OverflowError(text)
    if "-" in m.group():
        raise ValueError(text)
    valf = 0
    hexa = False
    if val == 0 and text[end : end + 1] in ("x", "X"):
        h = _HEX_RE.match(text)
        assert h is not None
        if h.group(1) is not None:
            val = int(h.group(1), 16)
            if val >= _U64:
                raise OverflowError(text)
        end = h.end()
        if text[end : end + 1] == ".":
            raise ValueError(text)
        hexa = True
    elif text[end : end + 1] == ".":
        f = _FRAC_RE.match(text, end)
        assert f is not None
        if f.group(2) is not None and f.group(1):
            raise ValueError(text)  # an exponent: not a size
        if f.group(1):
            valf = min(int(float("0." + f.group(1)) * 2.0**64), _U64 - 1)
            end = end + 1 + len(f.group(1))
        else:
            end += 1  # "5." and "1.k" mean no fraction at all
    suffix = text[end : end + 1].upper()
    warn = False
    if suffix and suffix in _SUFFIX:
        mul = 1024 ** _SUFFIX[suffix]
        warn = hexa
        end += 1
    else:
        mul = 1
    if end != len(text):
        raise ValueError(text)
    if mul == 1:
        if valf:
            raise ValueError(text)  # a fraction needs a unit
        return val, warn
    prod = valf * mul
    total = val * mul + (prod >> 64) + ((prod >> 63) & 1)
    if total >= _U64:
        raise OverflowError(text)
    return total, warn


def parse_size(text: str) -> int | None:
    """A QEMU size (`1.5G`, `512`, `4k`; 1024-based); None when malformed, negative or >= 2**64."""
    try:
        return parse_size_checked(text)[0]
    except (ValueError, OverflowError):
        return None
