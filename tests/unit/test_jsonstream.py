"""Unit tests of the QMP JSON stream parser and printer (pure core).

Expected texts were recorded from qemu-storage-daemon 7.2 by sending the same bytes to its
monitor (see ../shared/reference/qsd-behaviour.md section 1 and qmp-errors.txt).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.monitor.jsonstream import (
    MAX_TOKENS,
    JsonParseError,
    JsonStream,
    JsonValue,
    to_json,
)
from storage_daemon.qdict import qdict_order

Item = JsonValue | JsonParseError


def parse_all(data: bytes, **limits: int) -> list[Item]:
    stream = JsonStream(**limits)
    return stream.feed(data) + stream.finish()


def err(text: str) -> JsonParseError:
    return JsonParseError("JSON parse error, " + text)


# (input, expected results); the inputs end with a delimiter so pending numbers complete.
REFERENCE_CASES: list[tuple[bytes, list[Item]]] = [
    (b'{bad json}{"execute":"x"}', [err("invalid keyword 'bad'"), {"execute": "x"}]),
    (b"}", [err("expecting value")]),
    (b"]", [err("expecting value")]),
    (b"123 ", [123]),
    (b'"str"', ["str"]),
    (b"[1,2] ", [[1, 2]]),
    (b'{"a":}', [err("expecting value")]),
    (b'{"a" 1}', [err("missing : in object pair")]),
    (b'{"a",1}', [err("missing : in object pair")]),
    (b"{1:2}", [err("key is not a string in object")]),
    (b'{"a":1,2}', [err("key is not a string in object")]),
    (b"{[1,2]:3}", [err("key is not a string in object")]),
    (b"{[1 2]:3}", [err("expected separator in list")]),
    (b"{bad:3}", [err("invalid keyword 'bad'")]),
    (b"[1 2]", [err("expected separator in list")]),
    (b"[1,]", [err("expecting value")]),
    (b'{"a":1,}', [err("expecting value")]),
    (b'{"a":1 "b":2}', [err("expected separator in dict")]),
    (b'{"a":1,"a":2}', [err("duplicate key")]),
    (b'{"a":1,"a":bad}', [err("invalid keyword 'bad'")]),
    (b"{,}", [err("expecting value")]),
    (b"[:]", [err("expecting value")]),
    (b'{"a"::}', [err("expecting value")]),
    (b"\xff", [err("stray '\ufffd'")]),
    (b"\xc3\xa9 {}", [err("stray '\ufffd'"), {}]),
    (b"@abc def{}", [err("stray '@'"), {}]),
    (b'@abc,"x"', [err("stray '@'"), err("expecting value"), "x"]),
    (b'@abc\t"x"{}', [err("stray '@'"), {}]),
    (b'@abc "x"\n"y" ', [err("stray '@'"), "y"]),
    (b"@abc\x1b{}", [err("stray '@'"), err("stray '\x1b'"), {}]),
    (
        b'-{"execute":"x"}',
        [err("stray '-{'"), err("expecting value"), "x", err("expecting value")],
    ),
    (b"-x{}", [err("stray '-x'"), {}]),
    (b"01{}", [err("stray '01'"), {}]),
    (b"1. {}", [err("stray '1. '"), {}]),
    (b"1.5e {}", [err("stray '1.5e '"), {}]),
    (b"TRUE{}", [err("stray 'T'"), {}]),
    (
        b"1e5 true null nul truex ",
        [1e5, True, None, err("invalid keyword 'nul'"), err("invalid keyword 'truex'")],
    ),
    (b"true1 ", [True, 1]),
    (b'"a\x01b"}', [err("stray '\"a\x01'"), err("expecting value")]),
    (b'"a\xffb"}', [err("stray '\"a\ufffd'"), err("expecting value")]),
    (b'"\t"{}', [err("stray '\"\t'"), {}]),
    (b'"\\\x01"{}', [err("stray '\"\\\x01'"), {}]),
    (b'{"id":"x"\x01}', [err("stray '\x01'"), err("expecting value")]),
    (b'"a\xc3b"', [err("invalid UTF-8 sequence in string")]),
    (b'"\xed\xa0\x80"', [err("invalid UTF-8 sequence in string")]),
    (b'"\xef\xbf\xbf"', [err("invalid UTF-8 sequence in string")]),
    (b'"\xf4\x8f\xbf\xbf"', [err("invalid UTF-8 sequence in string")]),
    (b'"\xf4\x90\x80\x80"', [err("invalid UTF-8 sequence in string")]),
    (b'"\xe0\x80\xaf"', [err("invalid UTF-8 sequence in string")]),
    (b'"\xc0\x80"', ["\x00"]),
    (b'"\x7f\xc2\x80"', ["\x7f\x80"]),
    (b'"\\x"', [err("invalid escape sequence in string")]),
    (b'"\\\xc3\xa9"', [err("invalid escape sequence in string")]),
    (b'"\xc3\\x\xc3"', [err("invalid UTF-8 sequence in string")]),
    (b'"\\x\xc3"', [err("invalid escape sequence in string")]),
    (b'"\\u12"', [err('\\u12" is not a valid Unicode character')]),
    (b'"\\u00"', [err('\\u00" is not a valid Unicode character')]),
    (b'"\\ud83d"', [err("\\ud83d is not a valid Unicode character")]),
    (b'"\\uD800\\u0041"', [err("\\uD800 is not a valid Unicode character")]),
    (b'"\\uD800\\uDBFF"', [err("\\uD800 is not a valid Unicode character")]),
    (b'"\\uDC00"', [err("\\uDC00 is not a valid Unicode character")]),
    (b'"\\uZZZZ"', [err("\\uZZZZ is not a valid Unicode character")]),
    (b'"\\uFFFF"', [err("\\uFFFF is not a valid Unicode character")]),
    (b'"\\uFDD0"', [err("\\uFDD0 is not a valid Unicode character")]),
    (b'"\\u0000"', ["\x00"]),
    (b'"\\ud83d\\ude00\\u00e9"', ["\U0001f600\u00e9"]),
    (b'"\\n\\t\\b\\f\\r\\/\\u0001\\u001f\\\'"', ["\n\t\b\f\r/\x01\x1f'"]),
    (b"'sq' 'a\\\"b\"' 'it\\'s'", ["sq", 'a"b"', "it's"]),
    (b"%d ", [err("stray '%'")]),
    (b"-0 -0.0 1E2 -1.5e-7 1.0 ", [0, -0.0, 100.0, -1.5e-7, 1.0]),
    (b"18446744073709551615 ", [18446744073709551615]),
    (b"99999999999999999999 -9223372036854775809 ", [1e20, -9.2233720368547758e18]),
    (b"1e400 ", [float("inf")]),
]


@pytest.mark.parametrize(("data", "expected"), REFERENCE_CASES)
def test_reference_behaviour(data: bytes, expected: list[Item]) -> None:
    result = parse_all(data)
    assert result == expected
    # Floats and ints must keep their type (1.0 stays a float, 100000 an int).
    assert [type(x) for x in result] == [type(x) for x in expected]


def test_unbalanced_message_waits_for_the_closing_bracket() -> None:
    stream = JsonStream()
    assert stream.feed(b'[1,2 {"execute":"x"}') == []
    assert stream.feed(b"]") == [err("expected separator in list")]


def test_finish_reports_an_open_message() -> None:
    stream = JsonStream()
    assert stream.feed(b"[1, 2") == []
    assert stream.finish() == [err("premature EOI")]
    assert stream.feed(b"12") == []
    assert stream.finish() == [12]
    assert stream.feed(b'"abc') == []
    assert stream.finish() == [err("stray '\"abc'")]


def test_nesting_limit_matches_qemu() -> None:
    (deep,) = parse_all(b"[" * 1024 + b"]" * 1024)
    for _ in range(1023):
        assert isinstance(deep, list) and len(deep) == 1
        deep = deep[0]
    assert deep == []
    assert to_json(parse_all(b"[" * 1024 + b"]" * 1024)[0]) == "[" * 1024 + "]" * 1024
    result = parse_all(b"[" * 1025 + b"]" * 3)
    assert (
        result
        == [JsonParseError("JSON nesting depth limit exceeded")] + [err("expecting value")] * 3
    )
    mixed = b'{"a":' * 600 + b"[" * 425
    assert parse_all(mixed) == [JsonParseError("JSON nesting depth limit exceeded")]


def test_token_count_limit_matches_qemu() -> None:
    # qsd with the default 2^21: "[" + "1,"*2^20 + "1]" is 2^21 + 3 tokens; the limit trips on
    # token 2^21 + 1 (a comma) and the rest form new messages. Same shape with a small limit.
    assert MAX_TOKENS == 1 << 21
    n = 8
    over = b"[" + b"1," * n + b"1]"
    result = parse_all(over, max_tokens=2 * n)
    assert result == [JsonParseError("JSON token count limit exceeded"), 1, err("expecting value")]
    exact = b"[" + b"1," * (n - 1) + b"1]"  # 2n + 1 tokens: only the closer is dropped
    assert parse_all(exact, max_tokens=2 * n) == [JsonParseError("JSON token count limit exceeded")]
    assert parse_all(exact, max_tokens=2 * n + 1) == [[1] * n]


def test_size_limit_bounds_a_huge_string() -> None:
    limit = 1 << 16
    stream = JsonStream(max_bytes=limit)
    results: list[Item] = []
    results += stream.feed(b'{"execute":"x","id":"')
    peak = 0
    for _ in range(40):
        results += stream.feed(b"a" * 4096)
        peak = max(peak, stream.buffered_bytes)
    assert peak <= limit + 4096
    assert JsonParseError("JSON token size limit exceeded") in results
    # As in QEMU the lexer restarts mid-string; a control byte resynchronises it.
    assert stream.feed(b'"}\n{"execute":"y"}')[-1] == {"execute": "y"}


def test_size_limit_over_many_tokens() -> None:
    stream = JsonStream(max_bytes=100)
    out = stream.feed(b'["' + b"a" * 60 + b'","' + b"b" * 60 + b'"]')
    assert out[0] == JsonParseError("JSON token size limit exceeded")
    assert stream.feed(b"{}") == [{}]


def test_one_byte_writes_stay_linear() -> None:
    # 300 kB fed one byte at a time: a quadratic implementation would not finish.
    payload = b'{"execute":"x","arguments":{"s":"' + b"x" * 300_000 + b'"}}'
    stream = JsonStream()
    results: list[Item] = []
    for i in range(len(payload)):
        results += stream.feed(payload[i : i + 1])
    assert results == [{"execute": "x", "arguments": {"s": "x" * 300_000}}]


# -- split invariance ----------------------------------------------------------------------

# QEMU refuses noncharacters (U+FDD0..U+FDEF, U+xFFFE/F) in strings; surrogates cannot be sent.
chars = st.characters(blacklist_categories=["Cs"], max_codepoint=0xFFFD).filter(
    lambda c: not 0xFDD0 <= ord(c) <= 0xFDEF
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=chars),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet=chars, max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)

GARBAGE = [
    b"{bad json}",
    b"}",
    b"]]",
    b"\xff",
    b"@x",
    b"-",
    b'"a\x01b"',
    b"'single'",
    b"01",
    b'{"a" 1}',
    b"[1,",
    b'"\\u12"',
    b" \n\t",
    b"123",
    b"\x1b",
]

fragments = st.lists(
    st.one_of(
        json_values.map(lambda v: to_json(v, qdict=False).encode()),
        st.sampled_from(GARBAGE),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(fragments, st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_gives_the_same_results(parts: list[bytes], cuts: list[int]) -> None:
    data = b" ".join(parts) + b" "
    whole = parse_all(data)
    points = sorted({c % (len(data) + 1) for c in cuts})
    stream = JsonStream()
    pieces: list[Item] = []
    prev = 0
    for point in [*points, len(data)]:
        pieces += stream.feed(data[prev:point])
        prev = point
    pieces += stream.finish()
    assert pieces == whole


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_printed_values_parse_back(value: JsonValue) -> None:
    assert parse_all(to_json(value).encode() + b" ") == [value]
    assert parse_all(to_json(value, pretty=True).encode() + b" ") == [value]


@settings(max_examples=100, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=5))
def test_back_to_back_messages(values: list[JsonValue]) -> None:
    data = b"".join(to_json(v).encode() + b"\n" for v in values)
    assert parse_all(data) == values


# -- printing ------------------------------------------------------------------------------


def test_qdict_order_matches_qsd_output() -> None:
    # Orders observed in qsd replies.
    assert qdict_order(["major", "minor", "micro"]) == ["micro", "minor", "major"]
    assert qdict_order(["qemu", "package"]) == ["qemu", "package"]
    assert qdict_order(["return", "id"]) == ["return", "id"]
    assert qdict_order(["error", "id"]) == ["id", "error"]
    assert qdict_order(["class", "desc"]) == ["class", "desc"]
    assert qdict_order(["event", "data", "timestamp"]) == ["timestamp", "event", "data"]
    assert qdict_order(["z", "a", "m"]) == ["a", "z", "m"]


def test_string_escaping_matches_qsd() -> None:
    text = '\u00e9\u20ac\U0001f600\u00e9/\x7f\n\t\b\f\r\x01\x1f\x00"\\u00e9'
    assert to_json(text) == (
        '"\\u00E9\\u20AC\\uD83D\\uDE00\\u00E9/\\u007F\\n\\t\\b\\f\\r'
        '\\u0001\\u001F\\u0000\\"\\\\u00e9"'
    )


def test_numbers_print_like_qsd() -> None:
    assert to_json([0.1, 1.0, -0.0, 1e20, 1e400, 123456789012345678, -1.5e-7, 5e-324]) == (
        "[0.10000000000000001, 1, -0, 1e+20, inf, 123456789012345678, "
        "-1.4999999999999999e-07, 4.9406564584124654e-324]"
    )


def test_pretty_printing_matches_qsd() -> None:
    value = {"return": [], "id": [1, {"a": []}, {}]}
    assert to_json(value, pretty=True) == (
        '{\n    "return": [\n    ],\n    "id": [\n        1,\n        {\n'
        '            "a": [\n            ]\n        },\n        {\n        }\n    ]\n}'
    )


def test_own_order_when_asked() -> None:
    assert to_json({"z": 1, "a": 2}, qdict=False) == '{"z": 1, "a": 2}'
    assert to_json({"z": 1, "a": 2}) == '{"a": 2, "z": 1}'


def test_unserialisable_value_is_rejected() -> None:
    with pytest.raises(TypeError):
        to_json({"a": object()})


def test_no_exponent_after_a_bare_zero() -> None:
    # qsd: {"a":0e5} -> "JSON parse error, expected separator in dict" (QEMU's lexer ends the
    # number at "0"); 1e5 and 0.5e5 are numbers.
    stream = JsonStream()
    items = stream.feed(b'{"a":0e5}{"b":1e5}{"c":0.5e5}')
    assert isinstance(items[0], JsonParseError)
    assert items[0].desc == "JSON parse error, expected separator in dict"
    assert {"b": 100000.0} in items and {"c": 50000.0} in items
