"""Plain run-time objects for QAPI values: what the input visitor builds inside the daemon.

Pure core (schema toolchain). One generated class per schema struct and union branch
(`qapi_generated/plain.py`), with the part of its pydantic twin's surface the daemon uses:
attributes by Python name, class-level `model_fields` (name -> field with `alias`),
`model_fields_set`, `model_construct`, `model_copy`, `qapi_nullable`. Building one costs
microseconds and needs no pydantic. Invariant: an instance's `__dict__` holds exactly the
members that were set (so `model_fields_set` is its keys); an unset member reads as the class
default (None, or a union branch's tag value).
"""

from __future__ import annotations

import copy
import enum
from typing import Any, ClassVar, Self


class PlainField:
    """What `model_fields` maps a member to, as pydantic's FieldInfo does for the models."""

    __slots__ = ("alias", "default", "required")

    def __init__(self, alias: str | None, default: Any = None, required: bool = False) -> None:
        self.alias = alias  # wire name, or None when it equals the Python name
        self.default = default  # what an unset member reads as
        self.required = required

    def is_required(self) -> bool:
        return self.required

    def __repr__(self) -> str:
        return (
            f"PlainField(alias={self.alias!r}, default={self.default!r}, required={self.required})"
        )


class PlainModel:
    """Base of the generated plain classes. Construction does not validate: the input visitor
    has checked the value against the schema already."""

    model_fields: ClassVar[dict[str, PlainField]] = {}
    qapi_nullable: ClassVar[frozenset[str]] = frozenset()
    __hash__ = None  # type: ignore[assignment]  # mutable, like the pydantic models

    def __init__(self, **values: Any) -> None:
        fields = type(self).model_fields
        for name in values:
            if name not in fields:
                raise TypeError(f"{type(self).__name__} has no member {name!r}")
        self.__dict__.update(values)

    @classmethod
    def model_construct(cls, **values: Any) -> Self:
        """An instance with exactly `values` set (Python names), like pydantic's."""
        return cls(**values)

    @property
    def model_fields_set(self) -> set[str]:
        """The members that were given (or assigned since), as pydantic reports them."""
        return set(self.__dict__)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy, with `update` applied (those members count as set), like pydantic's."""
        new = type(self).__new__(type(self))
        new.__dict__.update(copy.deepcopy(self.__dict__) if deep else self.__dict__)
        for name, value in (update or {}).items():
            setattr(new, name, value)
        return new

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in type(self).model_fields:
            raise ValueError(f'"{type(self).__name__}" object has no field "{name}"')
        self.__dict__[name] = value

    def __eq__(self, other: object) -> bool:
        """Same class and equal members (an unset member reads as its default, as in the
        comparison of pydantic models). Nothing else is equal, the pydantic twin included."""
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in type(self).model_fields)

    def __repr__(self) -> str:
        members = ", ".join(f"{name}={value!r}" for name, value in self.__dict__.items())
        return f"{type(self).__name__}({members})"


# The generated tables: a class is (fields in model_fields order as (name, alias or None,
# required), nullable member names, union tag as (member, enum name, value) or None).
FieldTable = tuple[tuple[str, str | None, bool], ...]
ClassTable = tuple[FieldTable, tuple[str, ...], tuple[str, str, str] | None]


def make_class(name: str, table: ClassTable, tag_value: Any, module: str) -> type[PlainModel]:
    """Build the plain class `name` from its generated table (`tag_value`: the enum member a
    union branch's tag holds, None otherwise)."""
    fields, nullable, tag = table
    namespace: dict[str, Any] = {"__module__": module, "__qualname__": name}
    defaults: dict[str, Any] = dict.fromkeys(field for field, _alias, _required in fields)
    if tag is not None:
        defaults[tag[0]] = tag_value
    namespace.update(defaults)  # an unset member reads as its default from the class
    namespace["model_fields"] = {
        field: PlainField(alias, defaults[field], required and (tag is None or field != tag[0]))
        for field, alias, required in fields
    }
    namespace["qapi_nullable"] = frozenset(nullable)
    return type(name, (PlainModel,), namespace)


def make_enum(name: str, members: tuple[tuple[str, str], ...], module: str) -> type[enum.StrEnum]:
    """Build the enum class `name` (member name, value) as the models define it."""
    cls = enum.StrEnum(name, members, module=module, qualname=name)  # type: ignore[misc]
    return cls
