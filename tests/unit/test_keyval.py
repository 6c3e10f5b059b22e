"""Unit tests for storage_daemon.keyval: keyval trees, the JSON option form, scalar parsers.

Pure-ring tests. The expected messages are qsd 7.2's (see reference/qsd-7.2/cli-7.2.txt and
qsd-behaviour.md §3); tests/unit/test_cli.py re-checks many of them live against the binary.
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.keyval import (
    KeyvalError,
    format_keyval,
    is_help_request,
    parse_bool,
    parse_int,
    parse_json_option,
    parse_keyval,
    parse_keyval_help,
    parse_size,
    parse_size_checked,
    parse_uint,
)

# ---- keyval: accepted input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "implied", "tree"),
    [
        ("a=1", None, {"a": "1"}),
        ("", "driver", {}),
        ("a=1,b=2", None, {"a": "1", "b": "2"}),
        ("a=1,", None, {"a": "1"}),  # trailing comma accepted
        ("a=x,,y", None, {"a": "x,y"}),  # ,, escapes a comma
        ("a=x,,", None, {"a": "x,"}),
        ("a=x,,,", None, {"a": "x,"}),
        ("a=x,,,b=1", None, {"a": "x,", "b": "1"}),
        ("a=", None, {"a": ""}),
        ("a=b=c", None, {"a": "b=c"}),
        ("node-name=n,node-name=m", None, {"node-name": "m"}),  # last one wins
        ("cache.direct=on", None, {"cache": {"direct": "on"}}),
        ("a.b.c=1,a.b.d=2,a.e=3", None, {"a": {"b": {"c": "1", "d": "2"}, "e": "3"}}),
        ("c.0=a,c.1=b", None, {"c": ["a", "b"]}),
        ("c.1=b,c.0=a", None, {"c": ["a", "b"]}),
        ("c.0.x=1,c.1.x=2", None, {"c": [{"x": "1"}, {"x": "2"}]}),
        ("c.0.0=1", None, {"c": [["1"]]}),
        ("null-co,node-name=n", "driver", {"driver": "null-co", "node-name": "n"}),
        ("null-co", "driver", {"driver": "null-co"}),
        ("null-co,", "driver", {"driver": "null-co"}),
        ("read-only", "driver", {"driver": "read-only"}),
        ("[1]", "driver", {"driver": "[1]"}),
        ("driver=x", "driver", {"driver": "x"}),
        ("a_b=1,A=2,a-1=3", None, {"a_b": "1", "A": "2", "a-1": "3"}),
        ("a.b_c=1", None, {"a": {"b_c": "1"}}),
        ("k" * 127 + "=1", None, {"k" * 127: "1"}),
        ("driver=help", "driver", {"driver": "help"}),  # a value of help is no help request
    ],
)
def test_keyval_accepts(text: str, implied: str | None, tree: dict[str, Any]) -> None:
    assert parse_keyval(text, implied) == tree


# ---- keyval: errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "implied", "message"),
    [
        ("=1", None, "Invalid parameter ''"),
        (",a=1", None, "Invalid parameter ''"),
        ("null-co,,x=1", "driver", "Invalid parameter ''"),
        ("a..b=1", None, "Invalid parameter 'a..b'"),
        (".a=1", None, "Invalid parameter '.a'"),
        ("a.=1", None, "Invalid parameter 'a.'"),
        ("1=1", None, "Invalid parameter '1'"),
        ("_a=1", None, "Invalid parameter '_a'"),
        ("a._b=1", None, "Invalid parameter 'a._b'"),
        ("a.-b=1", None, "Invalid parameter 'a.-b'"),
        ("a b=1", None, "Invalid parameter 'a b'"),
        ("a+b=1", None, "Invalid parameter 'a+b'"),
        ("a.1b=1", None, "Invalid parameter 'a.1b'"),
        ("?=1", None, "Invalid parameter '?'"),
        ("read-only", None, "Expected '=' after parameter 'read-only'"),
        ("d=x,read-only", "driver", "Expected '=' after parameter 'read-only'"),
        ("d=x,read-only,y=1", "driver", "Expected '=' after parameter 'read-only'"),
        ("null-co,null-co", "driver", "Expected '=' after parameter 'null-co'"),
        ("a.b", None, "Expected '=' after parameter 'a.b'"),
        ("help,iothread", "qom-type", "Expected '=' after parameter 'iothread'"),
        ("x,helpx", "qom-type", "Expected '=' after parameter 'helpx'"),
        ("cache.direct=on,cache=x", None, "Parameters 'cache.*' used inconsistently"),
        ("cache=x,cache.direct=on", None, "Parameters 'cache.*' used inconsistently"),
        ("cache.0=a,cache.x=b", None, "Parameters 'cache.*' used inconsistently"),
        ("a.b.c=1,a.b=2", None, "Parameters 'a.b.*' used inconsistently"),
        ("a.b=2,a.b.c=1", None, "Parameters 'a.b.*' used inconsistently"),
        ("a.b.0=1,a.b.c=2", None, "Parameters 'a.b.*' used inconsistently"),
        ("children.0=a,children.2=b", None, "Parameter 'children.1' missing"),
        ("a.1=x", None, "Parameter 'a.0' missing"),
        ("a.01=x", None, "Parameter 'a.0' missing"),
        ("a.1.b=1", None, "Parameter 'a.0' missing"),
        ("a.0=x,a.00=y", None, "Parameter 'a.1' missing"),
        ("a.99999999999999999999999=1", None, "Parameter 'a.0' missing"),
        ("x.0.1=a", None, "Parameter 'x.0.0' missing"),
        ("k" * 128 + "=1", None, f"Parameter '{'k' * 128}' is too long"),
        ("x." + "k" * 128 + "=1", None, f"Parameter fragment '{'k' * 128}' is too long"),
        ("k" * 128 + ".x=1", None, f"Parameter fragment '{'k' * 128}' is too long"),
        ("x." + "1" * 200 + "=1", None, f"Parameter fragment '{'1' * 200}' is too long"),
        ("help", "driver", "Help is not available for this option"),
        ("?", "driver", "Help is not available for this option"),
        ("null-co,node-name=n,help", "driver", "Help is not available for this option"),
        ("help", None, "Help is not available for this option"),
    ],
)
def test_keyval_errors(text: str, implied: str | None, message: str) -> None:
    with pytest.raises(KeyvalError) as info:
        parse_keyval(text, implied)
    assert info.value.message == message
    assert str(info.value) == message


def test_keyval_error_precedes_help() -> None:
    # help is noticed, but a later syntax error still wins
    with pytest.raises(KeyvalError, match=r"Invalid parameter 'a\.\.b'"):
        parse_keyval_help("iothread,help,a..b=1", "qom-type")


def test_keyval_help_forms() -> None:
    assert parse_keyval_help("help", "qom-type") == ({}, True)
    assert parse_keyval_help("iothread,help", "qom-type") == ({"qom-type": "iothread"}, True)
    assert parse_keyval_help("iothread,id=x,?", "qom-type") == (
        {"qom-type": "iothread", "id": "x"},
        True,
    )
    assert parse_keyval_help("help,id=x", "qom-type") == ({"id": "x"}, True)
    assert parse_keyval_help("iothread,id=x", "qom-type") == (
        {"qom-type": "iothread", "id": "x"},
        False,
    )


@pytest.mark.parametrize(
    ("text", "implied", "expected"),
    [
        ("help", "qom-type", (True, None)),
        ("?", "qom-type", (True, None)),
        ("iothread,help", "qom-type", (True, "iothread")),
        ("qom-type=iothread,help", "qom-type", (True, "iothread")),
        ("nosuch,help", "qom-type", (True, "nosuch")),
        ("qom-type=help", "qom-type", (False, "help")),
        ("driver=help", "driver", (False, "help")),
        ("iothread,id=x", "qom-type", (False, "iothread")),
        ("help", None, (True, None)),
        ("a..b=1,help", "qom-type", (False, None)),  # an error, not a help request
        ('{"qom-type":"help"}', "qom-type", (False, None)),
    ],
)
def test_is_help_request(text: str, implied: str | None, expected: tuple[bool, str | None]) -> None:
    assert is_help_request(text, implied) == expected


def test_format_keyval_examples() -> None:
    tree = {"driver": "file", "cache": {"direct": "on"}, "c": ["a,b", "x=y"]}
    text = format_keyval(tree)
    assert text == "driver=file,cache.direct=on,c.0=a,,b,c.1=x=y"
    assert parse_keyval(text) == tree


# ---- keyval: properties ----------------------------------------------------------------------

_names = st.builds(
    str.__add__,
    st.sampled_from(string.ascii_letters),
    st.text(alphabet=string.ascii_letters + string.digits + "_-", max_size=8),
)
_leaf = st.text(max_size=12)


def _trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.dictionaries(_names, children, min_size=1, max_size=4),
            st.lists(children, min_size=1, max_size=4),
        ),
        max_leaves=12,
    )


_top = st.dictionaries(_names, _trees(_leaf), max_size=5)


@given(_top)
@settings(max_examples=150)
def test_format_parse_round_trip(tree: dict[str, Any]) -> None:
    assert parse_keyval(format_keyval(tree)) == tree


@given(_top, _names)
def test_implied_key_round_trip(tree: dict[str, Any], implied: str) -> None:
    # the implied value ends at the first ',' and may not contain '=': use a plain one
    rest = {k: v for k, v in tree.items() if k != implied}
    text = "value" + ("," + format_keyval(rest) if rest else "")
    assert parse_keyval(text, implied) == {implied: "value", **rest}


_keyval_alphabet = st.text(alphabet="ab1.=,?help-_ {}", max_size=30)


@given(st.one_of(st.text(max_size=40), _keyval_alphabet), st.sampled_from([None, "driver"]))
@settings(max_examples=500)
def test_keyval_raises_only_keyval_error(text: str, implied: str | None) -> None:
    try:
        tree, _ = parse_keyval_help(text, implied)
    except KeyvalError as err:
        assert err.message
        return
    assert isinstance(tree, dict)


# ---- JSON form -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a":1}', {"a": 1}),
        ('{"a":1}  ', {"a": 1}),
        ("{'a':'it\\'s'}", {"a": "it's"}),
        ('{"a":"\\/\\"\\\\\\b\\f\\n\\r\\t"}', {"a": '/"\\\b\f\n\r\t'}),
        ('{"a":"\\u0041\\u00e9\\uD83D\\uDE00"}', {"a": "A\u00e9\U0001f600"}),
        ('{"a":"\\u0000"}', {"a": "\0"}),
        ('{"a":-0,"b":1.5,"c":-2e3,"d":1E+2}', {"a": 0, "b": 1.5, "c": -2000.0, "d": 100.0}),
        ('{"a":18446744073709551615}', {"a": 18446744073709551615}),
        ('{"a":18446744073709551616}', {"a": 1.8446744073709552e19}),
        ('{"a":-9223372036854775809}', {"a": -9.223372036854776e18}),
        ('{"a":1e999}', {"a": float("inf")}),
        ('{"a":[],"b":{},"c":[1,[2,{"d":null}]],"e":true,"f":false}', None),
        ('{"a":"\u00e9"}', {"a": "\u00e9"}),
    ],
)
def test_json_accepts(text: str, value: Any) -> None:
    expected = value if value is not None else json.loads(text)
    assert parse_json_option(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"driver":"null-co"', "JSON parse error, premature EOI"),
        ("{", "JSON parse error, premature EOI"),
        ('{"a":1', "JSON parse error, premature EOI"),
        ('{"a":[1', "JSON parse error, premature EOI"),
        ('{"a":tru', "JSON parse error, invalid keyword 'tru'"),
        ('{"a":1} trailing', "Expecting at most one JSON value"),
        ('{"a":1}}', "Expecting at most one JSON value"),
        ('{"a":1} {}', "Expecting at most one JSON value"),
        ('{"a":1}x', "Expecting at most one JSON value"),
        ('{"a":1}  [', "Expecting at most one JSON value"),
        ('{"a":1}"x', "Expecting at most one JSON value"),
        ('{"a":1}\x01', "Expecting at most one JSON value"),
        ("{bad}", "JSON parse error, invalid keyword 'bad'"),
        ('{"a":True}', "JSON parse error, stray 'T'"),
        ('{"a":1,}', "JSON parse error, expecting value"),
        ('{"a":[1,]}', "JSON parse error, expecting value"),
        ("{]", "JSON parse error, expecting value"),
        ("{,}", "JSON parse error, expecting value"),
        ("{:", "JSON parse error, expecting value"),
        ('{"a":}', "JSON parse error, expecting value"),
        ('{"a":"\\x"}', "JSON parse error, invalid escape sequence in string"),
        ('{"a":"\\U0041"}', "JSON parse error, invalid escape sequence in string"),
        ('{"a":"\\u12"}', 'JSON parse error, \\u12" is not a valid Unicode character'),
        ('{"a":"\\u12zz"}', "JSON parse error, \\u12zz is not a valid Unicode character"),
        ('{"a":"\\uD800"}', "JSON parse error, \\uD800 is not a valid Unicode character"),
        ('{"a":"\\uD800\\u0041"}', "JSON parse error, \\uD800 is not a valid Unicode character"),
        ('{"a":"\\uFFFF"}', "JSON parse error, \\uFFFF is not a valid Unicode character"),
        ('{"a":"\\uFFFE"}', "JSON parse error, \\uFFFE is not a valid Unicode character"),
        ('{"a":"\\uFDD0"}', "JSON parse error, \\uFDD0 is not a valid Unicode character"),
        ('{"a":"\uffff"}', "JSON parse error, invalid UTF-8 sequence in string"),
        ('{"a":"\udcc3"}', "JSON parse error, invalid UTF-8 sequence in string"),
        ('{"a":"\udcff"}', "JSON parse error, stray '\"\udcff'"),
        ('{"a":"\t"}', "JSON parse error, stray '\"\t'"),
        ('{"a":01}', "JSON parse error, stray '01'"),
        ('{"a":012}', "JSON parse error, stray '01'"),
        ('{"a":-01}', "JSON parse error, stray '-01'"),
        ('{"a":-}', "JSON parse error, stray '-}'"),
        ('{"a":1.}', "JSON parse error, stray '1.}'"),
        ('{"a":1e}', "JSON parse error, stray '1e}'"),
        ('{"a":1e+}', "JSON parse error, stray '1e+}'"),
        ('{"a":%d}', "JSON parse error, stray '%'"),
        ('{"a":"b\\', "JSON parse error, stray '\"b\\'"),
        ('{"a":"x', "JSON parse error, stray '\"x'"),
        ('{"a":1.', "JSON parse error, stray '1.'"),
        ('{"a":0e5}', "JSON parse error, expected separator in dict"),
        ('{"a":1 2}', "JSON parse error, expected separator in dict"),
        ('{"a":1]', "JSON parse error, expected separator in dict"),
        ('{"a":[1 2]}', "JSON parse error, expected separator in list"),
        ('{"a" 1}', "JSON parse error, missing : in object pair"),
        ('{"a"}', "JSON parse error, missing : in object pair"),
        ("{1:2}", "JSON parse error, key is not a string in object"),
        ('{{"a":1}:2}', "JSON parse error, key is not a string in object"),
        ('{"a":1,"a":2}', "JSON parse error, duplicate key"),
        ('{"a":{"b":1,"b":[}}', "JSON parse error, expecting value"),
    ],
)
def test_json_errors(text: str, message: str) -> None:
    with pytest.raises(KeyvalError) as info:
        parse_json_option(text)
    assert info.value.message == message


def test_json_nesting_limit() -> None:
    ok = '{"a":' * 1024 + "1" + "}" * 1024
    value = parse_json_option(ok)
    for _ in range(1024):
        value = value["a"]
    assert value == 1
    with pytest.raises(KeyvalError, match=r"^JSON nesting depth limit exceeded$"):
        parse_json_option('{"a":' * 1025 + "1" + "}" * 1025)


_json_text = st.text(
    st.one_of(
        st.characters(max_codepoint=0x7F),
        st.characters(min_codepoint=0x80, max_codepoint=0xD7FF),
        st.sampled_from("\ue000\ufdcf\ufdf0\ufffd\U0001f600\U0010fffd"),
    ),
    max_size=10,
)
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _json_text,
)
_json_values = st.recursive(
    _json_leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(_json_text, kids, max_size=4)
    ),
    max_leaves=15,
)


@given(st.dictionaries(_json_text, _json_values, max_size=5), st.booleans())
@settings(max_examples=150)
def test_json_round_trip(obj: dict[str, Any], ascii_only: bool) -> None:
    assert parse_json_option(json.dumps(obj, ensure_ascii=ascii_only)) == obj


@given(st.text(alphabet="{}[]:,\"'\\ -0123456789.eE+truefalsnl%xu", max_size=30))
@settings(max_examples=500)
def test_json_raises_only_keyval_error(tail: str) -> None:
    try:
        parse_json_option("{" + tail)
    except KeyvalError as err:
        assert err.message


# ---- scalars ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("on", True),
        ("yes", True),
        ("true", True),
        ("y", True),
        ("off", False),
        ("no", False),
        ("false", False),
        ("n", False),
        ("ON", None),
        ("Yes", None),
        ("1", None),
        ("", None),
        ("maybe", None),
    ],
)
def test_parse_bool(text: str, value: bool | None) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("42", 42),
        ("-42", -42),
        ("+7", 7),
        ("0x1F", 31),
        ("0X1f", 31),
        ("-0x10", -16),
        ("010", 8),
        (" \t5", 5),
        ("9223372036854775807", 2**63 - 1),
        ("-9223372036854775808", -(2**63)),
        ("9223372036854775808", None),
        ("08", None),
        ("0x", None),
        ("1M", None),
        ("abc", None),
        ("", None),
        (" ", None),
        ("5 ", None),
        ("1.0", None),
        ("- 5", None),
    ],
)
def test_parse_int(text: str, value: int | None) -> None:
    assert parse_int(text) == value


def test_parse_uint_wraps_negative() -> None:
    assert parse_uint("-1") == 2**64 - 1
    assert parse_uint("18446744073709551615") == 2**64 - 1
    assert parse_uint("18446744073709551616") is None
    assert parse_uint("0x10") == 16
    assert parse_uint("abc") is None


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_parse_int_forms(n: int) -> None:
    sign = "-" if n < 0 else ""
    assert parse_int(str(n)) == n
    assert parse_int(f"{sign}0x{abs(n):x}") == n
    assert parse_int(f"{sign}0{abs(n):o}") == n


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("512", 512),
        ("+5", 5),
        (" 1k", 1024),
        ("1K", 1024),
        ("1b", 1),
        ("1B", 1),
        ("4M", 4 << 20),
        ("1G", 1 << 30),
        ("1t", 1 << 40),
        ("1p", 1 << 50),
        ("1E", 1 << 60),
        ("1.5k", 1536),
        ("1.5G", 3 << 29),
        ("5.", 5),
        ("1.k", 1024),
        ("010", 10),
        ("0x10", 16),
        ("0x20M", 32 << 20),
        ("15.9E", 18331451923248866944),
        ("18446744073709551615", 2**64 - 1),
        ("1.5", None),
        ("0.5", None),
        (".5", None),
        ("1.5B", None),
        ("1kb", None),
        ("1e3", None),
        ("1.5e3", None),
        ("-0", None),
        ("-1", None),
        ("-1k", None),
        ("", None),
        ("k", None),
        ("0x", None),
        ("0x1.5k", None),
        ("16E", None),
        ("18446744073709551616", None),
    ],
)
def test_parse_size(text: str, value: int | None) -> None:
    assert parse_size(text) == value


def test_parse_size_checked_distinguishes_errors() -> None:
    assert parse_size_checked("0x20M") == (32 << 20, True)
    assert parse_size_checked("0x20") == (32, False)
    assert parse_size_checked("20M") == (20 << 20, False)
    with pytest.raises(OverflowError):
        parse_size_checked("16E")
    with pytest.raises(OverflowError):
        parse_size_checked("99999999999999999999")
    with pytest.raises(ValueError):
        parse_size_checked("-1")
    with pytest.raises(ValueError):
        parse_size_checked("abc")


@given(st.integers(min_value=0, max_value=2**64 - 1), st.sampled_from(list(enumerate("BKMGTPE"))))
def test_parse_size_suffixes(n: int, unit: tuple[int, str]) -> None:
    power, letter = unit
    expected = n * 1024**power
    got = parse_size(f"{n}{letter}")
    assert got == (expected if expected < 2**64 else None)
    assert parse_size(f"{n}{letter.lower()}") == got


@given(st.text(alphabet=string.digits + "xX.+-eEkKmMbB ", max_size=12))
def test_parse_size_never_crashes(text: str) -> None:
    got = parse_size(text)
    assert got is None or 0 <= got < 2**64
