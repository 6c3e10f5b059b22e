"""Unit tests of the QAPI-syntax reader: values, positions, doc blocks, includes, errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.qapi.parser import DocBlock, Expression, QAPIError, parse_schema, parse_text


def one(text: str) -> Expression:
    items = [item for item, _ in parse_text("t.json", text) if isinstance(item, Expression)]
    assert len(items) == 1
    return items[0]


def test_values_and_order() -> None:
    ex = one("# c\n{ 'struct': 'S', 'data': { 'b': 'int', 'a': ['str'] }, 'x': true, 'y': false }")
    assert ex.expr == {"struct": "S", "data": {"b": "int", "a": ["str"]}, "x": True, "y": False}
    assert list(ex.expr["data"]) == ["b", "a"]  # type: ignore[arg-type]
    assert (ex.info.line, ex.info.col) == (2, 1)
    assert str(ex.info) == "t.json:2:1"


def test_doc_block_attached() -> None:
    text = (
        "##\n# @S:\n#\n# Body text\n# more.\n#\n# @a: first\n#     continued\n"
        "# @b: second\n#\n# Features:\n# @unstable: careful\n#\n# Since: 1.0\n##\n"
        "{ 'struct': 'S', 'data': { 'a': 'int', 'b': 'int' } }\n"
    )
    ex = one(text)
    assert ex.doc is not None
    assert ex.doc.symbol == "S"
    assert ex.doc.body == "Body text\nmore."
    assert ex.doc.args == {"a": "first continued", "b": "second"}
    assert ex.doc.features == {"unstable": "careful"}
    assert ex.doc.sections["Since"] == "1.0"


def test_free_standing_doc_is_kept_apart() -> None:
    items = parse_text(
        "t.json", "##\n# = Heading\n##\n\n##\n# @E:\n# @a: x\n##\n{ 'enum': 'E', 'data': ['a'] }\n"
    )
    assert isinstance(items[0][0], DocBlock) and items[0][0].symbol is None
    assert isinstance(items[1][0], Expression) and items[1][0].doc is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{ 'a': 'b' ", "t.json:1:12: expected ',' or '}', got end of file"),
        ("{ 'a' 'b' }", "t.json:1:7: expected ':'"),
        ("{ 'a': 'b\n' }", 't.json:1:8: missing terminating "\'"'),
        ("\n\n  [ 1 ]", "t.json:3:3: expected '{'"),
        ("{ 'a': 1 }", "t.json:1:8: stray '1'"),
        ("{ 'a': 'x', 'a': 'y' }", "t.json:1:13: duplicate key 'a'"),
        ("{ 'a': 'x\\y' }", "t.json:1:10: backslash not supported in strings"),
        (
            "##\n# @S:\nno hash\n##\n",
            "t.json:3:1: missing '#' at start of documentation comment line",
        ),
        ("##\n#@S:\n##\n", "t.json:2:1: missing space after #"),
        ("##\n# @S:\n", "t.json:1:1: documentation comment must end with '##'"),
        ("{ 'include': ['a'] }", "t.json:1:1: invalid 'include' directive"),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(QAPIError) as exc:
        parse_text("t.json", text)
    assert str(exc.value) == message


def test_include_once_and_relative() -> None:
    files = {
        "top.json": "{ 'include': 'sub/a.json' }\n{ 'include': 'sub/a.json' }\n",
        "sub/a.json": "{ 'include': 'b.json' }\n{ 'x': 'a' }\n",
        "sub/b.json": "{ 'x': 'b' }\n",
    }

    def reader(name: str) -> str:
        if name not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[name]

    exprs = parse_schema("top.json", reader)
    assert [e.expr["x"] for e in exprs] == ["b", "a"]
    assert [e.info.file for e in exprs] == ["sub/b.json", "sub/a.json"]


def test_orphan_symbol_doc() -> None:
    with pytest.raises(QAPIError) as exc:
        parse_schema("t.json", lambda _: "##\n# @S:\n# @a: x\n##\n")
    assert str(exc.value) == "t.json:1:1: documentation for 'S' is not followed by the definition"


names = st.text(alphabet="abcdefghij-_", min_size=1, max_size=8)
leaf = names.map(lambda s: s)
values = st.recursive(
    st.one_of(names, st.booleans()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(names, inner, max_size=3)),
    max_leaves=10,
)


def render(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, list):
        return "[ " + ", ".join(render(x) for x in v) + " ]"
    assert isinstance(v, dict)
    return "{ " + ",\n ".join(f"{render(k)}: {render(x)}" for k, x in v.items()) + " }"


@given(st.dictionaries(names, values, min_size=1, max_size=4))
def test_round_trip(expr: dict[str, object]) -> None:
    assert one(render(expr)).expr == expr
