"""query-qmp-schema payload: self-consistent, same algorithm as qsd 7.2, compatible with it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import pytest

from storage_daemon.qapi import schema as S
from storage_daemon.qapi.gen import REPO
from storage_daemon.qapi.introspect import introspection
from storage_daemon.qapi.runtime import COMMANDS, EVENTS

REF_PATH = Path("/work/shared/reference/qsd-7.2/schema.json")
OURS: list[dict[str, Any]] = json.loads(
    (REPO / "storage_daemon/qapi_generated/introspection.json").read_text()
)

needs_ref = pytest.mark.skipif(not REF_PATH.exists(), reason="qsd 7.2 reference schema not present")
# Documented QEMU 10.0 additions (inactive nodes: `active`, blockdev-set-active,
# allow-inactive) are compared with the 10.0 introspection instead.
REF10_PATH = Path("/work/shared/reference/qsd-10.0/schema.json")
# Our own extensions, never shipped by QEMU and documented as such in the schema: these
# commands/events have no reference, and these enum values / union branches are skipped.
OWN_ENTITIES = {"x-query-block-node", "BLOCK_NODE_REPLACED"}
OWN_VALUES = {"error"}  # BlockdevDriver 'error'
# Members QEMU 10.0 added (verified in its introspection) that we implement.
ADDED_IN_10_0 = {"active", "allow-inactive"}


def ref() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(REF_PATH.read_text())
    return data


def index(payload: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {e["name"]: e for e in payload}
    assert len(out) == len(payload), "duplicate entity names"
    return out


def referenced(e: dict[str, Any]) -> list[str]:
    names = [e[k] for k in ("arg-type", "ret-type", "element-type") if k in e]
    if e["meta-type"] in ("object", "alternate"):
        names += [m["type"] for m in e["members"]]
    names += [v["type"] for v in e.get("variants", [])]
    return names


def test_self_consistent() -> None:
    by = index(OURS)
    for e in OURS:
        for name in referenced(e):
            assert name in by, f"{e['name']} refers to missing {name}"
    metas = [e["meta-type"] for e in OURS]
    n = sum(1 for m in metas if m in ("command", "event"))
    assert set(metas[:n]) <= {"command", "event"} and set(metas[n:]).isdisjoint(
        {"command", "event"}
    )
    assert {e["name"] for e in OURS if e["meta-type"] == "command"} == set(COMMANDS)
    assert {e["name"] for e in OURS if e["meta-type"] == "event"} == set(EVENTS)
    for e in OURS:
        if e["meta-type"] == "enum":
            assert e["values"] == [m["name"] for m in e["members"]]
        if e["meta-type"] == "command":
            assert "allow-oob" not in e
        if e["meta-type"] in ("enum", "object", "alternate"):
            assert re.fullmatch(r"\d+", e["name"])
        if e["meta-type"] == "builtin":
            assert e["name"] in ("str", "int", "bool", "number", "null", "any")


def _schema_from_payload(payload: list[dict[str, Any]]) -> S.Schema:
    """Rebuild a semantic model whose type names are the payload's masked names."""
    by = index(payload)
    types: dict[str, S.Type] = {
        n: S.BuiltinType(n, None) for n in ("str", "number", "int", "bool", "null", "any")
    }

    def get(name: str) -> S.Type:
        if name in types:
            return types[name]
        e = by[name]
        feats = tuple(e.get("features", ()))
        typ: S.Type
        if e["meta-type"] == "enum":
            typ = S.EnumType(name, None, features=feats)
            typ.values = [
                S.EnumValue(m["name"], features=tuple(m.get("features", ()))) for m in e["members"]
            ]
            types[name] = typ
        elif e["meta-type"] == "array":
            typ = types[name] = S.ArrayType(name, None)
            typ.element = get(e["element-type"])
        elif e["meta-type"] == "object":
            typ = types[name] = S.ObjectType(name, None, features=feats)
            typ.local_members = [
                S.Member(
                    m["name"],
                    get(m["type"]),
                    "default" in m,
                    None,
                    features=tuple(m.get("features", ())),
                )
                for m in e["members"]
            ]
            if "tag" in e:
                typ.tag = e["tag"]
                typ.variants = [
                    S.Variant(v["case"], cast(S.ObjectType, get(v["type"]))) for v in e["variants"]
                ]
        else:
            typ = types[name] = S.AlternateType(name, None, features=feats)
            typ.branches = [S.Member("b", get(m["type"]), False, None) for m in e["members"]]
        return typ

    schema = S.Schema.__new__(S.Schema)
    schema.entities = []
    for e in payload:
        feats = tuple(e.get("features", ()))
        if e["meta-type"] == "command":
            cmd = S.Command(e["name"], None, features=feats, allow_oob=e.get("allow-oob", False))
            cmd.arg_type = cast(S.ObjectType, get(e["arg-type"]))
            cmd.ret_type = get(e["ret-type"])
            schema.entities.append(cmd)
        elif e["meta-type"] == "event":
            ev = S.Event(e["name"], None, features=feats)
            ev.arg_type = cast(S.ObjectType, get(e["arg-type"]))
            schema.entities.append(ev)
    schema.types = types
    empty = next(e for e in payload if e["meta-type"] == "command")["arg-type"]
    assert by[empty]["members"] == []
    schema.the_empty_object = cast(S.ObjectType, types[empty])
    return schema


