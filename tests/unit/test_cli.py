"""Unit tests for storage_daemon.cli, plus live comparisons with the reference qsd binary.

Pure-ring tests for getopt scanning, the two passes, error formatting, option values and the
legacy --chardev syntax. Tests marked `compat` run /usr/bin/qemu-storage-daemon on command
lines that fail while parsing and compare its output with what our pure functions produce.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import pytest

from storage_daemon.cli import (
    CHARDEV_BACKENDS,
    CHARDEV_OPTS,
    IDENTIFIER_HINT,
    IMPLIED_KEYS,
    LONG_OPTIONS,
    POSITIONAL,
    ChardevParseError,
    CliError,
    CliOption,
    PrePass,
    chardev_help_text,
    chardev_options_help_text,
    check_chardev_params,
    format_option_error,
    help_text,
    id_wellformed,
    main_pass,
    parse_argv,
    parse_chardev_legacy,
    parse_option_value,
    pre_pass,
    version_text,
)
from storage_daemon.keyval import KeyvalError, is_help_request

P = "qsd"

# ---- getopt ----------------------------------------------------------------------------------


def test_long_options_with_separate_and_attached_args() -> None:
    opts = parse_argv(
        ["--blockdev", "driver=null-co,node-name=n", "--object=iothread,id=io0", "--daemonize"], P
    )
    assert opts == [
        CliOption(
            "--blockdev", "driver=null-co,node-name=n", "--blockdev driver=null-co,node-name=n"
        ),
        CliOption("--object", "iothread,id=io0", "--object=iothread,id=io0"),
        CliOption("--daemonize", None, "--daemonize"),
    ]


def test_unique_prefixes_are_accepted() -> None:
    opts = parse_argv(["--block", "x", "--b=y", "--d", "--h", "--ver", "--nbd", "z"], P)
    assert [(o.option, o.arg, o.location) for o in opts] == [
        ("--blockdev", "x", "--block x"),
        ("--blockdev", "y", "--b=y"),
        ("--daemonize", None, "--d"),
        ("--help", None, "--h"),
        ("--version", None, "--ver"),
        ("--nbd-server", "z", "--nbd z"),
    ]


def test_required_argument_may_look_like_an_option() -> None:
    opts = parse_argv(["--blockdev", "--help", "--chardev", "--blockdev"], P)
    assert [(o.option, o.arg) for o in opts] == [
        ("--blockdev", "--help"),
        ("--chardev", "--blockdev"),
    ]
    assert opts[0].location == "--blockdev --help"


def test_short_options() -> None:
    opts = parse_argv(["-Tfoo", "-T", "bar", "-h", "-V", "-T", "-V"], P)
    assert [(o.option, o.arg, o.location) for o in opts] == [
        ("--trace", "foo", "-Tfoo"),
        ("--trace", "bar", "-T bar"),
        ("--help", None, "-h"),
        ("--version", None, "-V"),
        ("--trace", "-V", "-T -V"),
    ]


def test_short_option_clusters() -> None:
    opts = parse_argv(["-hVTx", "-hT", "y"], P)
    assert [(o.option, o.arg, o.location) for o in opts] == [
        ("--help", None, "-hVTx"),
        ("--version", None, "-hVTx"),
        ("--trace", "x", "-hVTx"),
        ("--help", None, "-hT"),
        ("--trace", "y", "-hT y"),
    ]


def test_positionals_and_double_dash() -> None:
    opts = parse_argv(["pos", "-", "", "--blockdev", "x", "--", "--bogus", "y"], P)
    assert [(o.option, o.arg, o.location) for o in opts] == [
        (POSITIONAL, "pos", "pos"),
        (POSITIONAL, "-", "-"),
        (POSITIONAL, "", ""),
        ("--blockdev", "x", "--blockdev x"),
    ]
    assert parse_argv(["--"], P) == []
    assert parse_argv([], P) == []


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--bogus"], "qsd: unrecognized option '--bogus'"),
        (["--bogus=1"], "qsd: unrecognized option '--bogus=1'"),
        (["--blockdevx", "a"], "qsd: unrecognized option '--blockdevx'"),
        (["-x"], "qsd: invalid option -- 'x'"),
        (["-x", "-y"], "qsd: invalid option -- 'x'"),
        (["-:"], "qsd: invalid option -- ':'"),
        (["--blockdev"], "qsd: option '--blockdev' requires an argument"),
        (["--bl"], "qsd: option '--blockdev' requires an argument"),
        (["--e"], "qsd: option '--export' requires an argument"),
        (["--pidfile"], "qsd: option '--pidfile' requires an argument"),
        (["-T"], "qsd: option requires an argument -- 'T'"),
        (["--help=x"], "qsd: option '--help' doesn't allow an argument"),
        (["--daemonize=1"], "qsd: option '--daemonize' doesn't allow an argument"),
        (["--ver=1"], "qsd: option '--version' doesn't allow an argument"),
        (
            ["--=x"],
            "qsd: option '--=x' is ambiguous; possibilities: '--blockdev' '--chardev'"
            " '--daemonize' '--export' '--help' '--monitor' '--nbd-server' '--object'"
            " '--pidfile' '--trace' '--version'",
        ),
        (["--blockdev", "bogus", "--bogus"], "qsd: unrecognized option '--bogus'"),
        (["pos", "--blockdev", "x", "-x"], "qsd: invalid option -- 'x'"),
        (["-Tfoo", "--bogus"], "qsd: unrecognized option '--bogus'"),
    ],
)
def test_getopt_errors(argv: list[str], line: str) -> None:
    with pytest.raises(CliError) as info:
        parse_argv(argv, P)
    assert info.value.line == line
    assert info.value.status == 1


def test_help_or_version_before_an_error_wins() -> None:
    opts = parse_argv(["--help", "--bogus"], P)
    assert pre_pass(opts).action == "--help"
    opts = parse_argv(["--blockdev", "x", "-V", "-x"], P)
    assert pre_pass(opts).action == "--version"
    with pytest.raises(CliError):
        parse_argv(["--bogus", "--help"], P)


def test_pre_pass_and_main_pass() -> None:
    argv = [
        "--blockdev", "bogus",
        "--pidfile", "/a",
        "-T", "ev",
        "pos",
        "--daemonize",
        "--pidfile=/b",
        "--export", "e",
    ]  # fmt: skip
    opts = parse_argv(argv, P)
    assert pre_pass(opts) == PrePass(action=None, daemonize=True, pidfile="/b")
    assert [(o.option, o.arg) for o in main_pass(opts)] == [
        ("--blockdev", "bogus"),
        ("--trace", "ev"),
        (POSITIONAL, "pos"),
        ("--export", "e"),
    ]
    # the first of --help / --version ends the pre-pass, wherever it is
    assert pre_pass(parse_argv(["--blockdev", "bogus", "--help"], P)).action == "--help"
    assert pre_pass(parse_argv(["-Vh"], P)).action == "--version"
    assert pre_pass(parse_argv(["-hV"], P)).action == "--help"
    assert pre_pass(parse_argv(["--daemonize"], P)) == PrePass(None, True, None)


# ---- error lines -----------------------------------------------------------------------------


def test_format_option_error() -> None:
    opt = parse_argv(["--blockdev", "driver=null-co,node-name=n,a..b=1"], P)[0]
    assert (
        format_option_error("qemu-storage-daemon", opt, "Invalid parameter 'a..b'")
        == "qemu-storage-daemon: --blockdev driver=null-co,node-name=n,a..b=1: "
        "Invalid parameter 'a..b'"
    )
    obj = parse_argv(["--object", "iothread,id=1bad"], P)[0]
    assert format_option_error(
        "qemu-storage-daemon", obj, "Parameter 'id' expects an identifier", IDENTIFIER_HINT
    ) == (
        "qemu-storage-daemon: --object iothread,id=1bad: Parameter 'id' expects an identifier\n"
        "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
    )
    attached = parse_argv(["--blockdev="], P)[0]
    assert (
        format_option_error("q", attached, "Parameter 'driver' is missing")
        == "q: --blockdev=: Parameter 'driver' is missing"
    )
    pos = parse_argv(["positional"], P)[0]
    assert (
        format_option_error("q", pos, "Unexpected argument") == "q: positional: Unexpected argument"
    )
    # an option built by hand names itself and its argument
    assert format_option_error("q", CliOption("--export", "x"), "m") == "q: --export x: m"


# ---- option values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "arg", "tree", "is_keyval"),
    [
        ("--blockdev", "null-co,node-name=n", {"driver": "null-co", "node-name": "n"}, True),
        ("--export", "nbd,id=e", {"type": "nbd", "id": "e"}, True),
        ("--object", "iothread,id=i", {"qom-type": "iothread", "id": "i"}, True),
        ("--monitor", "m0,mode=control", {"chardev": "m0", "mode": "control"}, True),
        (
            "--nbd-server",
            "addr.type=unix,addr.path=/s",
            {"addr": {"type": "unix", "path": "/s"}},
            True,
        ),
        ("--blockdev", '{"driver":"null-co","size":1}', {"driver": "null-co", "size": 1}, False),
        ("--blockdev", "", {}, True),
        ("--blockdev", "[1]", {"driver": "[1]"}, True),
    ],
)
def test_parse_option_value(option: str, arg: str, tree: object, is_keyval: bool) -> None:
    assert parse_option_value(CliOption(option, arg)) == (tree, is_keyval)


@pytest.mark.parametrize(
    ("option", "arg", "message"),
    [
        ("--nbd-server", "foo", "Expected '=' after parameter 'foo'"),
        ("--blockdev", "help", "Help is not available for this option"),
        ("--monitor", "help", "Help is not available for this option"),
        ("--export", "help", "Help is not available for this option"),
        ("--nbd-server", "help", "Help is not available for this option"),
        ("--blockdev", '{"driver":"null-co"', "JSON parse error, premature EOI"),
    ],
)
def test_parse_option_value_errors(option: str, arg: str, message: str) -> None:
    with pytest.raises(KeyvalError) as info:
        parse_option_value(CliOption(option, arg))
    assert info.value.message == message


def test_parse_option_value_rejects_other_options() -> None:
    with pytest.raises(ValueError, match="--chardev"):
        parse_option_value(CliOption("--chardev", "null,id=c"))
    assert set(IMPLIED_KEYS) == {"--blockdev", "--export", "--object", "--monitor", "--nbd-server"}


# ---- legacy --chardev ------------------------------------------------------------------------


def test_chardev_basic() -> None:
    got = parse_chardev_legacy("socket,id=c0,path=/tmp/s,server=on,wait=off")
    assert got.params == {
        "backend": "socket",
        "path": "/tmp/s",
        "server": "on",
        "wait": "off",
        "id": "c0",
    }
    assert (got.backend, got.id, got.warnings, got.help_wanted) == ("socket", "c0", [], False)
    assert check_chardev_params(got) is True


def test_chardev_value_escapes_and_last_wins() -> None:
    got = parse_chardev_legacy("null,,x,id=c0,path=a,,b,path=c,backend=socket")
    assert got.params == {"backend": "socket", "path": "c", "id": "c0"}
    assert parse_chardev_legacy("null,path=a,,b,id=c").params["path"] == "a,b"


def test_chardev_id_is_the_first_comma_id() -> None:
    assert parse_chardev_legacy("null,id=c0,id=c1").id == "c0"
    assert parse_chardev_legacy("id=c1,backend=null").id == "c1"
    # the raw text is searched, so an escaped ",,id=" inside a value counts (as in QEMU)
    assert parse_chardev_legacy("null,path=a,,id=x,id=c0").id == "x"


def test_chardev_short_form_booleans_warn() -> None:
    got = parse_chardev_legacy("socket,id=c,path=/s,server,nowait,nodelay,delay")
    assert got.params["server"] == "on"
    assert got.params["wait"] == "off"
    assert got.params["delay"] == "on"  # "delay" came last
    assert got.warnings == [
        ("short-form boolean option 'server' deprecated", "Please use server=on instead"),
        ("short-form boolean option 'nowait' deprecated", "Please use wait=off instead"),
        (
            "short-form boolean option 'nodelay' deprecated",
            "Please use nodelay=on instead",
        ),
        ("short-form boolean option 'delay' deprecated", "Please use nodelay=off instead"),
    ]


@pytest.mark.parametrize(
    ("text", "message", "hint", "n_warnings"),
    [
        ("null,id=c0,bogus=1", "Invalid parameter 'bogus'", None, 0),
        ("null,id=c0,bogus", "Invalid parameter 'bogus'", None, 1),
        ("null,id=c0,nonsense", "Invalid parameter 'nsense'", None, 1),
        ("null,id=c0,no", "Invalid parameter ''", None, 1),
        ("null,id=c0,Server=on", "Invalid parameter 'Server'", None, 0),
        ("null,id=c0,help=1", "Invalid parameter 'help'", None, 0),
        ("null,bogus=1,help", "Invalid parameter 'bogus'", None, 0),
        ("id=c0,null", "Invalid parameter 'null'", None, 1),
        ("null,id=1c", "Parameter 'id' expects an identifier", IDENTIFIER_HINT, 0),
        ("null,foo=1,id=1c", "Parameter 'id' expects an identifier", IDENTIFIER_HINT, 0),
        ("null,id=", "Parameter 'id' expects an identifier", IDENTIFIER_HINT, 0),
        ("id=x,,y,null", "Parameter 'id' expects an identifier", IDENTIFIER_HINT, 0),
        ("null,id=c0,server=maybe", "Parameter 'server' expects 'on' or 'off'", None, 0),
        ("null,id=c0,server=ON", "Parameter 'server' expects 'on' or 'off'", None, 0),
        ("null,id=c0,reconnect=abc", "Parameter 'reconnect' expects a number", None, 0),
        ("null,id=c0,size=16E", "Value '16E' is out of range for parameter 'size'", None, 0),
        (
            "null,id=c0,size=1.5",
            "Parameter 'size' expects a non-negative number below 2^64",
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively.",
            0,
        ),
        (
            '{"id":"c0","backend":{"type":"null","data":{}}}',
            'Invalid parameter \'"backend":{"type":"null"\'',
            None,
            1,
        ),
    ],
)
def test_chardev_parse_errors(text: str, message: str, hint: str | None, n_warnings: int) -> None:
    with pytest.raises(ChardevParseError) as info:
        parse_chardev_legacy(text)
    assert (info.value.message, info.value.hint) == (message, hint)
    assert len(info.value.warnings) == n_warnings


def test_chardev_json_warning_text() -> None:
    with pytest.raises(ChardevParseError) as info:
        parse_chardev_legacy('{"id":"c0","backend":{"type":"null","data":{}}}')
    assert info.value.warnings == [
        (
            'short-form boolean option \'"backend":{"type":"null"\' deprecated',
            'Please use "backend":{"type":"null"=on instead',
        )
    ]


def test_chardev_values_accepted() -> None:
    got = parse_chardev_legacy(
        "ringbuf,id=r,size=1k,reconnect=-1,cols=0x10,server=y,wait=n,ipv4=true,ipv6=no"
    )
    assert got.params["size"] == "1k"
    assert got.warnings == []
    hexed = parse_chardev_legacy("ringbuf,id=r,size=0x20M")
    assert hexed.warnings == [
        ("Using a multiplier suffix on hex numbers is deprecated: 0x20M", None)
    ]
    # keys a backend does not read are accepted, as qsd does
    assert check_chardev_params(parse_chardev_legacy("null,id=c0,path=/x")) is True


def test_chardev_help_forms() -> None:
    assert parse_chardev_legacy("null,help").help_wanted
    assert parse_chardev_legacy("socket,id=c,?").help_wanted
    assert parse_chardev_legacy("null,help,bogus=1").help_wanted  # help stops parsing
    for text in ("help", "?", "help,id=c"):
        got = parse_chardev_legacy(text)
        assert not got.help_wanted
        assert check_chardev_params(got) is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nosuch", "chardev: no id specified"),
        ("path=x", "chardev: no id specified"),
        ("id=c0", 'chardev: "c0" missing backend'),
        ("nosuch,id=c0", "'nosuch' is not a valid char driver name"),
        (",id=c0", "'' is not a valid char driver name"),
        ("null,,x,id=c0", "'null,x' is not a valid char driver name"),
        ("pty,id=c0", "'pty' is not a valid char driver name"),
    ],
)
def test_check_chardev_params(text: str, message: str) -> None:
    with pytest.raises(KeyvalError) as info:
        check_chardev_params(parse_chardev_legacy(text))
    assert info.value.message == message


def test_check_chardev_params_backend_list() -> None:
    assert check_chardev_params(parse_chardev_legacy("pty,id=c0"), CHARDEV_BACKENDS) is True


def test_id_wellformed() -> None:
    for good in ("a", "c0", "a-b.c_d", "Z9"):
        assert id_wellformed(good)
    for bad in ("", "1c", "-a", "a b", "a,b", "\u00e9", "a\u00e9", "_a"):
        assert not id_wellformed(bad)


def test_help_texts() -> None:
    assert chardev_help_text() == "Available chardev backend types: \n  socket\n  stdio\n  null\n"
    opts_help = chardev_options_help_text()
    assert opts_help.startswith("chardev options:\n  abstract=<bool (on/off)>\n")
    assert "  size=<size>\n" in opts_help
    assert "  reconnect=<num>\n" in opts_help
    assert opts_help.count("\n") == len(CHARDEV_OPTS) + 1
    text = help_text("storage-daemon")
    assert text.startswith("Usage: storage-daemon [options]\n")
    for name in LONG_OPTIONS:
        assert f"--{name}" in text
    assert "--chardev help" in text
    assert "--object help" in text
    assert text.endswith("\n")
    assert version_text("storage-daemon") == (
        "storage-daemon version 0.1.0 (qemu-storage-daemon 7.2 compatible)\n"
    )


def test_is_help_request_for_object() -> None:
    assert is_help_request("help", IMPLIED_KEYS["--object"]) == (True, None)
    assert is_help_request("iothread,help", IMPLIED_KEYS["--object"]) == (True, "iothread")


# ---- live comparison with the reference binary -----------------------------------------------

QSD = "/usr/bin/qemu-storage-daemon"
QSD_NAME = "qemu-storage-daemon"
needs_qsd = pytest.mark.skipif(not os.access(QSD, os.X_OK), reason="reference qsd not installed")


def _run_qsd(argv: Sequence[str], cwd: str) -> tuple[int, str, str]:
    # Every case here fails while parsing, so qsd exits at once; should one be accepted by
    # mistake, subprocess.run kills that child (by its PID) when the timeout expires.
    proc = subprocess.run(
        [QSD, *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=10,
        cwd=cwd,
        check=False,
    )
    out = proc.stdout.decode(errors="surrogateescape")
    err = proc.stderr.decode(errors="surrogateescape")
    return proc.returncode, out, err


def _warning(opt: CliOption, message: str, hint: str | None) -> str:
    return format_option_error(QSD_NAME, opt, f"warning: {message}", hint) + "\n"


def _ours(argv: Sequence[str]) -> tuple[int, str, str] | None:
    """What our pure front end makes of `argv` (exit status, stdout, stderr).

    None when every option parses (the daemon would go on to apply them).
    """
    try:
        opts = parse_argv(argv, QSD)
    except CliError as err:
        return err.status, "", err.line + "\n"
    if pre_pass(opts).action is not None:
        return 0, "", ""
    err_lines: list[str] = []
    for opt in main_pass(opts):
        if opt.option == POSITIONAL:
            return 1, "", format_option_error(QSD_NAME, opt, "Unexpected argument") + "\n"
        if opt.option == "--chardev":
            try:
                parsed = parse_chardev_legacy(opt.arg or "")
            except ChardevParseError as exc:
                for msg, hint in exc.warnings:
                    err_lines.append(_warning(opt, msg, hint))
                err_lines.append(format_option_error(QSD_NAME, opt, exc.message, exc.hint) + "\n")
                return 1, "", "".join(err_lines)
            for msg, hint in parsed.warnings:
                err_lines.append(_warning(opt, msg, hint))
            if parsed.help_wanted:
                return 1, chardev_options_help_text(), "".join(err_lines)
            try:
                if not check_chardev_params(parsed, CHARDEV_BACKENDS):
                    return 0, chardev_help_text(CHARDEV_BACKENDS), "".join(err_lines)
            except KeyvalError as exc:
                err_lines.append(format_option_error(QSD_NAME, opt, exc.message) + "\n")
                return 1, "", "".join(err_lines)
        elif opt.option in IMPLIED_KEYS:
            if opt.option == "--object" and is_help_request(opt.arg or "", "qom-type")[0]:
                return None
            try:
                parse_option_value(opt)
            except KeyvalError as exc:
                err_lines.append(format_option_error(QSD_NAME, opt, exc.message, exc.hint) + "\n")
                return 1, "", "".join(err_lines)
    return None


LONG_KEY = "k" * 128
COMPAT_CASES: list[list[str]] = [
    # getopt
    ["--bogus"],
    ["--bogus=1"],
    ["-x"],
    ["-x", "-y"],
    ["-:"],
    ["--blockdev"],
    ["--bl"],
    ["--e"],
    ["-T"],
    ["--help=x"],
    ["--daemonize=1"],
    ["--version=1"],
    ["--=x"],
    ["--="],
    ["--blockdev", "bogus", "--bogus"],
    ["--bogus", "--help"],
    ["-Tfoo", "--bogus"],
    # positional arguments, in order with the other options
    ["positional"],
    ["-"],
    [""],
    ["pos", "--blockdev", "a..b=1"],
    ["--blockdev", "a..b=1", "pos"],
    ["--blockdev", "driver=null-co,node-name=n,a..b=1", "--", "x"],
    ["--blockdev=a..b=1", "--blockdev", "a..b=1"],
    ["--b=a..b=1"],
    ["--block", "a..b=1"],
    # keyval
    ["--blockdev", "driver=null-co,node-name=n,=1"],
    ["--blockdev", ",driver=null-co,node-name=n"],
    ["--blockdev", "driver=null-co,node-name=n,a..b=1"],
    ["--blockdev", "driver=null-co,node-name=n,read-only"],
    ["--blockdev", "null-co,null-co"],
    ["--blockdev", "driver=null-co,node-name=n,cache.direct=on,cache=x"],
    ["--blockdev", "driver=null-co,node-name=n,cache=x,cache.direct=on"],
    ["--blockdev", "driver=null-co,node-name=n,cache.0=a,cache.x=b"],
    ["--blockdev", "driver=quorum,node-name=q,children.0=a,children.2=b"],
    ["--blockdev", "driver=null-co,node-name=n,a.01=1"],
    ["--blockdev", "driver=null-co,node-name=n,a.1.b=1"],
    ["--blockdev", "driver=null-co,node-name=n,_a=1"],
    ["--blockdev", "driver=null-co,node-name=n,a.-b=1"],
    ["--blockdev", "driver=null-co,node-name=n,a b=1"],
    ["--blockdev", f"driver=null-co,node-name=n,{LONG_KEY}=1"],
    ["--blockdev", f"driver=null-co,node-name=n,x.{LONG_KEY}=1"],
    ["--blockdev", f"driver=null-co,node-name=n,{LONG_KEY}.x=1"],
    ["--blockdev", "help"],
    ["--blockdev", "?"],
    ["--blockdev", "null-co,node-name=n,help"],
    ["--monitor", "help"],
    ["--export", "help"],
    ["--nbd-server", "help"],
    ["--nbd-server", "foo"],
    ["--object", "help,iothread"],
    ["--object", "iothread,id=x,helpx"],
    ["--object", "a..b=1,help"],
    # JSON
    ["--blockdev", '{"driver":"null-co"'],
    ["--blockdev", '{"driver":"null-co","node-name":"n"} trailing'],
    ["--blockdev", "{bad}"],
    ["--blockdev", '{"a":1,}'],
    ["--blockdev", '{"a":"\\x"}'],
    ["--blockdev", '{"a":"\\u12"}'],
    ["--blockdev", '{"a":"\\uD800\\u0041"}'],
    ["--blockdev", '{"a":"\\uFDD0"}'],
    ["--blockdev", '{"a":01}'],
    ["--blockdev", '{"a":0e5}'],
    ["--blockdev", '{"a":-}'],
    ["--blockdev", '{"a":1e+}'],
    ["--blockdev", '{"a" 1}'],
    ["--blockdev", "{1:2}"],
    ["--blockdev", '{"a":1]'],
    ["--blockdev", '{"a":[1 2]}'],
    ["--blockdev", '{"a":1,"a":2}'],
    ["--blockdev", '{"a":"x'],
    ["--blockdev", '{"a":"\t"}'],
    ["--blockdev", '{"a":1}  ['],
    ["--blockdev", '{"a":' * 1025 + "1" + "}" * 1025],
    # legacy --chardev
    ["--chardev", "nosuch,id=c0"],
    ["--chardev", "nosuch"],
    ["--chardev", "id=c0"],
    ["--chardev", "null,id=1c"],
    ["--chardev", "null,foo=1,id=1c"],
    ["--chardev", "id=x,,y,null"],
    ["--chardev", "null,id=c0,bogus=1"],
    ["--chardev", "null,id=c0,bogus"],
    ["--chardev", "null,id=c0,nonsense"],
    ["--chardev", "null,id=c0,no"],
    ["--chardev", "null,,x,id=c0"],
    ["--chardev", ",id=c0"],
    ["--chardev", "null,id=c0,server=maybe"],
    ["--chardev", "null,id=c0,reconnect=abc"],
    ["--chardev", "null,id=c0,size=1.5"],
    ["--chardev", "null,id=c0,size=16E"],
    ["--chardev", "null,id=c0,server,nowait,delay,bogus"],
    ["--chardev", '{"id":"c0","backend":{"type":"null","data":{}}}'],
    ["--chardev", "help"],
    ["--chardev", "?"],
    ["--chardev", "null,help"],
    ["--chardev", "null,help,bogus=1"],
    ["--chardev", "null,bogus=1,help"],
    ["--chardev", "--blockdev", "x"],
]


@pytest.mark.compat
@needs_qsd
@pytest.mark.parametrize("argv", COMPAT_CASES, ids=lambda a: " ".join(a)[:60])
def test_matches_reference(argv: list[str], tmp_path: os.PathLike[str]) -> None:
    ours = _ours(argv)
    assert ours is not None, "our front end accepted a line every case expects to fail"
    theirs = _run_qsd(argv, os.fspath(tmp_path))
    assert ours == theirs


@pytest.mark.compat
@needs_qsd
@pytest.mark.parametrize(
    "argv",
    [["--help", "--bogus"], ["--blockdev", "bogus", "--help"], ["-hx"]],
    ids=lambda a: " ".join(a),
)
def test_help_wins_like_reference(argv: list[str], tmp_path: os.PathLike[str]) -> None:
    status, out, err = _run_qsd(argv, os.fspath(tmp_path))
    assert (status, err) == (0, "")
    assert out.startswith("Usage: qemu-storage-daemon [options]\n")
    opts = parse_argv(argv, QSD)
    assert pre_pass(opts).action == "--help"
    assert help_text(QSD_NAME).split("\n")[:6] == out.split("\n")[:6]
