"""Generator of the `query-qmp-schema` payload, in qsd 7.2's exact shape and masking.

Pure core (schema toolchain). The rules, learnt from qsd's own answer: commands and events come
first in definition order; every type they reach is then listed in first-use order (breadth of
a work queue, each entity once); non-builtin type names are replaced by decimal strings numbered
in first-use order; every integer type shows as `int`; arrays are named `[ELEMENT]`; a command
without arguments or return value refers to the empty object. Invariant: numbering is a pure
function of definition order, so regenerating is stable.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.qapi.schema import (
    AlternateType,
    ArrayType,
    BuiltinType,
    Command,
    EnumType,
    Event,
    Member,
    ObjectType,
    Schema,
    Type,
)


class _Introspector:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.names: dict[str, str] = {}
        self.used: list[Type] = []
        self.used_ids: set[int] = set()
        self.out: list[dict[str, Any]] = []
        self.int_list = schema.types.get("intList") or ArrayType(
            "intList", None, element=schema.types["int"]
        )

    def _mask(self, name: str) -> str:
        return self.names.setdefault(name, str(len(self.names)))

    def use(self, typ: Type) -> str:
        """Queue a type for listing and return the name it is known by in the payload."""
        if isinstance(typ, BuiltinType) and typ.json_type() == "int":
            typ = self.schema.types["int"]
        elif (
            isinstance(typ, ArrayType)
            and isinstance(typ.element, BuiltinType)
            and typ.element.json_type() == "int"
        ):
            typ = self.int_list
        if id(typ) not in self.used_ids:
            self.used_ids.add(id(typ))
            self.used.append(typ)
        if isinstance(typ, BuiltinType):
            return typ.name
        if isinstance(typ, ArrayType):
            assert typ.element is not None
            return "[" + self.use(typ.element) + "]"
        return self._mask(typ.name)

    def tree(
        self, name: str, meta: str, obj: dict[str, Any], features: tuple[str, ...] = ()
    ) -> None:
        if meta not in ("command", "event", "builtin", "array"):
            name = self._mask(name)
        entry: dict[str, Any] = {"name": name, "meta-type": meta}
        entry.update(obj)
        if features:
            entry["features"] = list(features)
        self.out.append(entry)

    def member(self, m: Member) -> dict[str, Any]:
        obj: dict[str, Any] = {"name": m.name, "type": self.use(m.type)}
        if m.optional:
            obj["default"] = None
        if m.features:
            obj["features"] = list(m.features)
        return obj

    def visit_type(self, typ: Type) -> None:
        if isinstance(typ, BuiltinType):
            self.tree(typ.name, "builtin", {"json-type": typ.json_type()})
        elif isinstance(typ, EnumType):
            members: list[dict[str, Any]] = []
            for v in typ.values:
                mem: dict[str, Any] = {"name": v.name}
                if v.features:
                    mem["features"] = list(v.features)
                members.append(mem)
            self.tree(
                typ.name,
                "enum",
                {"members": members, "values": [v.name for v in typ.values]},
                typ.features,
            )
        elif isinstance(typ, ArrayType):
            assert typ.element is not None
            element = self.use(typ.element)
            self.tree("[" + element + "]", "array", {"element-type": element})
        elif isinstance(typ, ObjectType):
            obj: dict[str, Any] = {"members": [self.member(m) for m in typ.members]}
            if typ.is_union():
                obj["tag"] = typ.tag
                obj["variants"] = [{"case": v.case, "type": self.use(v.type)} for v in typ.variants]
            self.tree(typ.name, "object", obj, typ.features)
        elif isinstance(typ, AlternateType):
            self.tree(
                typ.name,
                "alternate",
                {"members": [{"type": self.use(b.type)} for b in typ.branches]},
                typ.features,
            )

    def run(self) -> list[dict[str, Any]]:
        empty = self.schema.the_empty_object
        for ent in self.schema.entities:
            if isinstance(ent, Command):
                obj: dict[str, Any] = {
                    "arg-type": self.use(ent.arg_type or empty),
                    "ret-type": self.use(ent.ret_type or empty),
                }
                if ent.allow_oob:
                    obj["allow-oob"] = True
                self.tree(ent.name, "command", obj, ent.features)
            elif isinstance(ent, Event):
                self.tree(
                    ent.name, "event", {"arg-type": self.use(ent.arg_type or empty)}, ent.features
                )
        i = 0
        while i < len(self.used):
            self.visit_type(self.used[i])
            i += 1
        return self.out


def introspection(schema: Schema) -> list[dict[str, Any]]:
    """The `query-qmp-schema` return value for `schema`."""
    return _Introspector(schema).run()
