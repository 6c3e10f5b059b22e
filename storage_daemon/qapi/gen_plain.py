"""Generator for `qapi_generated/plain.py`: the daemon's run-time classes, without pydantic.

Pure core (schema toolchain): takes a `Schema`, returns source text. Invariant: the classes
described here are exactly the pydantic models' classes (same names, members in the same
`model_fields` order, same aliases, nullable sets and tag defaults), so code reading one reads
the other the same way; tests/unit/test_qapi_plain.py compares them class by class. The two
families share the enum classes and nothing else (isinstance and == stay within one family).
"""

from __future__ import annotations

from storage_daemon.qapi.gen_models import (
    HEADER,
    _admits_null,
    branch_class,
    enum_member_name,
    field_name,
)
from storage_daemon.qapi.schema import EnumType, Member, ObjectType, Schema


class _Class:
    """One model class: its bases (as the pydantic models declare them) and own members."""

    def __init__(
        self, name: str, bases: tuple[str, ...], own: list[Member], tag: tuple[str, str] | None
    ) -> None:
        self.name = name
        self.bases = bases
        self.own = own
        self.tag = tag  # (enum type name, case) of a union branch's tag


def model_classes(schema: Schema) -> dict[str, _Class]:
    """Every model class, by name, as gen_models declares them (structs, union branches)."""
    out: dict[str, _Class] = {}

    def visit(obj: ObjectType) -> None:
        if obj.name in out or obj is schema.the_empty_object:
            return
        if obj.base is not None:
            visit(obj.base)
        for v in obj.variants:
            visit(v.type)
        if not obj.is_union():
            base = (obj.base.name,) if obj.base is not None else ()
            out[obj.name] = _Class(obj.name, base, list(obj.local_members), None)
            return
        assert obj.base is not None and obj.tag is not None
        tag = next(m for m in obj.members if m.name == obj.tag)
        assert isinstance(tag.type, EnumType)
        for v in obj.variants:
            bases = [obj.base.name]
            if v.type is not schema.the_empty_object:
                bases.append(v.type.name)
            cls = branch_class(obj.name, v.case)
            out[cls] = _Class(cls, tuple(bases), [tag], (tag.type.name, v.case))

    for typ in schema.types.values():
        if isinstance(typ, ObjectType):
            visit(typ)
    return out


def _field_order(classes: dict[str, _Class]) -> dict[str, list[Member]]:
    """Members of each class in pydantic's `model_fields` order: the classes' own members
    walked along the reversed MRO, each member at its first position."""
    root = type("QapiModel", (), {})
    built: dict[str, type] = {}

    def build(name: str) -> type:
        if name not in built:
            bases = tuple(build(b) for b in classes[name].bases) or (root,)
            built[name] = type(name, bases, {})
        return built[name]

    order: dict[str, list[Member]] = {}
    for name in classes:
        members: dict[str, Member] = {}
        for cls in reversed(build(name).__mro__):
            if cls.__name__ in classes and cls is built.get(cls.__name__):
                for m in classes[cls.__name__].own:
                    members.setdefault(field_name(m.name), m)
        order[name] = list(members.values())
    return order


def generate_plain(schema: Schema) -> str:
    classes = model_classes(schema)
    order = _field_order(classes)
    out = [
        f'"""QAPI run-time classes (see storage_daemon/qapi/plain_model.py) — {HEADER}."""',
        "",
        "from __future__ import annotations",
        "",
        "from typing import Any",
        "",
        "from storage_daemon.qapi.plain_model import ClassTable, make_class, make_enum",
        "",
        "# enum -> ((member name, value), ...)",
        "ENUMS: dict[str, tuple[tuple[str, str], ...]] = {",
    ]
    for typ in schema.types.values():
        if isinstance(typ, EnumType):
            values = tuple((enum_member_name(v.name), v.name) for v in typ.values)
            out.append(f"    {typ.name!r}: {values!r},")
    out += [
        "}",
        "",
        "# class -> (((member, wire alias or None, required), ...) in model_fields order, nullable members,",
        "#           union branch tag as (member, enum, value) or None)",
        "CLASSES: dict[str, ClassTable] = {",
    ]
    for name, cls in classes.items():
        fields = tuple(
            (field_name(m.name), None if field_name(m.name) == m.name else m.name, not m.optional)
            for m in order[name]
        )
        nullable = tuple(
            sorted(field_name(m.name) for m in order[name] if m.optional and _admits_null(m.type))
        )
        tag = None
        if cls.tag is not None:
            tag = (field_name(cls.own[0].name), cls.tag[0], cls.tag[1])
        out.append(f"    {name!r}: ({fields!r}, {nullable!r}, {tag!r}),")
    out += [
        "}",
        "",
        "",
        "def __getattr__(name: str) -> Any:",
        '    """Build a class or enum on first use (each costs tens of microseconds)."""',
        "    if name in globals():  # asked for directly, not through the module attribute",
        "        return globals()[name]",
        "    if name in ENUMS:",
        "        value: Any = make_enum(name, ENUMS[name], __name__)",
        "    elif name in CLASSES:",
        "        table = CLASSES[name]",
        "        tag = table[2]",
        "        tag_value = None if tag is None else __getattr__(tag[1])(tag[2])",
        "        value = make_class(name, table, tag_value, __name__)",
        "    else:",
        '        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")',
        "    # Two threads may build the same class: the first one stored is the one everybody gets.",
        "    return globals().setdefault(name, value)",
        "",
        "",
        "def build_all() -> None:",
        '    """Build every class now."""',
        "    for name in (*ENUMS, *CLASSES):",
        "        __getattr__(name)",
    ]
    return "\n".join(out) + "\n"
