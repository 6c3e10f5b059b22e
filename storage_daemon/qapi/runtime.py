"""QAPI runtime: the input visitor (QMP JSON or keyval trees -> typed models) and `to_wire`.

Pure core (schema toolchain). Walks a value against the generated `TYPES` table exactly as
QEMU's input visitor does and raises `QmpError` with qsd 7.2's texts. Invariants: members are
visited in schema order (base, then the selected variant), unexpected members are reported only
after every known member, the first error wins, and a value that passes is returned as an
instance of the generated plain class (qapi_generated/plain.py; absent optional members left
unset, see `model_fields_set`). Nothing here imports pydantic: the daemon never loads it.
"""

from __future__ import annotations

import enum
import re
from typing import Any

from storage_daemon.errors import QmpError
from storage_daemon.qapi.plain_model import PlainModel
from storage_daemon.qapi.spec import CommandSpec, MemberSpec, TypeSpec
from storage_daemon.qapi_generated import plain
from storage_daemon.qapi_generated.commands import COMMANDS
from storage_daemon.qapi_generated.events import EVENTS
from storage_daemon.qapi_generated.types import TYPES
from storage_daemon.qdict import ghash_order

__all__ = [
    "COMMANDS",
    "EVENTS",
    "TYPES",
    "CommandSpec",
    "command_args",
    "member_docs",
    "schema_doc",
    "to_wire",
    "visit_input",
]

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1

# Narrow integer types: (min, max, C type named in the range error).
_NARROW = {
    "int8": (-(1 << 7), (1 << 7) - 1, "int8_t"),
    "int16": (-(1 << 15), (1 << 15) - 1, "int16_t"),
    "int32": (-(1 << 31), (1 << 31) - 1, "int32_t"),
    "uint8": (0, (1 << 8) - 1, "uint8_t"),
    "uint16": (0, (1 << 16) - 1, "uint16_t"),
    "uint32": (0, (1 << 32) - 1, "uint32_t"),
}
_SIGNED = {"int", "int8", "int16", "int32", "int64"}
_UNSIGNED = {"uint8", "uint16", "uint32", "uint64", "size"}

# strtoll/strtoull with base 0, whole string: optional blanks, sign, hex / octal / decimal.
_INT_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
# qemu_strtosz: decimal (optionally with a fraction) or hex, then an optional unit suffix.
_SIZE_RE = re.compile(
    r"[ \t\n\v\f\r]*(?:(0[xX][0-9a-fA-F]+)|([0-9]+)(?:\.([0-9]*))?)([bBkKmMgGtTpPeE]?)"
)
_SIZE_UNITS = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_FLOAT_RE = re.compile(
    r"[ \t\n\v\f\r]*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|0[xX][0-9a-fA-F]+(?:\.[0-9a-fA-F]*)?(?:[pP][+-]?[0-9]+)?)"
)
_TRUE = {"on", "yes", "true"}
_FALSE = {"off", "no", "false"}

Path = tuple[str | int, ...]


def _full(path: Path, keyval: bool = False) -> str:
    """QEMU's full member name: `a.b`; list elements as `a[0]`, or `a.0` in keyval input."""
    out = ""
    for seg in path:
        if isinstance(seg, int) and not keyval:
            out += f"[{seg}]"
        else:
            out += ("." if out else "") + str(seg)
    return out or "null"


def _bare(path: Path) -> str:
    """The member's own name; list elements have none, which QEMU prints as 'null'."""
    if path and isinstance(path[-1], str):
        return path[-1]
    return "null"


def _type_error(path: Path, expected: str, keyval: bool = False) -> QmpError:
    return QmpError(f"Invalid parameter type for '{_full(path, keyval)}', expected: {expected}")


def _value_error(name: str, expected: str) -> QmpError:
    return QmpError(f"Parameter '{name}' expects {expected}")


def _parse_int(text: str, unsigned: bool) -> int | None:
    m = _INT_RE.fullmatch(text)
    if m is None:
        return None
    sign, digits = m.groups()
    if digits[:2] in ("0x", "0X"):
        mag = int(digits[2:], 16)
    elif len(digits) > 1 and digits[0] == "0":
        mag = int(digits[1:], 8)
    else:
        mag = int(digits, 10)
    if unsigned:
        # strtoull: a leading '-' negates modulo 2**64 (so "-1" is UINT64_MAX)
        if mag > UINT64_MAX:
            return None
        return (-mag) & UINT64_MAX if sign == "-" else mag
    val = -mag if sign == "-" else mag
    return val if INT64_MIN <= val <= INT64_MAX else None


