"""Input visitor on the NBD server / block export / block-core query commands.

The expected texts below were read from qemu-storage-daemon 7.2 (QMP and command line);
`test_*_match_reference` replays every case against /usr/bin/qemu-storage-daemon at test time,
so the table cannot drift from the reference. Results are the daemon's plain classes
(qapi_generated/plain.py); test_qapi_plain.py checks they agree with the pydantic models.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.errors import QmpError
from storage_daemon.keyval import parse_keyval
from storage_daemon.qapi.runtime import COMMANDS, TYPES, command_args, to_wire, visit_input
from storage_daemon.qapi_generated import plain as p

QSD = Path("/usr/bin/qemu-storage-daemon")
needs_qsd = pytest.mark.skipif(not QSD.exists(), reason="reference qemu-storage-daemon absent")

UNIX = {"type": "unix", "data": {"path": "/nonexistent/nbd.sock"}}
EXP = {"type": "nbd", "id": "e", "node-name": "n0"}

# (command, arguments, qsd's error text)
QMP_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("nbd-server-start", {}, "Parameter 'addr' is missing"),
    (
        "nbd-server-start",
        {"addr": {"type": "unix", "path": "/nonexistent/nbd.sock"}},
        "Parameter 'addr.data' is missing",
    ),
    (
        "nbd-server-start",
        {"addr": {"type": "bogus", "data": {}}},
        "Parameter 'type' does not accept value 'bogus'",
    ),
    (
        "nbd-server-start",
        {"addr": {"type": "inet", "data": {"host": "x", "port": 1}}},
        "Invalid parameter type for 'addr.data.port', expected: string",
    ),
    ("nbd-server-start", {"addr": UNIX, "max-connections": -1}, ""),
    ("nbd-server-start", {"addr": UNIX, "max-connections": 1 << 32}, ""),
    ("nbd-server-start", {"addr": UNIX, "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ("nbd-server-stop", {"x": 1}, "Parameter 'x' is unexpected"),
    ("nbd-server-add", {}, "Parameter 'device' is missing"),
    (
        "nbd-server-add",
        {"device": "n0", "writable": 1},
        "Invalid parameter type for 'writable', expected: boolean",
    ),
    ("nbd-server-remove", {"name": "e", "mode": "x"}, "Parameter 'mode' does not accept value 'x'"),
    ("block_resize", {"node-name": "n0"}, "Parameter 'size' is missing"),
    (
        "block_resize",
        {"node-name": "n0", "size": "1"},
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        "block-export-add",
        {**EXP, "type": "bogus"},
        "Parameter 'type' does not accept value 'bogus'",
    ),
    ("block-export-add", {"id": "e", "node-name": "n0"}, "Parameter 'type' is missing"),
    ("block-export-add", {"type": "nbd", "node-name": "n0"}, "Parameter 'id' is missing"),
    ("block-export-add", {"type": "nbd", "id": "e"}, "Parameter 'node-name' is missing"),
    (
        "block-export-add",
        {**EXP, "bitmaps": [1]},
        "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
    ),
    (
        "block-export-add",
        {**EXP, "bitmaps": ["b0", {"node": "n0"}]},
        "Parameter 'bitmaps[1].name' is missing",
    ),
    (
        "block-export-add",
        {**EXP, "bitmaps": "b"},
        "Invalid parameter type for 'bitmaps', expected: array",
    ),
    ("block-export-add", {**EXP, "bogus": 1}, "Parameter 'bogus' is unexpected"),
    (
        "block-export-add",
        {**EXP, "writable": "yes"},
        "Invalid parameter type for 'writable', expected: boolean",
    ),
    ("block-export-del", {}, "Parameter 'id' is missing"),
    (
        "block-export-del",
        {"id": "e", "mode": "soft"},
        "Parameter 'mode' does not accept value 'soft'",
    ),
    (
        "query-blockstats",
        {"query-nodes": 1},
        "Invalid parameter type for 'query-nodes', expected: boolean",
    ),
    ("query-block", {"x": 1}, "Parameter 'x' is unexpected"),
    ("query-block-exports", {"x": 1}, "Parameter 'x' is unexpected"),
]
QMP_CASES = [
    (c, a, msg or "Parameter 'max-connections' expects uint32_t") for c, a, msg in QMP_CASES
]


def qmp_err(name: str, args: dict[str, Any]) -> str:
    with pytest.raises(QmpError) as exc:
        command_args(name, args)
    assert exc.value.error_class == "GenericError"
    return exc.value.desc


@pytest.mark.parametrize(("name", "args", "message"), QMP_CASES)
def test_qmp_errors(name: str, args: dict[str, Any], message: str) -> None:
    assert qmp_err(name, args) == message


# (option, argument, schema type, implied key, qsd's error text); $D never gets created
KEYVAL_CASES: list[tuple[str, str, str, str | None, str]] = [
    (
        "--nbd-server",
        "addr.path=$D/x",
        "NbdServerOptions",
        None,
        "Parameter 'addr.type' is missing",
    ),
    (
        "--nbd-server",
        "addr.type=unix,addr.path=$D/x,max-connections=-1",
        "NbdServerOptions",
        None,
        "Parameter 'max-connections' expects uint32_t",
    ),
    (
        "--nbd-server",
        "addr.type=unix,addr.path=$D/x,max-connections=4294967296",
        "NbdServerOptions",
        None,
        "Parameter 'max-connections' expects uint32_t",
    ),
    (
        "--nbd-server",
        "addr.type=unix,addr.path=$D/x,max-connections=abc",
        "NbdServerOptions",
        None,
        "Parameter 'max-connections' expects integer",
    ),
    (
        "--nbd-server",
        "addr.type=unix",
        "NbdServerOptions",
        None,
        "Parameter 'addr.path' is missing",
    ),
    (
        "--nbd-server",
        "addr.type=unix,addr.data.path=$D/x",
        "NbdServerOptions",
        None,
        "Parameter 'addr.path' is missing",
    ),
    (
        "--nbd-server",
        "addr.type=unix,addr.path=$D/x,bogus=1",
        "NbdServerOptions",
        None,
        "Parameter 'bogus' is unexpected",
    ),
    ("--nbd-server", "tls-creds=x", "NbdServerOptions", None, "Parameter 'addr' is missing"),
    (
        "--nbd-server",
        "addr.type=inet,addr.host=h,addr.port=1,addr.to=70000",
        "NbdServerOptions",
        None,
        "Parameter 'to' expects uint16_t",
    ),
    (
        "--nbd-server",
        "addr.type=inet,addr.host=h,addr.port=1,addr.to=x",
        "NbdServerOptions",
        None,
        "Parameter 'addr.to' expects integer",
    ),
    (
        "--export",
        "type=bogus,id=e,node-name=n0",
        "BlockExportOptions",
        "type",
        "Parameter 'type' does not accept value 'bogus'",
    ),
    ("--export", "nbd,id=e", "BlockExportOptions", "type", "Parameter 'node-name' is missing"),
    ("--export", "nbd,node-name=n0", "BlockExportOptions", "type", "Parameter 'id' is missing"),
    (
        "--export",
        "nbd,id=e,node-name=n0,writable=maybe",
        "BlockExportOptions",
        "type",
        "Parameter 'writable' expects 'on' or 'off'",
    ),
    (
        "--export",
        "nbd,id=e,node-name=n0,allocation-depth=x",
        "BlockExportOptions",
        "type",
        "Parameter 'allocation-depth' expects 'on' or 'off'",
    ),
    # keyval names list elements `a.N`, where QMP says `a[N]`
    (
        "--export",
        "nbd,id=e,node-name=n0,bitmaps.0=b0,bitmaps.1.node=n0",
        "BlockExportOptions",
        "type",
        "Parameter 'bitmaps.1.name' is missing",
    ),
    (
        "--export",
        "nbd,id=e,node-name=n0,bitmaps.0.name.x=1,bitmaps.0.node=n",
        "BlockExportOptions",
        "type",
        "Parameters 'bitmaps.0.name.*' are unexpected",
    ),
    (
        "--export",
        "nbd,id=e,node-name=n0,bitmaps.0.name=a,bitmaps.0.node=n,bitmaps.0.bogus=1",
        "BlockExportOptions",
        "type",
        "Parameter 'bitmaps.0.bogus' is unexpected",
    ),
    (
        "--export",
        "nbd,id=e,node-name=n0,bitmaps.0.0=x",
        "BlockExportOptions",
        "type",
        "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
    ),
    (
        "--export",
        "nbd,id=e,node-name=n0,bitmaps=x",
        "BlockExportOptions",
        "type",
        "Invalid parameter type for 'bitmaps', expected: array",
    ),
]


@pytest.mark.parametrize(("option", "arg", "type_name", "implied", "message"), KEYVAL_CASES)
def test_keyval_errors(
    option: str, arg: str, type_name: str, implied: str | None, message: str
) -> None:
    with pytest.raises(QmpError) as exc:
        visit_input(type_name, parse_keyval(arg, implied), keyval=True)
    assert exc.value.desc == message


def test_start_args_model() -> None:
    args = command_args(
        "nbd-server-start",
        {"addr": {"type": "unix", "data": {"path": "/s"}}, "max-connections": 4},
    )
    assert type(args) is p.NbdServerStartArgs
    assert type(args.addr) is p.SocketAddressLegacy_unix
    assert type(args.addr.data) is p.UnixSocketAddress
    assert args.addr.data.path == "/s" and args.max_connections == 4
    assert args.tls_creds is None and args.tls_authz is None
    inet = command_args(
        "nbd-server-start",
        {"addr": {"type": "inet", "data": {"host": "::1", "port": "10809"}}, "tls-creds": "t"},
    )
    assert type(inet.addr) is p.SocketAddressLegacy_inet
    assert (inet.addr.data.host, inet.addr.data.port, inet.tls_creds) == ("::1", "10809", "t")
    assert command_args("nbd-server-stop", {}) is None


def test_nbd_server_options_keyval() -> None:
    opts = visit_input(
        "NbdServerOptions",
        parse_keyval("addr.type=unix,addr.path=/s,max-connections=0x10,tls-authz=a", None),
        keyval=True,
    )
    assert type(opts) is p.NbdServerOptions
    assert type(opts.addr) is p.SocketAddress_unix and opts.addr.path == "/s"
    assert opts.max_connections == 16 and opts.tls_authz == "a"
    assert to_wire(opts) == {
        "addr": {"type": "unix", "path": "/s"},
        "tls-authz": "a",
        "max-connections": 16,
    }
    inet = visit_input(
        "NbdServerOptions",
        parse_keyval("addr.type=inet,addr.host=localhost,addr.port=10809,addr.ipv6=off", None),
        keyval=True,
    )
    assert type(inet.addr) is p.SocketAddress_inet and inet.addr.ipv6 is False


def test_export_models() -> None:
    exp = command_args(
        "block-export-add",
        {**EXP, "writable": True, "bitmaps": ["b0", {"node": "n1", "name": "b1"}], "name": "x"},
    )
    assert type(exp) is p.BlockExportOptions_nbd
    assert exp.type is p.BlockExportType.NBD and exp.id == "e" and exp.node_name == "n0"
    assert exp.writable is True and exp.writethrough is None and exp.name == "x"
    assert exp.bitmaps == ["b0", p.BlockDirtyBitmap(node="n1", name="b1")]
    assert type(exp.bitmaps[1]) is p.BlockDirtyBitmap
    assert exp.allocation_depth is None and exp.fixed_iothread is None
    assert COMMANDS["block-export-add"].boxed
    kv = visit_input(
        "BlockExportOptions",
        parse_keyval("nbd,id=e,node-name=n0,allocation-depth=on,bitmaps.0=b0", "type"),
        keyval=True,
    )
    assert kv.allocation_depth is True and kv.bitmaps == ["b0"]

    add = command_args("nbd-server-add", {"device": "n0", "bitmap": "b", "description": "d"})
    assert type(add) is p.NbdServerAddOptions
    assert (add.device, add.bitmap, add.description, add.name) == ("n0", "b", "d", None)
    rem = command_args("nbd-server-remove", {"name": "x", "mode": "hard"})
    assert type(rem) is p.NbdServerRemoveArgs and rem.mode is p.BlockExportRemoveMode.HARD
    dele = command_args("block-export-del", {"id": "e"})
    assert type(dele) is p.BlockExportDelArgs and dele.mode is None
    assert COMMANDS["nbd-server-add"].features == ("deprecated",)
    assert COMMANDS["nbd-server-remove"].features == ("deprecated",)

    info = p.BlockExportInfo(
        id="e", type=p.BlockExportType.NBD, node_name="n0", shutting_down=False
    )
    assert to_wire([info]) == [
        {"id": "e", "type": "nbd", "node-name": "n0", "shutting-down": False}
    ]
    assert COMMANDS["query-block-exports"].ret_type == "BlockExportInfoList"


def test_block_core_models() -> None:
    rs = command_args("block_resize", {"node-name": "n0", "size": 1 << 20})
    assert type(rs) is p.BlockResizeArgs
    assert (rs.device, rs.node_name, rs.size) == (None, "n0", 1 << 20)
    assert COMMANDS["block_resize"].coroutine
    assert not COMMANDS["block-export-add"].coroutine
    qs = command_args("query-blockstats", {"query-nodes": True})
    assert type(qs) is p.QueryBlockstatsArgs and qs.query_nodes is True
    assert COMMANDS["query-blockstats"].ret_type == "BlockStatsList"
    assert COMMANDS["query-block"].ret_type == "BlockInfoList"

    zero = dict.fromkeys(
        (s.field for s in TYPES["BlockDeviceStats"].members if s.type == "int" and not s.optional),
        0,
    )
    assert len(zero) == 23
    stats = p.BlockDeviceStats(**zero, account_invalid=False, account_failed=False, timed_stats=[])
    leaf = p.BlockStats(
        node_name="f0",
        stats=stats,
        driver_specific=p.BlockStatsSpecific_file(
            discard_nb_ok=1, discard_nb_failed=0, discard_bytes_ok=512
        ),
    )
    top = p.BlockStats(
        node_name="r0",
        stats=stats,
        driver_specific=p.BlockStatsSpecific_raw(),
        parent=leaf,
    )
    wire = to_wire(top)
    assert wire["driver-specific"] == {"driver": "raw"}
    assert wire["parent"]["driver-specific"] == {
        "driver": "file",
        "discard-nb-ok": 1,
        "discard-nb-failed": 0,
        "discard-bytes-ok": 512,
    }
    assert "idle_time_ns" not in wire["stats"] and wire["stats"]["rd_bytes"] == 0
    assert "backing" not in wire and "device" not in wire
    # qsd's reply shape round-trips through the result type
    assert to_wire(visit_input("BlockStatsList", [wire])) == [wire]


def test_blockdev_file_and_raw_members() -> None:
    """Every member qsd 7.2 has on the file and raw drivers is accepted."""
    opts = visit_input(
        "BlockdevOptions",
        {
            "driver": "file",
            "node-name": "f",
            "filename": "/x",
            "pr-manager": "p",
            "locking": "on",
            "aio": "io_uring",
            "aio-max-batch": 8,
            "drop-cache": False,
            "x-check-cache-dropped": True,
        },
    )
    assert type(opts) is p.BlockdevOptions_file
    assert (opts.pr_manager, opts.aio, opts.x_check_cache_dropped) == (
        "p",
        p.BlockdevAioOptions.IO_URING,
        True,
    )
    raw = visit_input("BlockdevOptions", {"driver": "raw", "file": "f", "offset": 512, "size": 1})
    assert type(raw) is p.BlockdevOptions_raw and (raw.offset, raw.size) == (512, 1)


names = st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=10)
export_opts = st.fixed_dictionaries(
    {"type": st.just("nbd"), "id": names, "node-name": names},
    optional={
        "fixed-iothread": st.booleans(),
        "iothread": names,
        "writable": st.booleans(),
        "writethrough": st.booleans(),
        "name": st.text(max_size=8),
        "description": st.text(max_size=8),
        "bitmaps": st.lists(
            st.one_of(names, st.fixed_dictionaries({"node": names, "name": names})), max_size=3
        ),
        "allocation-depth": st.booleans(),
    },
)


@given(export_opts)
def test_export_options_round_trip(value: dict[str, Any]) -> None:
    got = command_args("block-export-add", value)
    assert to_wire(got) == value


# ---- the tables above, replayed against the reference ------------------------------------


@pytest.mark.compat
@needs_qsd
def test_qmp_cases_match_reference() -> None:
    lines: list[dict[str, Any]] = [{"execute": "qmp_capabilities"}]
    lines += [{"execute": c, "arguments": a} for c, a, _ in QMP_CASES]
    lines.append({"execute": "quit"})
    proc = subprocess.run(
        [str(QSD), "--chardev", "stdio,id=m", "--monitor", "chardev=m"],
        input="".join(json.dumps(x) + "\n" for x in lines),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    replies = [json.loads(x) for x in proc.stdout.splitlines()]
    replies = [r for r in replies if "event" not in r and "QMP" not in r]
    assert len(replies) == len(lines), proc.stderr
    for (name, args, message), reply in zip(QMP_CASES, replies[1:-1], strict=True):
        assert reply == {"error": {"class": "GenericError", "desc": message}}, (name, args)


@pytest.mark.compat
@needs_qsd
@pytest.mark.parametrize(("option", "arg", "type_name", "implied", "message"), KEYVAL_CASES)
def test_keyval_cases_match_reference(
    option: str, arg: str, type_name: str, implied: str | None, message: str, scratch: Path
) -> None:
    arg = arg.replace("$D", str(scratch / "absent"))
    proc = subprocess.run(
        [str(QSD), "--blockdev", "null-co,node-name=n0", option, arg],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr == f"qemu-storage-daemon: {option} {arg}: {message}\n"