def _align(ours: Any, theirs: Any, mapping: dict[int, int]) -> None:
    """Assert equal up to a renaming of masked numbers; collect the renaming."""
    if isinstance(ours, dict):
        assert isinstance(theirs, dict) and ours.keys() == theirs.keys(), (ours, theirs)
        for key, val in ours.items():
            if key in ("name", "type", "arg-type", "ret-type", "element-type") and isinstance(
                val, str
            ):
                m1 = re.fullmatch(r"\[?(\d+)\]?", val)
                m2 = re.fullmatch(r"\[?(\d+)\]?", theirs[key])
                if m1 and m2:
                    assert mapping.setdefault(int(m1[1]), int(m2[1])) == int(m2[1])
                    continue
            _align(val, theirs[key], mapping)
    elif isinstance(ours, list):
        assert isinstance(theirs, list) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _align(a, b, mapping)
    else:
        assert ours == theirs


@needs_ref
def test_algorithm_reproduces_qsd_ordering_and_masking() -> None:
    """Our introspector, fed qsd's own structure, lists the same entities in the same order.

    Numbers match up to gaps: qsd numbers a few compile-time-disabled types it then omits, so
    the renaming must be strictly increasing rather than the identity.
    """
    payload = ref()
    again = introspection(_schema_from_payload(payload))
    mapping: dict[int, int] = {}
    _align(again, payload, mapping)
    keys = sorted(mapping)
    assert [mapping[k] for k in keys] == sorted(mapping.values())
    assert len(set(mapping.values())) == len(mapping)


class _Resolver:
    def __init__(self, payload: list[dict[str, Any]]) -> None:
        self.by = index(payload)

    def entity(self, name: str) -> dict[str, Any]:
        return self.by[name]


