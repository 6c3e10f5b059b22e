"""Input visitor: qsd 7.2's exact error texts and precedence, keyval coercion, alternates.

Expected texts were taken from the reference qemu-storage-daemon 7.2 (QMP and command line).
Results are the daemon's plain classes (qapi_generated/plain.py); that they agree with the
pydantic models' validation is checked in test_qapi_plain.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.errors import QmpError
from storage_daemon.qapi.gen_models import branch_class
from storage_daemon.qapi.runtime import COMMANDS, command_args, to_wire, visit_input
from storage_daemon.qapi_generated import plain as p
from storage_daemon.qdict import ghash_order


def err(type_name: str, value: object, *, keyval: bool = False) -> str:
    with pytest.raises(QmpError) as exc:
        visit_input(type_name, value, keyval=keyval)
    assert exc.value.error_class == "GenericError"
    return exc.value.desc


NULL = {"driver": "null-co", "node-name": "n"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({**NULL, "size": "abc"}, "Invalid parameter type for 'size', expected: integer"),
        ({**NULL, "size": 1.0}, "Invalid parameter type for 'size', expected: integer"),
        ({**NULL, "size": 1 << 63}, "Invalid parameter type for 'size', expected: integer"),
        ({**NULL, "size": True}, "Invalid parameter type for 'size', expected: integer"),
        ({**NULL, "latency-ns": 1.5}, "Parameter 'latency-ns' expects uint64"),
        ({**NULL, "latency-ns": "1"}, "Parameter 'latency-ns' expects uint64"),
        ({**NULL, "latency-ns": 1 << 64}, "Parameter 'latency-ns' expects uint64"),
        ({**NULL, "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"driver": "file", "node-name": "f"}, "Parameter 'filename' is missing"),
        (
            {"driver": "nosuch", "node-name": "a"},
            "Parameter 'driver' does not accept value 'nosuch'",
        ),
        ({"driver": 1}, "Invalid parameter type for 'driver', expected: string"),
        ({"node-name": "a", "bogus": 1}, "Parameter 'driver' is missing"),
        ({**NULL, "read-only": "on"}, "Invalid parameter type for 'read-only', expected: boolean"),
        ({**NULL, "read-only": None}, "Invalid parameter type for 'read-only', expected: boolean"),
        (
            {"driver": "null-co", "node-name": None},
            "Invalid parameter type for 'node-name', expected: string",
        ),
        (
            {**NULL, "detect-zeroes": 1},
            "Invalid parameter type for 'detect-zeroes', expected: string",
        ),
        ({**NULL, "cache": []}, "Invalid parameter type for 'cache', expected: object"),
        (
            {**NULL, "cache": {"direct": 1}},
            "Invalid parameter type for 'cache.direct', expected: boolean",
        ),
        ({**NULL, "cache": {"bogus": 1}, "size": "x"}, "Parameter 'cache.bogus' is unexpected"),
        ({"driver": "raw", "file": 42}, "Invalid parameter type for 'file', expected: BlockdevRef"),
        (
            {"driver": "raw", "file": None},
            "Invalid parameter type for 'file', expected: BlockdevRef",
        ),
        (
            {"driver": "raw", "file": ["n0"]},
            "Invalid parameter type for 'file', expected: BlockdevRef",
        ),
        (
            {"driver": "raw", "file": {"driver": "null-co", "bogus": 1}},
            "Parameter 'file.bogus' is unexpected",
        ),
        (
            {"driver": "raw", "file": {"driver": "nosuch"}},
            "Parameter 'driver' does not accept value 'nosuch'",
        ),
        (
            {"driver": "raw", "file": {"driver": "null-co", "size": "x"}},
            "Invalid parameter type for 'file.size', expected: integer",
        ),
        (
            {"driver": "file", "filename": "x", "locking": "maybe"},
            "Parameter 'locking' does not accept value 'maybe'",
        ),
        (
            {"driver": "file", "filename": "x", "aio-max-batch": "1"},
            "Invalid parameter type for 'aio-max-batch', expected: integer",
        ),
    ],
)
def test_qmp_blockdev_errors(value: dict[str, Any], message: str) -> None:
    assert err("BlockdevOptions", value) == message


def cmd_err(name: str, args: dict[str, Any] | None) -> str:
    with pytest.raises(QmpError) as exc:
        command_args(name, args)
    return exc.value.desc


def test_qmp_command_args() -> None:
    assert cmd_err("query-version", {"x": 1}) == "Parameter 'x' is unexpected"
    assert command_args("query-version", None) is None
    assert command_args("quit", {}) is None
    assert (
        cmd_err("qmp_capabilities", {"enable": ["nosuch"]})
        == "Parameter 'null' does not accept value 'nosuch'"
    )
    assert (
        cmd_err("qmp_capabilities", {"enable": [1]})
        == "Invalid parameter type for 'enable[0]', expected: string"
    )
    assert (
        cmd_err("qmp_capabilities", {"enable": "oob"})
        == "Invalid parameter type for 'enable', expected: array"
    )
    assert (
        cmd_err("query-named-block-nodes", {"flat": "x"})
        == "Invalid parameter type for 'flat', expected: boolean"
    )
    assert cmd_err("object-add", {"id": "x"}) == "Parameter 'qom-type' is missing"
    assert cmd_err("object-add", {"qom-type": "iothread"}) == "Parameter 'id' is missing"
    assert (
        cmd_err("object-add", {"qom-type": "iothread", "id": "x", "poll-max-ns": -1, "bogus": 1})
        == "Parameter 'bogus' is unexpected"
    )
    caps = command_args("qmp_capabilities", {"enable": ["oob"]})
    assert type(caps) is p.QmpCapabilitiesArgs and caps.enable == [p.QMPCapability.OOB]
    assert type(caps.enable[0]) is p.QMPCapability
    args = command_args("blockdev-del", {"node-name": "n0"})
    assert type(args) is p.BlockdevDelArgs and args.node_name == "n0"
    opts = command_args("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    assert type(opts) is p.BlockdevOptions_null_co
    assert opts.driver is p.BlockdevDriver.NULL_CO
    assert COMMANDS["blockdev-add"].boxed and COMMANDS["blockdev-add"].arg_type == "BlockdevOptions"


def test_qmp_nested_paths() -> None:
    assert (
        err("SocketAddressLegacy", {"type": "unix", "path": "/x"}) == "Parameter 'data' is missing"
    )
    assert err("SocketAddressLegacy", {"data": {}}) == "Parameter 'type' is missing"
    assert (
        err("SocketAddressLegacy", {"type": "nosuch", "data": {}})
        == "Parameter 'type' does not accept value 'nosuch'"
    )
    assert (
        err(
            "ChardevBackend",
            {
                "type": "socket",
                "data": {"addr": {"type": "inet", "data": {"host": "x", "port": 1}}},
            },
        )
        == "Invalid parameter type for 'data.addr.data.port', expected: string"
    )
    assert (
        err(
            "ChardevBackend",
            {
                "type": "socket",
                "data": {"addr": {"type": "unix", "data": {"path": "p", "bogus": 1}}},
            },
        )
        == "Parameter 'data.addr.data.bogus' is unexpected"
    )
    assert err("XDbgBlockGraphEdgeList", [{}]) == "Parameter '[0].parent' is missing"


@pytest.mark.parametrize(
    ("type_name", "value", "message"),
    [
        (
            "InetSocketAddress",
            {"host": "h", "port": "1", "to": 70000},
            "Parameter 'to' expects uint16_t",
        ),
        (
            "InetSocketAddress",
            {"host": "h", "port": "1", "to": -1},
            "Parameter 'to' expects uint16_t",
        ),
        (
            "Qcow2BitmapInfo",
            {"name": "b", "granularity": 1 << 32, "flags": []},
            "Parameter 'granularity' expects uint32_t",
        ),
        (
            "Qcow2BitmapInfo",
            {"name": "b", "granularity": 1.5, "flags": []},
            "Parameter 'granularity' expects uint64",
        ),
    ],
)
def test_qmp_integer_widths(type_name: str, value: object, message: str) -> None:
    assert err(type_name, value) == message


@pytest.mark.parametrize(
    ("name", "bits", "signed"),
    [
        ("int8", 8, True),
        ("int16", 16, True),
        ("int32", 32, True),
        ("uint8", 8, False),
        ("uint16", 16, False),
        ("uint32", 32, False),
    ],
)
def test_integer_ranges(name: str, bits: int, signed: bool) -> None:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    ctype = f"{name}_t"
    for keyval in (False, True):
        enc: Any = (lambda v: str(v)) if keyval else (lambda v: v)
        assert visit_input(name, enc(lo), keyval=keyval) == lo
        assert visit_input(name, enc(hi), keyval=keyval) == hi
        assert err(name, enc(hi + 1), keyval=keyval) == f"Parameter 'null' expects {ctype}"
        assert err(name, enc(lo - 1), keyval=keyval) == f"Parameter 'null' expects {ctype}"


def test_uint64_accepts_negative_like_qemu() -> None:
    assert visit_input("uint64", -1) == (1 << 64) - 1
    assert visit_input("uint64", "-1", keyval=True) == (1 << 64) - 1
    assert visit_input("int", -(1 << 63)) == -(1 << 63)
    assert visit_input("number", 3) == 3.0
    assert err("number", "3") == "Invalid parameter type for 'null', expected: number"
    assert visit_input("any", {"a": [1, None]}) == {"a": [1, None]}
    assert visit_input("null", None) is None
    assert err("null", 0) == "Invalid parameter type for 'null', expected: null"


KV_NULL = {"driver": "null-co", "node-name": "n"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({**KV_NULL, "size": "abc"}, "Parameter 'size' expects integer"),
        ({**KV_NULL, "size": "1M"}, "Parameter 'size' expects integer"),
        ({**KV_NULL, "size": "08"}, "Parameter 'size' expects integer"),
        ({**KV_NULL, "size": "1.5"}, "Parameter 'size' expects integer"),
        ({**KV_NULL, "size": ""}, "Parameter 'size' expects integer"),
        ({**KV_NULL, "size": "0x"}, "Parameter 'size' expects integer"),
        ({**KV_NULL, "size": "99999999999999999999"}, "Parameter 'size' expects integer"),
        ({**KV_NULL, "size": {"a": "1"}}, "Parameters 'size.*' are unexpected"),
        ({**KV_NULL, "size": ["1"]}, "Parameters 'size.*' are unexpected"),
        ({**KV_NULL, "latency-ns": "abc"}, "Parameter 'latency-ns' expects integer"),
        ({**KV_NULL, "read-only": "maybe"}, "Parameter 'read-only' expects 'on' or 'off'"),
        (
            {**KV_NULL, "read-only": "TRUE", "size": "abc"},
            "Parameter 'read-only' expects 'on' or 'off'",
        ),
        ({**KV_NULL, "read-only": "yes", "size": "abc"}, "Parameter 'size' expects integer"),
        (
            {**KV_NULL, "cache": {"direct": "maybe"}},
            "Parameter 'cache.direct' expects 'on' or 'off'",
        ),
        ({**KV_NULL, "cache": ["on"]}, "Invalid parameter type for 'cache', expected: object"),
        ({**KV_NULL, "cache": "on"}, "Invalid parameter type for 'cache', expected: object"),
        (
            {**KV_NULL, "detect-zeroes": "maybe"},
            "Parameter 'detect-zeroes' does not accept value 'maybe'",
        ),
        (
            {"driver": "raw", "node-name": "r", "file": ["x"]},
            "Invalid parameter type for 'file', expected: BlockdevRef",
        ),
        (
            {"driver": "raw", "node-name": "r", "file": {"driver": "nosuch"}},
            "Parameter 'driver' does not accept value 'nosuch'",
        ),
        (
            {"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "size": "abc"}},
            "Parameter 'file.size' expects integer",
        ),
        (
            {"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "x": {"y": "1"}}},
            "Parameter 'file.x' is unexpected",
        ),
        (
            {"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "cache": ["x"]}},
            "Invalid parameter type for 'file.cache', expected: object",
        ),
        (
            {"driver": "null-co", "node-name": "n", "driver2": "raw"},
            "Parameter 'driver2' is unexpected",
        ),
        ({"driver": "raw", "node-name": "n"}, "Parameter 'file' is missing"),
        (
            {"driver": "file", "node-name": "f", "filename": {"a": "1"}},
            "Parameters 'filename.*' are unexpected",
        ),
        (
            {"driver": "file", "node-name": "f", "filename": "x", "aio-max-batch": "1k"},
            "Parameter 'aio-max-batch' expects integer",
        ),
        (
            {"driver": "file", "node-name": "f", "filename": "x", "locking": "maybe"},
            "Parameter 'locking' does not accept value 'maybe'",
        ),
        ({}, "Parameter 'driver' is missing"),
    ],
)
def test_keyval_blockdev_errors(value: dict[str, Any], message: str) -> None:
    assert err("BlockdevOptions", value, keyval=True) == message


def test_keyval_other_option_types() -> None:
    assert (
        err("MonitorOptions", {"chardev": "c0", "pretty": "maybe"}, keyval=True)
        == "Parameter 'pretty' expects 'on' or 'off'"
    )
    assert (
        err("MonitorOptions", {"chardev": "c0", "bogus": "1"}, keyval=True)
        == "Parameter 'bogus' is unexpected"
    )
    assert (
        err("MonitorOptions", {"chardev": "c0", "mode": "foo"}, keyval=True)
        == "Parameter 'mode' does not accept value 'foo'"
    )
    assert (
        err("MonitorOptions", {"chardev": "c0", "pretty": {"a": "x"}}, keyval=True)
        == "Parameters 'pretty.*' are unexpected"
    )
    assert (
        err("ObjectOptions", {"qom-type": "nosuchtype", "id": "x"}, keyval=True)
        == "Parameter 'qom-type' does not accept value 'nosuchtype'"
    )
    assert (
        err("ObjectOptions", {"qom-type": "iothread"}, keyval=True) == "Parameter 'id' is missing"
    )
    # known members first, unexpected ones last, whatever the input order
    assert (
        err(
            "ObjectOptions",
            {"qom-type": "iothread", "id": "io0", "bogus": "1", "poll-max-ns": "abc"},
            keyval=True,
        )
        == "Parameter 'poll-max-ns' expects integer"
    )
    assert (
        err("ObjectOptions", {"qom-type": "iothread", "id": "io0", "poll-grow": "0x"}, keyval=True)
        == "Parameter 'poll-grow' expects integer"
    )
    assert err("SocketAddress", {"path": "/tmp/x"}, keyval=True) == "Parameter 'type' is missing"
    assert (
        err("SocketAddress", {"type": "unix", "path": "/x", "bogus": "1"}, keyval=True)
        == "Parameter 'bogus' is unexpected"
    )
    assert (
        err(
            "SocketAddress",
            {"type": "inet", "host": "h", "port": "1", "ipv4": "maybe"},
            keyval=True,
        )
        == "Parameter 'ipv4' expects 'on' or 'off'"
    )
    assert (
        err("SocketAddress", "foo", keyval=True)
        == "Invalid parameter type for 'null', expected: object"
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("010", 8),
        ("0x10", 16),
        ("0X1f", 31),
        (" 5", 5),
        ("+5", 5),
        ("-0", 0),
        ("-12", -12),
        ("9223372036854775807", (1 << 63) - 1),
        ("-9223372036854775808", -(1 << 63)),
    ],
)
def test_keyval_int_syntax(text: str, value: int) -> None:
    assert visit_input("int", text, keyval=True) == value


@pytest.mark.parametrize(
    "text", ["", "0x", "08", "1k", "1.0", "5 ", "9223372036854775808", "--1", "abc"]
)
def test_keyval_int_rejects(text: str) -> None:
    assert err("int", text, keyval=True) == "Parameter 'null' expects integer"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1024", 1024),
        ("010", 10),
        ("0x10", 16),
        ("1b", 1),
        ("1B", 1),
        ("1k", 1024),
        ("1K", 1024),
        ("1.5k", 1536),
        ("1.k", 1024),
        ("2M", 2 << 20),
        ("1G", 1 << 30),
        ("1t", 1 << 40),
        ("1P", 1 << 50),
        ("1E", 1 << 60),
        (" 1k", 1024),
        ("0x1k", 1024),
        ("15E", 15 << 60),
    ],
)
def test_keyval_size_syntax(text: str, value: int) -> None:
    assert visit_input("size", text, keyval=True) == value


@pytest.mark.parametrize(
    "text", ["-1", "abc", "1kB", ".5k", "1e3", "1.5", "2k+", "16E", "99999999999999999999", ""]
)
def test_keyval_size_rejects(text: str) -> None:
    assert err("size", text, keyval=True) == "Parameter 'null' expects size"


def test_keyval_bool_and_number() -> None:
    for text in ("on", "yes", "true"):
        assert visit_input("bool", text, keyval=True) is True
    for text in ("off", "no", "false"):
        assert visit_input("bool", text, keyval=True) is False
    assert err("bool", "On", keyval=True) == "Parameter 'null' expects 'on' or 'off'"
    assert visit_input("number", "1.5e3", keyval=True) == 1500.0
    assert visit_input("number", "-2", keyval=True) == -2.0
    assert err("number", "x", keyval=True) == "Parameter 'null' expects a number"
    assert err("number", "inf", keyval=True) == "Parameter 'null' expects a number"


def test_alternates() -> None:
    ref = visit_input("BlockdevRef", "n0")
    assert ref == "n0"
    inline = visit_input("BlockdevRef", {"driver": "null-co"})
    assert type(inline) is p.BlockdevOptions_null_co
    assert visit_input("BlockdevRefOrNull", None) is None
    assert (
        err("BlockdevRefOrNull", 42)
        == "Invalid parameter type for 'null', expected: BlockdevRefOrNull"
    )
    assert visit_input("BlockdevRef", "n0", keyval=True) == "n0"
    raw = visit_input(
        "BlockdevOptions",
        {"driver": "raw", "file": {"driver": "null-co", "size": "512"}},
        keyval=True,
    )
    assert type(raw) is p.BlockdevOptions_raw and type(raw.file) is p.BlockdevOptions_null_co
    assert raw.file.size == 512
    # keyval has no null: the string "null" is a node name, as in qsd
    assert visit_input("BlockdevRefOrNull", "null", keyval=True) == "null"


def test_result_models_and_to_wire() -> None:
    opts = visit_input(
        "BlockdevOptions",
        {
            "driver": "file",
            "filename": "/x",
            "node-name": "f",
            "cache": {"no-flush": True},
            "locking": "off",
        },
    )
    assert type(opts) is p.BlockdevOptions_file
    assert type(opts.cache) is p.BlockdevCacheOptions
    assert opts.cache.no_flush is True and opts.cache.direct is None
    assert opts.locking is p.OnOffAuto.OFF
    assert opts.model_fields_set == {"driver", "filename", "node_name", "cache", "locking"}
    assert to_wire(opts) == {
        "driver": "file",
        "filename": "/x",
        "node-name": "f",
        "cache": {"no-flush": True},
        "locking": "off",
    }
    # handler-built return values: absent optionals omitted, enums by value, lists walked
    info = p.XDbgBlockGraph(
        nodes=[p.XDbgBlockGraphNode(id=1, type=p.XDbgBlockGraphNodeType.BLOCK_DRIVER, name="n0")],
        edges=[
            p.XDbgBlockGraphEdge(
                parent=2, child=1, name="file", perm=[], shared_perm=[p.BlockPermission.WRITE]
            )
        ],
    )
    assert to_wire(info) == {
        "nodes": [{"id": 1, "type": "block-driver", "name": "n0"}],
        "edges": [{"parent": 2, "child": 1, "name": "file", "perm": [], "shared-perm": ["write"]}],
    }
    ev = p.BlockJobCompletedEvent(type=p.JobType.STREAM, device="j", len=1, offset=1, speed=0)
    assert to_wire(ev) == {"type": "stream", "device": "j", "len": 1, "offset": 1, "speed": 0}


# ---- hypothesis: valid values are accepted and round-trip --------------------------------

names = st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=10)
u63 = st.integers(min_value=0, max_value=(1 << 63) - 1)
cache = st.fixed_dictionaries({}, optional={"direct": st.booleans(), "no-flush": st.booleans()})
common = {
    "node-name": names,
    "discard": st.sampled_from(["ignore", "unmap"]),
    "cache": cache,
    "read-only": st.booleans(),
    "auto-read-only": st.booleans(),
    "force-share": st.booleans(),
    "detect-zeroes": st.sampled_from(["off", "on", "unmap"]),
}
null_opts = st.fixed_dictionaries(
    {"driver": st.sampled_from(["null-co", "null-aio"])},
    optional={**common, "size": u63, "latency-ns": u63, "read-zeroes": st.booleans()},
)
file_opts = st.fixed_dictionaries(
    {"driver": st.just("file"), "filename": names},
    optional={
        **common,
        "locking": st.sampled_from(["auto", "on", "off"]),
        "aio": st.sampled_from(["threads", "native", "io_uring"]),
        "aio-max-batch": u63,
        "drop-cache": st.booleans(),
    },
)
leaf_opts = st.one_of(null_opts, file_opts)
raw_opts = st.fixed_dictionaries(
    {"driver": st.just("raw"), "file": st.one_of(names, leaf_opts)},
    optional={**common, "offset": u63, "size": u63},
)
blockdev = st.one_of(leaf_opts, raw_opts)


@given(blockdev)
def test_valid_qmp_values_round_trip(value: dict[str, Any]) -> None:
    got = visit_input("BlockdevOptions", value)
    assert type(got) is getattr(p, branch_class("BlockdevOptions", value["driver"]))
    assert to_wire(got) == value


def as_keyval(value: object) -> object:
    if isinstance(value, dict):
        return {k: as_keyval(v) for k, v in value.items()}
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return value


@given(blockdev)
def test_valid_keyval_values_round_trip(value: dict[str, Any]) -> None:
    assert to_wire(visit_input("BlockdevOptions", as_keyval(value), keyval=True)) == value


@given(
    st.dictionaries(st.sampled_from(["direct", "no-flush", "x", "y"]), st.booleans(), min_size=1)
)
def test_unexpected_reported_after_known(extra: dict[str, bool]) -> None:
    value = {"driver": "null-co", "cache": extra}
    unknown = [k for k in extra if k not in ("direct", "no-flush")]
    if unknown:
        # The first leftover in GLib hash-table order, as QEMU's visitor finds it.
        first = next(key for key in ghash_order(extra) if key in unknown)
        assert err("BlockdevOptions", value) == f"Parameter 'cache.{first}' is unexpected"
    else:
        visit_input("BlockdevOptions", value)
