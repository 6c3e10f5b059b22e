"""The plain run-time classes (qapi_generated/plain.py) and their pydantic twins (models.py).

The daemon builds only plain objects; tests and tools validate with the pydantic models. Both
come from one schema, and these tests keep them from drifting apart: same classes, members in
the same order, same aliases, defaults, required and nullable members, one class per enum, and
the visitor's result agrees member by member with pydantic's validation of the same value. The
two families stay distinct: a plain object is neither an instance of nor equal to a model.
"""

from __future__ import annotations

import enum
import functools
from typing import Any

import pytest
from hypothesis import given
from pydantic import BaseModel, TypeAdapter

from storage_daemon.qapi.gen_models import branch_class
from storage_daemon.qapi.plain_model import PlainModel
from storage_daemon.qapi.runtime import command_args, to_wire, visit_input
from storage_daemon.qapi_generated import models, plain
from tests.unit.test_qapi_visit import as_keyval, blockdev
from tests.unit.test_qapi_visit_exports import export_opts

# Full pydantic validation (TypeAdapter) needs every lazily built model class.
models.build_all()


def pydantic_classes() -> dict[str, type[models.QapiModel]]:
    """Every generated model class by name (type aliases of one-branch unions left out)."""
    models.build_all()
    out: dict[str, type[models.QapiModel]] = {}
    for name in dir(models):
        value = getattr(models, name)
        if (
            isinstance(value, type)
            and issubclass(value, models.QapiModel)
            and value is not models.QapiModel
            and value.__name__ == name
        ):
            out[name] = value
    return out


def pydantic_enums() -> dict[str, type[enum.Enum]]:
    models.build_all()
    return {
        name: value
        for name in dir(models)
        if isinstance(value := getattr(models, name), type) and issubclass(value, enum.Enum)
    }


def test_same_classes() -> None:
    assert set(plain.CLASSES) == set(pydantic_classes())
    assert len(plain.CLASSES) > 100


def field_table(cls: Any) -> list[tuple[str, str | None, bool, Any]]:
    return [
        (name, info.alias, info.is_required(), None if info.is_required() else info.default)
        for name, info in cls.model_fields.items()
    ]


@pytest.mark.parametrize("name", sorted(plain.CLASSES))
def test_same_members(name: str) -> None:
    twin = pydantic_classes()[name]
    cls = getattr(plain, name)
    assert issubclass(cls, PlainModel) and cls.__name__ == name
    # model_fields order matters: to_wire writes members in that order
    assert field_table(cls) == field_table(twin)
    assert cls.qapi_nullable == twin.qapi_nullable


def test_one_class_per_enum() -> None:
    enums = pydantic_enums()
    assert set(enums) == set(plain.ENUMS)
    for name, cls in enums.items():
        assert getattr(plain, name) is cls
        assert [(m.name, m.value) for m in cls] == list(plain.ENUMS[name])


def test_union_branch_tag_default() -> None:
    cls = plain.BlockdevOptions_null_co
    assert cls.model_fields["driver"].default is plain.BlockdevDriver.NULL_CO
    assert not cls.model_fields["driver"].is_required()
    assert cls.model_fields["node_name"].alias == "node-name"
    assert plain.BlockdevOptionsBase.model_fields["driver"].is_required()


# ---- what the visitor builds ------------------------------------------------------------


def test_visitor_builds_plain_objects() -> None:
    opts = visit_input("BlockdevOptions", {"driver": "null-co", "node-name": "n", "size": 4096})
    assert type(opts) is plain.BlockdevOptions_null_co
    assert opts.model_fields_set == {"driver", "node_name", "size"}
    assert opts.driver is plain.BlockdevDriver.NULL_CO
    assert opts.size == 4096 and opts.read_zeroes is None  # unset: the default
    # a plain class is flat (no schema base classes) and no pydantic model
    assert type(opts).__mro__ == (type(opts), PlainModel, object)
    assert not isinstance(opts, BaseModel)
    assert not isinstance(opts, models.BlockdevOptions_null_co)
    assert not isinstance(opts, models.BlockdevOptionsNull)


def test_models_have_pydantic_metaclass() -> None:
    """No metaclass of ours: isinstance() against a model means a pydantic instance."""
    models.build_all()
    for cls in pydantic_classes().values():
        assert type(cls) is type(BaseModel)
    assert type(models.QapiModel) is type(BaseModel)


def test_explicit_null_is_set() -> None:
    opts = visit_input(
        "BlockdevOptions",
        {"driver": "qcow2", "node-name": "q", "file": "f", "backing": None},
    )
    assert "backing" in opts.model_fields_set and opts.backing is None
    assert to_wire(opts)["backing"] is None
    unset = visit_input("BlockdevOptions", {"driver": "qcow2", "node-name": "q", "file": "f"})
    assert "backing" not in to_wire(unset)


