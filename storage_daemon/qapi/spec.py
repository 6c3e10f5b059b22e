"""Plain records describing the resolved schema at run time (what the generated tables hold).

Pure core (schema toolchain). Invariant: these are immutable data, imported by the generated
modules and by `runtime`; nothing here imports generated code, so there is no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemberSpec:
    """One member of an object type (or one branch of an alternate)."""

    name: str  # wire name, e.g. "node-name"
    field: str  # Python attribute, e.g. "node_name"
    type: str  # schema type name, e.g. "str", "BlockdevCacheOptions", "strList"
    optional: bool = False
    doc: str = ""
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class VariantSpec:
    """One branch of a flat union: tag value, the variant struct, and the Python branch class."""

    case: str
    type: str  # "q_empty" when the branch adds no members
    python: str


@dataclass(frozen=True)
class TypeSpec:
    """A schema type. `kind` is builtin, enum, array, object or alternate."""

    name: str
    kind: str
    doc: str = ""
    python: str | None = None  # model class (struct) or enum class in qapi_generated.models
    members: tuple[MemberSpec, ...] = ()  # object: all members, base first, schema order
    tag: str | None = None  # union discriminator member name
    variants: tuple[VariantSpec, ...] = ()
    values: tuple[str, ...] = ()  # enum values, schema order
    value_docs: tuple[str, ...] = ()
    element: str | None = None  # array element type
    branches: tuple[MemberSpec, ...] = ()  # alternate branches
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class CommandSpec:
    """A QMP command as the dispatcher needs it."""

    name: str
    arg_type: str | None
    ret_type: str | None
    boxed: bool
    allow_oob: bool
    coroutine: bool
    features: tuple[str, ...]
    doc: str
