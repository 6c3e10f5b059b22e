"""Plain records describing the resolved schema at run time (what the generated tables hold).

Pure core (schema toolchain). Invariant: these are immutable data, imported by the generated
modules and by `runtime`; nothing here imports generated code, so there is no import cycle.
They are plain slotted classes, not dataclasses: every daemon start imports them, and a
dataclass definition costs about a millisecond.
"""

from __future__ import annotations

from typing import Any, ClassVar


class _Record:
    """Immutable record: equality, hash and repr over its slots, in declaration order."""

    __slots__: ClassVar[tuple[str, ...]] = ()
    _FIELDS: ClassVar[tuple[str, ...]] = ()  # declaration order

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, _Record)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._FIELDS)
        return f"{self.__class__.__name__}({fields})"


_set = object.__setattr__


class MemberSpec(_Record):
    """One member of an object type (or one branch of an alternate)."""

    _FIELDS: ClassVar[tuple[str, ...]] = ("name", "field", "type", "optional", "doc", "features")
    __slots__ = _FIELDS
    name: str  # wire name, e.g. "node-name"
    field: str  # Python attribute, e.g. "node_name"
    type: str  # schema type name, e.g. "str", "BlockdevCacheOptions", "strList"
    optional: bool
    doc: str
    features: tuple[str, ...]

    def __init__(
        self,
        name: str,
        field: str,
        type: str,
        optional: bool = False,
        doc: str = "",
        features: tuple[str, ...] = (),
    ) -> None:
        _set(self, "name", name)
        _set(self, "field", field)
        _set(self, "type", type)
        _set(self, "optional", optional)
        _set(self, "doc", doc)
        _set(self, "features", features)


class VariantSpec(_Record):
    """One branch of a flat union: tag value, the variant struct, and the Python branch class."""

    _FIELDS: ClassVar[tuple[str, ...]] = ("case", "type", "python")
    __slots__ = _FIELDS
    case: str
    type: str  # "q_empty" when the branch adds no members
    python: str

    def __init__(self, case: str, type: str, python: str) -> None:
        _set(self, "case", case)
        _set(self, "type", type)
        _set(self, "python", python)


class TypeSpec(_Record):
    """A schema type. `kind` is builtin, enum, array, object or alternate."""

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "name",
        "kind",
        "doc",
        "python",
        "members",
        "tag",
        "variants",
        "values",
        "value_docs",
        "element",
        "branches",
        "features",
    )
    __slots__ = _FIELDS
    name: str
    kind: str
    doc: str
    python: str | None  # plain class (struct) or enum class in qapi_generated.plain
    members: tuple[MemberSpec, ...]  # object: all members, base first, schema order
    tag: str | None  # union discriminator member name
    variants: tuple[VariantSpec, ...]
    values: tuple[str, ...]  # enum values, schema order
    value_docs: tuple[str, ...]
    element: str | None  # array element type
    branches: tuple[MemberSpec, ...]  # alternate branches
    features: tuple[str, ...]

    def __init__(
        self,
        name: str,
        kind: str,
        doc: str = "",
        python: str | None = None,
        members: tuple[MemberSpec, ...] = (),
        tag: str | None = None,
        variants: tuple[VariantSpec, ...] = (),
        values: tuple[str, ...] = (),
        value_docs: tuple[str, ...] = (),
        element: str | None = None,
        branches: tuple[MemberSpec, ...] = (),
        features: tuple[str, ...] = (),
    ) -> None:
        _set(self, "name", name)
        _set(self, "kind", kind)
        _set(self, "doc", doc)
        _set(self, "python", python)
        _set(self, "members", members)
        _set(self, "tag", tag)
        _set(self, "variants", variants)
        _set(self, "values", values)
        _set(self, "value_docs", value_docs)
        _set(self, "element", element)
        _set(self, "branches", branches)
        _set(self, "features", features)


class CommandSpec(_Record):
    """A QMP command as the dispatcher needs it."""

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "name",
        "arg_type",
        "ret_type",
        "boxed",
        "allow_oob",
        "coroutine",
        "features",
        "doc",
    )
    __slots__ = _FIELDS
    name: str
    arg_type: str | None
    ret_type: str | None
    boxed: bool
    allow_oob: bool
    coroutine: bool
    features: tuple[str, ...]
    doc: str

    def __init__(
        self,
        name: str,
        arg_type: str | None,
        ret_type: str | None,
        boxed: bool,
        allow_oob: bool,
        coroutine: bool,
        features: tuple[str, ...],
        doc: str,
    ) -> None:
        _set(self, "name", name)
        _set(self, "arg_type", arg_type)
        _set(self, "ret_type", ret_type)
        _set(self, "boxed", boxed)
        _set(self, "allow_oob", allow_oob)
        _set(self, "coroutine", coroutine)
        _set(self, "features", features)
        _set(self, "doc", doc)