def shape(value: Any) -> Any:
    """`value` with its classes spelled out: a plain object and its pydantic twin have the same
    shape exactly when they are of the same schema type, have the same members set and equal
    members (recursively); enums must be the very same class, scalars the same Python type."""
    if isinstance(value, (PlainModel, BaseModel)):
        cls = type(value)
        members = {name: shape(getattr(value, name)) for name in cls.model_fields}
        return (cls.__name__, sorted(value.model_fields_set), members)
    if isinstance(value, list):
        return [shape(item) for item in value]
    return (type(value), value)


def test_shape_tells_apart() -> None:
    """The comparison below could fail: it sees the class, the set members and the values."""
    a = plain.BlockdevOptions_null_co(size=1)
    assert shape(a) == shape(plain.BlockdevOptions_null_co(size=1))
    assert shape(a) != shape(plain.BlockdevOptions_null_aio(size=1))
    assert shape(a) != shape(plain.BlockdevOptions_null_co(size=1, read_zeroes=None))
    assert shape(a) != shape(plain.BlockdevOptions_null_co(size=2))
    assert shape(a) != shape(plain.BlockdevOptions_null_co(size=True))
    assert shape([a]) != shape([a, a])
    assert shape(plain.BlockdevDriver.RAW) != shape("raw")


@functools.cache
def adapter(type_name: str) -> TypeAdapter[Any]:
    return TypeAdapter(getattr(models, type_name))


def agree(value: dict[str, Any], got: Any, type_name: str) -> None:
    """The visitor's result `got` for `value` agrees with pydantic's validation of `value`."""
    validated = adapter(type_name).validate_python(value)
    assert isinstance(got, PlainModel) and isinstance(validated, BaseModel)
    assert shape(got) == shape(validated)
    assert to_wire(got) == to_wire(validated) == value


def test_agrees_with_pydantic_validation() -> None:
    value = {
        "driver": "raw",
        "node-name": "r",
        "file": {"driver": "file", "filename": "/x", "cache": {"direct": True}},
        "offset": 512,
    }
    got = visit_input("BlockdevOptions", value)
    agree(value, got, "BlockdevOptions")
    validated = adapter("BlockdevOptions").validate_python(value)
    # agreement is checked explicitly: the two families never compare equal
    assert got != validated and validated != got
    assert got == visit_input("BlockdevOptions", value)
    assert got != visit_input("BlockdevOptions", {**value, "offset": 1024})


@given(blockdev)
def test_visitor_agrees_with_pydantic_qmp(value: dict[str, Any]) -> None:
    got = visit_input("BlockdevOptions", value)
    assert type(got) is getattr(plain, branch_class("BlockdevOptions", value["driver"]))
    agree(value, got, "BlockdevOptions")


@given(blockdev)
def test_visitor_agrees_with_pydantic_keyval(value: dict[str, Any]) -> None:
    got = visit_input("BlockdevOptions", as_keyval(value), keyval=True)
    agree(value, got, "BlockdevOptions")


@given(export_opts)
def test_export_args_agree_with_pydantic(value: dict[str, Any]) -> None:
    agree(value, command_args("block-export-add", value), "BlockExportOptions")


# ---- PlainModel's own behaviour ---------------------------------------------------------


def test_assignment_counts_as_set_and_unknown_members_are_refused() -> None:
    opts = plain.BlockdevOptions_null_co.model_construct(driver=plain.BlockdevDriver.NULL_CO)
    assert opts.model_fields_set == {"driver"}
    opts.size = 1
    assert opts.model_fields_set == {"driver", "size"}
    with pytest.raises(ValueError, match="no field"):
        opts.sizee = 1
    with pytest.raises(TypeError, match="no member"):
        plain.BlockdevOptions_null_co(sizee=1)


def test_model_copy() -> None:
    cache = plain.BlockdevCacheOptions(direct=True)
    opts = plain.BlockdevOptions_null_co(node_name="a", size=1)
    opts_cache = plain.BlockdevOptions_file(filename="f", cache=cache)
    copied = opts.model_copy(update={"node_name": "b", "read_zeroes": True})
    assert (copied.node_name, copied.size, copied.read_zeroes) == ("b", 1, True)
    assert copied.model_fields_set == {"node_name", "size", "read_zeroes"}
    assert opts.node_name == "a" and opts.model_fields_set == {"node_name", "size"}
    shallow, deep = opts_cache.model_copy(), opts_cache.model_copy(deep=True)
    assert shallow.cache is cache and deep.cache is not cache and deep.cache == cache


def test_not_hashable_and_repr() -> None:
    opts = plain.BlockdevOptions_null_co(node_name="a")
    with pytest.raises(TypeError):
        hash(opts)
    assert repr(opts) == "BlockdevOptions_null_co(node_name='a')"


def test_build_all_builds_every_class_once() -> None:
    plain.build_all()
    for name in (*plain.ENUMS, *plain.CLASSES):
        assert getattr(plain, name) is plain.__getattr__(name)
