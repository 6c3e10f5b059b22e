"""Golden tests of the schema checker: each bad-*.json must fail with the text in its .err file.

Also checks what a good schema resolves to (members, variants, implicit types, docs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from storage_daemon.qapi.gen import generate
from storage_daemon.qapi.parser import QAPIError, parse_schema
from storage_daemon.qapi.schema import AlternateType, ArrayType, EnumType, ObjectType, Schema

HERE = Path(__file__).parent / "qapi_schemas"
BAD = sorted(p.name for p in HERE.glob("bad-*.json"))


def read(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def load(name: str) -> Schema:
    return Schema(parse_schema(name, read))


def test_there_are_golden_files() -> None:
    assert len(BAD) >= 20
    for name in BAD:
        assert (HERE / name.replace(".json", ".err")).exists(), name


@pytest.mark.parametrize("name", BAD)
def test_bad_schema(name: str) -> None:
    expected = read(name.replace(".json", ".err")).strip()
    with pytest.raises(QAPIError) as exc:
        load(name)
    assert str(exc.value) == expected
    # every message is located as file:line:col
    assert str(exc.value).startswith(f"{name}:")


def test_good_schema_model() -> None:
    s = load("good-schema.json")
    kind = s.types["Kind"]
    assert isinstance(kind, EnumType)
    assert [v.name for v in kind.values] == ["disk", "tape"]
    assert kind.values[1].features == ("deprecated",)
    thing = s.types["Thing"]
    assert isinstance(thing, ObjectType) and thing.is_union()
    assert [m.name for m in thing.members] == ["kind", "name"]
    # the missing branch gets the empty object
    assert [(v.case, v.type.name) for v in thing.variants] == [
        ("disk", "DiskOpts"),
        ("tape", "q_empty"),
    ]
    disk = s.types["DiskOpts"]
    assert isinstance(disk, ObjectType)
    assert [m.name for m in disk.members] == ["tag", "size", "x-debug"]
    assert disk.local_members[0].doc == "size in bytes, continued on a second line"
    assert disk.local_members[1].features == ("unstable",)
    alt = s.types["ThingRef"]
    assert isinstance(alt, AlternateType)
    assert [b.type.name for b in alt.branches] == ["Thing", "str", "null"]
    cmd = s.commands["list-things"]
    assert cmd.arg_type is not None and cmd.arg_type.name == "ListThingsArgs"
    assert isinstance(cmd.ret_type, ArrayType) and cmd.ret_type.name == "CommonList"
    assert s.commands["make-thing"].boxed
    assert s.commands["make-thing"].features == ("unstable",)
    ev = s.events["THING_GONE"]
    assert ev.arg_type is not None and ev.arg_type.name == "ThingGoneEvent"
    # definition order, included file expanded in place
    assert [e.name for e in s.entities][:3] == ["Common", "Kind", "DiskOpts"]


def test_good_schema_generates() -> None:
    s = load("good-schema.json")
    out = generate(s)
    models = out["storage_daemon/qapi_generated/models.py"]
    assert "class Thing_disk(ThingBase, DiskOpts):" in models
    assert "class Thing_tape(ThingBase):" in models
    assert 'x_debug: bool | None = Field(default=None, alias="x-debug")' in models
    assert "ThingRef: TypeAlias = Union[Thing, str, None]" in models
    compile(models, "models.py", "exec")
    compile(out["storage_daemon/qapi_generated/types.py"], "types.py", "exec")