def _parse_size(text: str) -> int | None:
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        return None
    hexa, dec, frac, unit = m.groups()
    mul = 1024 ** _SIZE_UNITS[unit.lower()]
    if hexa is not None:
        val = int(hexa[2:], 16) * mul
    else:
        val = int(dec) * mul
        if frac is not None:
            if mul == 1:
                return None  # a fraction of a byte
            val += int(float("0." + (frac or "0")) * mul)
    return val if val <= UINT64_MAX else None


def _parse_number(text: str) -> float | None:
    if _FLOAT_RE.fullmatch(text) is None:
        return None
    s = text.strip()
    try:
        val = float.fromhex(s) if "x" in s.lower() else float(s)
    except ValueError:
        return None
    return val if val not in (float("inf"), float("-inf")) else None


class _Visitor:
    def __init__(self, keyval: bool) -> None:
        self.keyval = keyval

    def full(self, path: Path) -> str:
        return _full(path, self.keyval)

    def type_error(self, path: Path, expected: str) -> QmpError:
        return _type_error(path, expected, self.keyval)

    def visit(self, type_name: str, value: object, path: Path) -> Any:
        spec = TYPES.get(type_name)
        if spec is None:
            raise KeyError(f"unknown QAPI type {type_name!r}")
        if spec.kind == "builtin":
            return self.builtin(type_name, value, path)
        if spec.kind == "enum":
            return self.enum(spec, value, path)
        if spec.kind == "array":
            assert spec.element is not None
            if not isinstance(value, list):
                raise self.type_error(path, "array")
            return [self.visit(spec.element, item, (*path, i)) for i, item in enumerate(value)]
        if spec.kind == "alternate":
            return self.alternate(spec, value, path)
        return self.visit_object(spec, value, path)

    # ---- scalars ---------------------------------------------------------------------

    def keyval_str(self, value: object, path: Path) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, list)):
            raise QmpError(f"Parameters '{self.full(path)}.*' are unexpected")
        raise self.type_error(path, "string")

    def builtin(self, name: str, value: object, path: Path) -> Any:
        if name == "any":
            return value
        if name == "null":
            if value is not None:
                raise self.type_error(path, "null")
            return None
        if self.keyval:
            return self.builtin_keyval(name, self.keyval_str(value, path), path)
        if name == "str":
            if not isinstance(value, str):
                raise self.type_error(path, "string")
            return value
        if name == "bool":
            if not isinstance(value, bool):
                raise self.type_error(path, "boolean")
            return value
        if name == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.type_error(path, "number")
            return float(value)
        num = value if isinstance(value, int) and not isinstance(value, bool) else None
        if name in _SIGNED:
            if num is None or not (INT64_MIN <= num <= INT64_MAX):
                raise self.type_error(path, "integer")
            return self.narrow(name, num, path)
        # uint64 and size: QEMU accepts any int64 too and reinterprets it as unsigned
        if num is None or not (INT64_MIN <= num <= UINT64_MAX):
            raise _value_error(self.full(path), "uint64")
        return self.narrow(name, num & UINT64_MAX, path)

    def builtin_keyval(self, name: str, text: str, path: Path) -> Any:
        if name == "str":
            return text
        if name == "bool":
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise _value_error(self.full(path), "'on' or 'off'")
        if name == "number":
            num = _parse_number(text)
            if num is None:
                raise _value_error(self.full(path), "a number")
            return num
        if name == "size":
            size = _parse_size(text)
            if size is None:
                raise _value_error(self.full(path), "size")
            return size
        val = _parse_int(text, name in _UNSIGNED)
        if val is None:
            raise _value_error(self.full(path), "integer")
        return self.narrow(name, val, path)

    def narrow(self, name: str, val: int, path: Path) -> int:
        rng = _NARROW.get(name)
        if rng is not None and not (rng[0] <= val <= rng[1]):
            raise _value_error(_bare(path), rng[2])
        return val

    def enum(self, spec: TypeSpec, value: object, path: Path) -> Any:
        if self.keyval:
            text = self.keyval_str(value, path)
        elif isinstance(value, str):
            text = value
        else:
            raise self.type_error(path, "string")
        if text not in spec.values:
            raise QmpError(f"Parameter '{_bare(path)}' does not accept value '{text}'")
        assert spec.python is not None
        return getattr(plain, spec.python)(text)

    # ---- alternates ------------------------------------------------------------------

    def alternate(self, spec: TypeSpec, value: object, path: Path) -> Any:
        branch = self.pick_branch(spec, value)
        if branch is None:
            raise QmpError(f"Invalid parameter type for '{_bare(path)}', expected: {spec.name}")
        return self.visit(branch.type, value, path)

    def pick_branch(self, spec: TypeSpec, value: object) -> MemberSpec | None:
        kinds = {b.type: _json_class(b.type) for b in spec.branches}
        if isinstance(value, dict):
            want = "object"
        elif isinstance(value, str):
            want = "string"
            if self.keyval and "string" not in kinds.values():
                # keyval scalars are strings: fall back to the one scalar branch there is
                for b in spec.branches:
                    if kinds[b.type] in ("number", "boolean"):
                        return b
        elif isinstance(value, bool):
            want = "boolean"
        elif isinstance(value, (int, float)):
            want = "number"
        elif value is None:
            want = "null"
        else:
            return None
        if self.keyval and want not in ("object", "string"):
            return None
        for b in spec.branches:
            if kinds[b.type] == want:
                return b
        return None

    # ---- objects ---------------------------------------------------------------------

    def visit_object(self, spec: TypeSpec, value: object, path: Path) -> Any:
        if not isinstance(value, dict):
            raise self.type_error(path, "object")
        fields: dict[str, Any] = {}
        seen: set[str] = set()
        self.members(spec.members, value, path, fields, seen)
        cls_name = spec.python
        if spec.tag is not None:
            tag = fields[_field_of(spec, spec.tag)]
            variant = next(v for v in spec.variants if v.case == str(tag.value))
            self.members(TYPES[variant.type].members, value, path, fields, seen)
            cls_name = variant.python
        # QEMU finds leftovers by walking a GLib hash table: report the first in its order.
        for key in ghash_order(value):
            if key not in seen:
                raise QmpError(f"Parameter '{self.full((*path, key))}' is unexpected")
        assert cls_name is not None
        cls: type[PlainModel] = getattr(plain, cls_name)
        return cls.model_construct(**fields)

    def members(
        self,
        members: tuple[MemberSpec, ...],
        value: dict[str, object],
        path: Path,
        fields: dict[str, Any],
        seen: set[str],
    ) -> None:
        for m in members:
            if m.name in value:
                seen.add(m.name)
                fields[m.field] = self.visit(m.type, value[m.name], (*path, m.name))
            elif not m.optional:
                raise QmpError(f"Parameter '{self.full((*path, m.name))}' is missing")