def _compatible(
    ours: _Resolver, theirs: _Resolver, a: str, b: str, path: str, seen: set[tuple[str, str]]
) -> None:
    if (a, b) in seen:
        return
    seen.add((a, b))
    ea, eb = ours.entity(a), theirs.entity(b)
    assert ea["meta-type"] == eb["meta-type"], f"{path}: {ea['meta-type']} vs {eb['meta-type']}"
    meta = ea["meta-type"]
    assert ea.get("features") == eb.get("features"), f"{path}: features differ"
    if meta == "builtin":
        assert a == b, f"{path}: {a} vs {b}"
    elif meta == "enum":
        values = [v for v in ea["values"] if v not in OWN_VALUES]
        ea = {**ea, "values": values}
        assert set(ea["values"]) <= set(eb["values"]), (
            f"{path}: {ea['values']} not within {eb['values']}"
        )
        assert [v for v in eb["values"] if v in ea["values"]] == ea["values"], f"{path}: enum order"
    elif meta == "array":
        _compatible(ours, theirs, ea["element-type"], eb["element-type"], path + "[]", seen)
    elif meta == "alternate":
        assert len(ea["members"]) == len(eb["members"]), path
        for ma, mb in zip(ea["members"], eb["members"], strict=True):
            _compatible(ours, theirs, ma["type"], mb["type"], path + "|", seen)
    else:
        mb = {m["name"]: m for m in eb["members"]}
        ma = {
            m["name"]: m for m in ea["members"] if m["name"] in mb or m["name"] not in ADDED_IN_10_0
        }
        for name, m in ma.items():
            assert name in mb, f"{path}.{name}: not in qsd"
            assert ("default" in m) == ("default" in mb[name]), (
                f"{path}.{name}: optionality differs"
            )
            assert m.get("features") == mb[name].get("features"), f"{path}.{name}: features differ"
            _compatible(ours, theirs, m["type"], mb[name]["type"], f"{path}.{name}", seen)
        for name, m in mb.items():
            assert name in ma or "default" in m, f"{path}.{name}: mandatory in qsd, missing here"
        assert [n for n in mb if n in ma] == list(ma), f"{path}: member order differs"
        assert ea.get("tag") == eb.get("tag"), path
        vb = {v["case"]: v["type"] for v in eb.get("variants", [])}
        for v in ea.get("variants", []):
            if v["case"] in OWN_VALUES:
                continue
            assert v["case"] in vb, f"{path}: branch {v['case']} not in qsd"
            _compatible(ours, theirs, v["type"], vb[v["case"]], f"{path}<{v['case']}>", seen)


@needs_ref
@pytest.mark.parametrize("name", sorted(COMMANDS) + sorted(EVENTS))
def test_compatible_with_qsd(name: str) -> None:
    if name in OWN_ENTITIES:
        return
    reference = ref()
    if name not in index(reference) and REF10_PATH.exists():
        reference = json.loads(REF10_PATH.read_text())  # a command QEMU 10.0 added
    _check_compatible(name, reference)


def _check_compatible(name: str, reference: list[dict[str, Any]]) -> None:
    ours, theirs = _Resolver(OURS), _Resolver(reference)
    ea, eb = ours.entity(name), theirs.entity(name)
    assert ea["meta-type"] == eb["meta-type"]
    assert ea.get("features") == eb.get("features")
    assert ea.get("allow-oob") == eb.get("allow-oob")
    seen: set[tuple[str, str]] = set()
    _compatible(ours, theirs, ea["arg-type"], eb["arg-type"], name, seen)
    if "ret-type" in ea:
        _compatible(ours, theirs, ea["ret-type"], eb["ret-type"], name + "->", seen)


@needs_ref
def test_command_and_event_order_follows_qsd() -> None:
    """Ours list a subsequence of qsd's commands and events, in qsd's order."""
    theirs = [e["name"] for e in ref() if e["meta-type"] in ("command", "event")]
    ours = [e["name"] for e in OURS if e["meta-type"] in ("command", "event")]
    ours = [name for name in ours if name in theirs]  # later additions are checked elsewhere
    positions = [theirs.index(name) for name in ours]
    assert positions == sorted(positions)


def test_coroutine_flag_is_not_introspected() -> None:
    assert COMMANDS["block_resize"].coroutine
    assert all("coroutine" not in e for e in OURS)
    entry = index(OURS)["block_resize"]
    assert set(entry) == {"name", "meta-type", "arg-type", "ret-type"}


@needs_ref
def test_union_branches_without_members_use_the_empty_object() -> None:
    """BlockStatsSpecific: branches that add nothing refer to the empty object, as in qsd."""
    for payload in (OURS, ref()):
        by = index(payload)
        empty = by["query-block"]["arg-type"]
        stats = by[by["query-blockstats"]["ret-type"].strip("[]")]
        spec = next(m["type"] for m in stats["members"] if m["name"] == "driver-specific")
        variants = {v["case"]: v["type"] for v in by[spec]["variants"]}
        assert variants["file"] != empty and by[variants["file"]]["members"]
        assert variants["raw"] == variants["null-co"] == empty


@needs_ref
def test_all_qsd_events_defined() -> None:
    assert set(EVENTS) - OWN_ENTITIES == {e["name"] for e in ref() if e["meta-type"] == "event"}


def test_schema_payload_accessor() -> None:
    from storage_daemon.qapi.introspection import schema_payload

    assert schema_payload() == OURS
    assert schema_payload() is schema_payload()
