"""QAPI semantic model: checked expressions -> resolved entities (types, commands, events).

Pure core (schema toolchain). Invariant: once `Schema(...)` returns, every type reference is
resolved, every union/alternate is well formed, every member is documented, and entity order
is definition order (include files expanded in place), which generated output relies on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from storage_daemon.qapi.parser import DocBlock, Expression, Info, QAPIError, Value

# name -> (JSON type used by introspection, keyval/QMP behaviour class)
BUILTINS: dict[str, str] = {
    "str": "string",
    "number": "number",
    "int": "int",
    "int8": "int",
    "int16": "int",
    "int32": "int",
    "int64": "int",
    "uint8": "int",
    "uint16": "int",
    "uint32": "int",
    "uint64": "int",
    "size": "int",
    "bool": "boolean",
    "null": "null",
    "any": "value",
}

_MEMBER_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_COMMAND_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_EVENT_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_ENUM_VALUE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def camel(name: str) -> str:
    """`query-named-block-nodes` / `BLOCK_JOB_READY` -> `QueryNamedBlockNodes` / `BlockJobReady`."""
    return "".join(part[:1].upper() + part[1:].lower() for part in re.split(r"[-_]", name) if part)


@dataclass(eq=False)
class Entity:
    name: str
    info: Info | None
    doc: str = ""
    features: tuple[str, ...] = ()


@dataclass(eq=False)
class Type(Entity):
    def json_type(self) -> str:
        raise NotImplementedError


@dataclass(eq=False)
class BuiltinType(Type):
    def json_type(self) -> str:
        return BUILTINS[self.name]


@dataclass(eq=False)
class EnumValue:
    name: str
    doc: str = ""
    features: tuple[str, ...] = ()


@dataclass(eq=False)
class EnumType(Type):
    values: list[EnumValue] = field(default_factory=list)

    def json_type(self) -> str:
        return "string"


@dataclass(eq=False)
class ArrayType(Type):
    element: Type | None = None

    def json_type(self) -> str:
        return "array"


@dataclass(eq=False)
class Member:
    name: str
    type: Type
    optional: bool
    info: Info | None
    doc: str = ""
    features: tuple[str, ...] = ()


@dataclass(eq=False)
class Variant:
    case: str
    type: ObjectType


@dataclass(eq=False)
class ObjectType(Type):
    """A struct, a flat union (with `tag`/`variants`) or an implicit arguments struct."""

    base: ObjectType | None = None
    local_members: list[Member] = field(default_factory=list)
    tag: str | None = None
    variants: list[Variant] = field(default_factory=list)
    implicit: bool = False
    meta: str = "struct"

    @property
    def members(self) -> list[Member]:
        return (self.base.members if self.base else []) + self.local_members

    def json_type(self) -> str:
        return "object"

    def is_union(self) -> bool:
        return self.tag is not None


@dataclass(eq=False)
class AlternateType(Type):
    branches: list[Member] = field(default_factory=list)

    def json_type(self) -> str:
        return "value"


@dataclass(eq=False)
class Command(Entity):
    arg_type: ObjectType | None = None
    ret_type: Type | None = None
    boxed: bool = False
    allow_oob: bool = False
    coroutine: bool = False


@dataclass(eq=False)
class Event(Entity):
    arg_type: ObjectType | None = None
    boxed: bool = False


def _check_keys(
    expr: dict[str, Value], info: Info, meta: str, required: set[str], allowed: set[str]
) -> None:
    for key in expr:
        if key not in required | allowed | {meta}:
            raise QAPIError(info, f"{meta} '{expr[meta]}' has unknown key '{key}'")
    for key in sorted(required):
        if key not in expr:
            raise QAPIError(info, f"{meta} '{expr[meta]}' lacks key '{key}'")


def _features(value: Value | None, info: Info, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise QAPIError(info, f"{what}: 'features' must be a list of strings")
    return tuple(str(f) for f in value)


@dataclass
class _Pending:
    """A type reference to resolve once every definition is known."""

    ref: Value
    info: Info
    what: str


class Schema:
    """The checked, resolved schema; `entities` is in definition order."""

    def __init__(self, exprs: list[Expression]) -> None:
        self.entities: list[Entity] = []
        self.types: dict[str, Type] = {}
        self.commands: dict[str, Command] = {}
        self.events: dict[str, Event] = {}
        for name in BUILTINS:
            self.types[name] = BuiltinType(name, None)
        self.the_empty_object = ObjectType("q_empty", None, implicit=True)
        self.types["q_empty"] = self.the_empty_object
        self._exprs = exprs
        self._define_all()
        self._resolve_all()
        self._check_docs()
        self._check_all()

    # ---- pass 1: define names --------------------------------------------------------

    def _add_type(self, typ: Type, info: Info) -> None:
        if typ.name in self.types:
            other = self.types[typ.name]
            where = f" at {other.info}" if other.info else " (built-in)"
            raise QAPIError(info, f"'{typ.name}' is already defined{where}")
        self.types[typ.name] = typ
        self.entities.append(typ)

    def _define_all(self) -> None:
        self._raw: dict[int, tuple[Expression, Entity]] = {}
        for ex in self._exprs:
            e, info = ex.expr, ex.info
            metas = [
                m for m in ("enum", "struct", "union", "alternate", "command", "event") if m in e
            ]
            if len(metas) != 1:
                raise QAPIError(
                    info,
                    "expression must have exactly one of 'enum', 'struct', 'union', 'alternate', 'command', 'event'",
                )
            meta = metas[0]
            name = e[meta]
            if not isinstance(name, str):
                raise QAPIError(info, f"'{meta}' requires a string name")
            doc = ex.doc
            if doc is None:
                raise QAPIError(info, f"{meta} '{name}' lacks documentation")
            if doc.symbol != name:
                raise QAPIError(doc.info, f"documentation is for '{doc.symbol}', not '{name}'")
            feats = _features(e.get("features"), info, f"{meta} '{name}'")
            ent: Entity
            if meta in ("enum", "struct", "union", "alternate"):
                if not _TYPE_RE.match(name):
                    raise QAPIError(info, f"{meta} name '{name}' should use CamelCase")
                if name.endswith("List"):
                    raise QAPIError(info, f"{meta} name '{name}' must not end with 'List'")
            if meta == "enum":
                _check_keys(e, info, meta, {"data"}, {"features"})
                ent = EnumType(name, info, doc.body, feats)
                self._add_type(ent, info)
            elif meta == "struct":
                _check_keys(e, info, meta, {"data"}, {"base", "features"})
                ent = ObjectType(name, info, doc.body, feats)
                self._add_type(ent, info)
            elif meta == "union":
                _check_keys(e, info, meta, {"data", "base", "discriminator"}, {"features"})
                ent = ObjectType(name, info, doc.body, feats, meta="union")
                self._add_type(ent, info)
            elif meta == "alternate":
                _check_keys(e, info, meta, {"data"}, {"features"})
                ent = AlternateType(name, info, doc.body, feats)
                self._add_type(ent, info)
            elif meta == "command":
                _check_keys(
                    e,
                    info,
                    meta,
                    set(),
                    {"data", "returns", "boxed", "allow-oob", "coroutine", "features"},
                )
                if not _COMMAND_RE.match(name):
                    raise QAPIError(info, f"command name '{name}' should use lowercase and '-'")
                if name in self.commands:
                    raise QAPIError(info, f"command '{name}' is already defined")
                ent = Command(name, info, doc.body, feats)
                for key in ("boxed", "allow-oob", "coroutine"):
                    if key in e and not isinstance(e[key], bool):
                        raise QAPIError(info, f"command '{name}': '{key}' must be true or false")
                ent.boxed = bool(e.get("boxed", False))
                ent.allow_oob = bool(e.get("allow-oob", False))
                ent.coroutine = bool(e.get("coroutine", False))
                self.commands[name] = ent
                self.entities.append(ent)
            else:
                _check_keys(e, info, meta, set(), {"data", "boxed", "features"})
                if not _EVENT_RE.match(name):
                    raise QAPIError(info, f"event name '{name}' should be ALL_CAPS")
                if name in self.events:
                    raise QAPIError(info, f"event '{name}' is already defined")
                ent = Event(name, info, doc.body, feats)
                if "boxed" in e and not isinstance(e["boxed"], bool):
                    raise QAPIError(info, f"event '{name}': 'boxed' must be true or false")
                ent.boxed = bool(e.get("boxed", False))
                self.events[name] = ent
                self.entities.append(ent)
            self._raw[id(ent)] = (ex, ent)

    # ---- pass 2: resolve references --------------------------------------------------

    def _lookup(self, ref: Value, info: Info, what: str) -> Type:
        if isinstance(ref, list):
            if len(ref) != 1 or not isinstance(ref[0], str):
                raise QAPIError(info, f"{what}: array type must contain exactly one type name")
            elem = self._lookup(ref[0], info, what)
            name = f"{elem.name}List"
            typ = self.types.get(name)
            if typ is None:
                typ = ArrayType(name, None, element=elem)
                self.types[name] = typ
            return typ
        if not isinstance(ref, str):
            raise QAPIError(info, f"{what} should be a type name")
        typ = self.types.get(ref)
        if typ is None or typ is self.the_empty_object:
            raise QAPIError(info, f"{what} uses unknown type '{ref}'")
        return typ

    def _members(self, data: Value, info: Info, owner: str, doc: DocBlock | None) -> list[Member]:
        if not isinstance(data, dict):
            raise QAPIError(info, f"'data' for {owner} should be an object")
        out: list[Member] = []
        for key, ref in data.items():
            optional = key.startswith("*")
            name = key[1:] if optional else key
            if not _MEMBER_RE.match(name):
                raise QAPIError(info, f"{owner} member '{name}' has an invalid name")
            feats: tuple[str, ...] = ()
            if isinstance(ref, dict):
                for k in ref:
                    if k not in ("type", "features"):
                        raise QAPIError(info, f"{owner} member '{name}' has unknown key '{k}'")
                if "type" not in ref:
                    raise QAPIError(info, f"{owner} member '{name}' lacks key 'type'")
                feats = _features(ref.get("features"), info, f"{owner} member '{name}'")
                ref = ref["type"]
            typ = self._lookup(ref, info, f"{owner} member '{name}'")
            mdoc = doc.args.get(name) if doc else None
            if doc is not None:
                self._doc_used.setdefault(id(doc), set()).add(name)
            if doc is not None and not mdoc:
                raise QAPIError(doc.info, f"{owner} member '{name}' lacks documentation")
            out.append(Member(name, typ, optional, info, mdoc or "", feats))
        return out

    def _implicit(
        self, name: str, data: Value, info: Info, owner: str, doc: DocBlock | None
    ) -> ObjectType:
        if name in self.types:
            raise QAPIError(info, f"implicit type name '{name}' for {owner} is already taken")
        obj = ObjectType(name, info, "", implicit=True)
        obj.local_members = self._members(data, info, owner, doc)
        self.types[name] = obj
        return obj

    def _struct_ref(self, ref: Value, info: Info, what: str) -> ObjectType:
        typ = self._lookup(ref, info, what)
        if not isinstance(typ, ObjectType) or typ.is_union():
            raise QAPIError(info, f"{what} '{typ.name}' is not a struct")
        return typ

    def _resolve_all(self) -> None:
        self._doc_used: dict[int, set[str]] = {}
        for ex, ent in self._raw.values():
            e, info, doc = ex.expr, ex.info, ex.doc
            meta = next(
                m for m in ("enum", "struct", "union", "alternate", "command", "event") if m in e
            )
            owner = f"{meta} '{ent.name}'"
            if isinstance(ent, EnumType):
                data = e["data"]
                if not isinstance(data, list) or not data:
                    raise QAPIError(info, f"{owner}: 'data' must be a non-empty list")
                seen: set[str] = set()
                for item in data:
                    vfeats: tuple[str, ...] = ()
                    if isinstance(item, dict):
                        vname = item.get("name")
                        vfeats = _features(item.get("features"), info, owner)
                    else:
                        vname = item
                    if not isinstance(vname, str) or not _ENUM_VALUE_RE.match(vname):
                        raise QAPIError(info, f"{owner} has an invalid value {vname!r}")
                    if vname in seen:
                        raise QAPIError(info, f"{owner} value '{vname}' is duplicated")
                    seen.add(vname)
                    vdoc = doc.args.get(vname) if doc else None
                    if doc is not None:
                        self._doc_used.setdefault(id(doc), set()).add(vname)
                    if not vdoc:
                        raise QAPIError(
                            doc.info if doc else info,
                            f"{owner} value '{vname}' lacks documentation",
                        )
                    ent.values.append(EnumValue(vname, vdoc, vfeats))
            elif isinstance(ent, ObjectType) and ent.meta == "struct":
                ent.local_members = self._members(e["data"], info, owner, doc)
                if "base" in e:
                    ent.base = self._struct_ref(e["base"], info, f"{owner} base")
            elif isinstance(ent, ObjectType):
                base = e["base"]
                if isinstance(base, dict):
                    ent.base = self._implicit(f"{ent.name}Base", base, info, owner, doc)
                else:
                    ent.base = self._struct_ref(base, info, f"{owner} base")
                disc = e["discriminator"]
                if not isinstance(disc, str):
                    raise QAPIError(info, f"{owner}: 'discriminator' must be a string")
                ent.tag = disc
                data = e["data"]
                if not isinstance(data, dict) or not data:
                    raise QAPIError(info, f"{owner}: 'data' must be a non-empty object")
                for case, ref in data.items():
                    ent.variants.append(
                        Variant(case, self._struct_ref(ref, info, f"{owner} branch '{case}'"))
                    )
            elif isinstance(ent, AlternateType):
                data = e["data"]
                if not isinstance(data, dict) or not data:
                    raise QAPIError(info, f"{owner}: 'data' must be a non-empty object")
                for bname, ref in data.items():
                    typ = self._lookup(ref, info, f"{owner} branch '{bname}'")
                    bdoc = doc.args.get(bname) if doc else None
                    if doc is not None:
                        self._doc_used.setdefault(id(doc), set()).add(bname)
                    if not bdoc:
                        raise QAPIError(
                            doc.info if doc else info,
                            f"{owner} branch '{bname}' lacks documentation",
                        )
                    ent.branches.append(Member(bname, typ, False, info, bdoc))
            elif isinstance(ent, Command):
                if "data" in e:
                    if ent.boxed:
                        ent.arg_type = self._lookup_object(e["data"], info, owner)
                    elif isinstance(e["data"], dict):
                        ent.arg_type = self._implicit(
                            f"{camel(ent.name)}Args", e["data"], info, owner, doc
                        )
                    else:
                        ent.arg_type = self._struct_ref(e["data"], info, f"{owner} 'data'")
                elif ent.boxed:
                    raise QAPIError(info, f"{owner}: 'boxed': true requires 'data'")
                if "returns" in e:
                    ret = self._lookup(e["returns"], info, f"{owner} 'returns'")
                    elem = ret.element if isinstance(ret, ArrayType) else ret
                    if not isinstance(elem, (ObjectType, BuiltinType, EnumType)):
                        raise QAPIError(info, f"{owner} cannot return '{ret.name}'")
                    ent.ret_type = ret
            elif isinstance(ent, Event) and "data" in e:
                if ent.boxed:
                    ent.arg_type = self._lookup_object(e["data"], info, owner)
                elif isinstance(e["data"], dict):
                    ent.arg_type = self._implicit(
                        f"{camel(ent.name)}Event", e["data"], info, owner, doc
                    )
                else:
                    ent.arg_type = self._struct_ref(e["data"], info, f"{owner} 'data'")
            elif isinstance(ent, Event) and ent.boxed:
                raise QAPIError(info, f"{owner}: 'boxed': true requires 'data'")

    def _check_docs(self) -> None:
        for ex, ent in self._raw.values():
            doc = ex.doc
            assert doc is not None
            used = self._doc_used.get(id(doc), set())
            for name in doc.args:
                if name not in used:
                    raise QAPIError(
                        doc.info, f"documented member '{name}' of '{ent.name}' does not exist"
                    )

    def _lookup_object(self, ref: Value, info: Info, owner: str) -> ObjectType:
        typ = self._lookup(ref, info, f"{owner} 'data'")
        if not isinstance(typ, ObjectType):
            raise QAPIError(
                info, f"{owner}: 'boxed': true requires a struct or union, not '{typ.name}'"
            )
        return typ

    # ---- pass 3: semantic checks -----------------------------------------------------

    def _check_all(self) -> None:
        for typ in list(self.types.values()):
            if isinstance(typ, ObjectType):
                self._check_object(typ)
            elif isinstance(typ, AlternateType):
                self._check_alternate(typ)

    def _check_object(self, obj: ObjectType) -> None:
        info = obj.info
        seen: dict[str, str] = {}
        chain: list[ObjectType] = []
        cur: ObjectType | None = obj
        while cur is not None:
            if cur in chain:
                raise QAPIError(info, f"object '{obj.name}' has a base loop")
            chain.append(cur)
            cur = cur.base
        for m in obj.members:
            py = m.name.replace("-", "_")
            if py in seen:
                raise QAPIError(
                    info, f"member '{m.name}' of '{obj.name}' collides with member '{seen[py]}'"
                )
            seen[py] = m.name
        if not obj.is_union():
            return
        tag = next((m for m in obj.members if m.name == obj.tag), None)
        if tag is None:
            raise QAPIError(
                info, f"discriminator '{obj.tag}' is not a member of base of union '{obj.name}'"
            )
        if tag.optional:
            raise QAPIError(
                info, f"discriminator member '{obj.tag}' of union '{obj.name}' must not be optional"
            )
        if not isinstance(tag.type, EnumType):
            raise QAPIError(
                info, f"discriminator member '{obj.tag}' of union '{obj.name}' must be of enum type"
            )
        values = [v.name for v in tag.type.values]
        cases: set[str] = set()
        for var in obj.variants:
            if var.case not in values:
                raise QAPIError(
                    info,
                    f"branch '{var.case}' of union '{obj.name}' is not a value of {tag.type.name}",
                )
            cases.add(var.case)
            for m in var.type.members:
                if m.name.replace("-", "_") in seen:
                    raise QAPIError(
                        info,
                        f"member '{m.name}' of branch '{var.case}' ({var.type.name}) collides with member '{seen[m.name.replace('-', '_')]}' of the base of union '{obj.name}'",
                    )
        for v in values:
            if v not in cases:
                obj.variants.append(Variant(v, self.the_empty_object))

    def _check_alternate(self, alt: AlternateType) -> None:
        classes: dict[str, str] = {}
        for br in alt.branches:
            t = br.type
            if isinstance(t, AlternateType):
                raise QAPIError(
                    alt.info, f"alternate '{alt.name}' branch '{br.name}' cannot be an alternate"
                )
            if isinstance(t, ArrayType):
                raise QAPIError(
                    alt.info, f"alternate '{alt.name}' branch '{br.name}' cannot be an array"
                )
            jt = t.json_type()
            if jt == "value":
                raise QAPIError(
                    alt.info, f"alternate '{alt.name}' branch '{br.name}' cannot be 'any'"
                )
            cls = {"int": "number"}.get(jt, jt)
            if cls in classes:
                raise QAPIError(
                    alt.info,
                    f"alternate '{alt.name}' branch '{br.name}' can't be distinguished from '{classes[cls]}'",
                )
            classes[cls] = br.name
        if "string" in classes:
            for other in ("number", "boolean"):
                if other in classes:
                    raise QAPIError(
                        alt.info,
                        f"alternate '{alt.name}' branch '{classes[other]}' can't be distinguished from '{classes['string']}' in keyval input",
                    )