def _field_of(spec: TypeSpec, wire: str) -> str:
    return next(m.field for m in spec.members if m.name == wire)


def _json_class(type_name: str) -> str:
    spec = TYPES[type_name]
    if spec.kind == "enum":
        return "string"
    if spec.kind in ("object", "array"):
        return spec.kind
    return {
        "str": "string",
        "bool": "boolean",
        "null": "null",
        "any": "value",
    }.get(type_name, "number")


def visit_input(type_name: str, value: object, *, keyval: bool = False) -> Any:
    """Validate `value` against schema type `type_name` and build the typed result.

    QMP mode (default) is strict JSON typing; `keyval=True` takes a tree of dicts, lists and
    strings and converts scalar strings (integers, sizes, booleans, numbers) as qsd does.
    Raises `QmpError` with qsd's exact wording on the first problem found.
    """
    return _Visitor(keyval).visit(type_name, value, ())


def command_args(name: str, arguments: dict[str, Any] | None, *, keyval: bool = False) -> Any:
    """Visit a command's arguments: the model instance, or None for commands without any."""
    spec = COMMANDS[name]
    args: dict[str, Any] = {} if arguments is None else arguments
    if spec.arg_type is None:
        for key in ghash_order(args):
            raise QmpError(f"Parameter '{key}' is unexpected")
        return None
    return visit_input(spec.arg_type, args, keyval=keyval)


def to_wire(value: Any) -> Any:
    """Models and enums -> JSON-able values with wire (kebab-case) names.

    Absent optional members are omitted; a member that is None is written as JSON null only
    when it was set explicitly and its type admits null (e.g. `backing: null`).
    """
    # A plain object or a pydantic model (both have these members): no pydantic import.
    if hasattr(value, "model_fields_set"):
        out: dict[str, Any] = {}
        nullable: frozenset[str] = getattr(type(value), "qapi_nullable", frozenset())
        for name, info in type(value).model_fields.items():
            item = getattr(value, name)
            if item is None and not (name in nullable and name in value.model_fields_set):
                continue
            out[info.alias or name] = to_wire(item)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_wire(v) for k, v in value.items()}
    return value


def schema_doc(type_name: str) -> str:
    """The documentation paragraph of a schema type (or command, by command name)."""
    if type_name in COMMANDS:
        return COMMANDS[type_name].doc
    return TYPES[type_name].doc


def member_docs(type_name: str, case: str | None = None) -> list[MemberSpec]:
    """Members of an object type (with docs), plus the members of union branch `case`."""
    spec = TYPES[type_name]
    out = list(spec.members)
    if case is not None:
        for v in spec.variants:
            if v.case == case:
                out += TYPES[v.type].members
    return out
