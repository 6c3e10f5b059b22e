"""The qemu-storage-daemon command line: getopt scanning, option values, legacy --chardev, help.

Pure functions (no I/O): the daemon prints what these return and applies the options. Every
error text is byte-for-byte what qsd 7.2 (glibc 2.36 getopt, QemuOpts, keyval) prints; the
order in which errors are detected is part of that contract, so keep it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage_daemon import __version__
from storage_daemon.keyval import (
    KeyvalError,
    is_help_option,
    parse_json_option,
    parse_keyval,
    parse_size_checked,
    parse_uint,
)

__all__ = [
    "CHARDEV_BACKENDS",
    "CHARDEV_BACKEND_PARAMS",
    "CHARDEV_OPTS",
    "IDENTIFIER_HINT",
    "IMPLEMENTED_CHARDEV_BACKENDS",
    "IMPLIED_KEYS",
    "LONG_OPTIONS",
    "POSITIONAL",
    "PRE_PASS_OPTIONS",
    "ChardevArgs",
    "ChardevParseError",
    "CliError",
    "CliOption",
    "PrePass",
    "chardev_help_text",
    "chardev_options_help_text",
    "check_chardev_params",
    "format_option_error",
    "help_text",
    "id_wellformed",
    "main_pass",
    "parse_argv",
    "parse_chardev_legacy",
    "parse_option_value",
    "pre_pass",
    "version_text",
]

# ---- getopt ----------------------------------------------------------------------------------

# qsd's long options in its table order (glibc lists ambiguity candidates in this order);
# the value says whether the option requires an argument.
LONG_OPTIONS: dict[str, bool] = {
    "blockdev": True,
    "chardev": True,
    "daemonize": False,
    "export": True,
    "help": False,
    "monitor": True,
    "nbd-server": True,
    "object": True,
    "pidfile": True,
    "trace": True,
    "version": False,
}
_SHORT = {"h": "--help", "T": "--trace", "V": "--version"}  # optstring "-hT:V"
_SHORT_WITH_ARG = frozenset("T")

POSITIONAL = ""  # CliOption.option of a bare argument ("positional: Unexpected argument")

# Handled by qsd's first getopt pass, before any other option takes effect.
PRE_PASS_OPTIONS = frozenset({"--help", "--version", "--daemonize", "--pidfile"})


@dataclass(frozen=True)
class CliOption:
    """One scanned option.

    `option` is the canonical long name (`--blockdev`, `--trace` for -T, `--help` for -h) or
    POSITIONAL; `arg` its argument; `loc` the argv word(s) qsd names in error messages, verbatim
    (`--blockdev X`, `--b=X`, `-Tfoo`, `-T foo`, `pos`).
    """

    option: str
    arg: str | None
    loc: str = ""

    @property
    def location(self) -> str:
        if self.loc:
            return self.loc
        if self.option == POSITIONAL:
            return self.arg or ""
        return self.option if self.arg is None else f"{self.option} {self.arg}"


class CliError(Exception):
    """A command line error; `line` is the complete stderr text (no trailing newline)."""

    def __init__(self, line: str, status: int = 1) -> None:
        super().__init__(line)
        self.line = line
        self.status = status


def _scan(argv: Sequence[str], prog: str) -> tuple[list[CliOption], str | None]:
    """getopt_long(argc, argv, "-hT:V", ...) as glibc 2.36 runs it: (options, first error)."""
    out: list[CliOption] = []
    i = 0
    n = len(argv)
    while i < n:
        word = argv[i]
        if word == "--":
            break  # getopt stops; qsd ignores whatever follows
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name in LONG_OPTIONS:
                full = name
            else:
                cands = [o for o in LONG_OPTIONS if o.startswith(name)]
                if not cands:
                    return out, f"{prog}: unrecognized option '{word}'"
                if len(cands) > 1:
                    listing = "".join(f" '--{c}'" for c in cands)
                    return out, f"{prog}: option '{word}' is ambiguous; possibilities:{listing}"
                full = cands[0]
            has_arg = LONG_OPTIONS[full]
            if eq:
                if not has_arg:
                    return out, f"{prog}: option '--{full}' doesn't allow an argument"
                out.append(CliOption(f"--{full}", value, word))
                i += 1
            elif has_arg:
                if i + 1 >= n:
                    return out, f"{prog}: option '--{full}' requires an argument"
                out.append(CliOption(f"--{full}", argv[i + 1], f"{word} {argv[i + 1]}"))
                i += 2
            else:
                out.append(CliOption(f"--{full}", None, word))
                i += 1
        elif word.startswith("-") and word != "-":
            i += 1
            for j in range(1, len(word)):
                c = word[j]
                if c not in _SHORT:
                    return out, f"{prog}: invalid option -- '{c}'"
                if c in _SHORT_WITH_ARG:
                    rest = word[j + 1 :]
                    if rest:
                        out.append(CliOption(_SHORT[c], rest, word))
                    elif i < n:
                        out.append(CliOption(_SHORT[c], argv[i], f"{word} {argv[i]}"))
                        i += 1
                    else:
                        return out, f"{prog}: option requires an argument -- '{c}'"
                    break
                out.append(CliOption(_SHORT[c], None, word))
        else:
            out.append(CliOption(POSITIONAL, word, word))
            i += 1
    return out, None


def parse_argv(argv: Sequence[str], prog: str) -> list[CliOption]:
    """Scan `argv` (without argv[0]) like qsd's getopt_long; return the options in order.

    `prog` prefixes getopt's own messages; glibc uses argv[0] verbatim there (qsd's other
    messages use its basename), so pass sys.argv[0] to match qsd byte for byte.

    Order of effects, as qsd 7.2 has it (verified against the binary):

    * qsd runs getopt twice. The first pass handles only getopt errors, --help, --version,
      --daemonize and --pidfile (PRE_PASS_OPTIONS), in argv order: the first of a getopt
      error, --help and --version ends the program. So a getopt error anywhere beats every
      --blockdev error, but an earlier --help/--version beats a later getopt error.
      parse_argv models this: it raises CliError on the first getopt error unless --help or
      --version comes before it, in which case it returns the options scanned so far.
    * The second pass applies everything else strictly left to right, -T/--trace included
      (it is NOT part of the pre-pass in 7.2), and a positional argument fails only when that
      pass reaches it (`--blockdev bad pos` reports the blockdev error).
    * `--` ends the scan; everything after it is ignored. An option's required argument is
      the next word even if it starts with `-`.
    * The pidfile is written after all options were applied (the daemon's job).

    Use pre_pass() and main_pass() to split the result.
    """
    options, error = _scan(argv, prog)
    if error is not None:
        if any(o.option in ("--help", "--version") for o in options):
            return options
        raise CliError(error)
    return options


@dataclass(frozen=True)
class PrePass:
    """What qsd's first getopt pass decides.

    `action` is "--help" or "--version" when one of them ends the program (the first wins),
    else None. `pidfile` is the last --pidfile's argument.
    """

    action: str | None
    daemonize: bool
    pidfile: str | None


def pre_pass(options: Sequence[CliOption]) -> PrePass:
    action: str | None = None
    daemonize = False
    pidfile: str | None = None
    for o in options:
        if o.option in ("--help", "--version"):
            action = o.option
            break
        if o.option == "--daemonize":
            daemonize = True
        elif o.option == "--pidfile":
            pidfile = o.arg
    return PrePass(action, daemonize, pidfile)


def main_pass(options: Sequence[CliOption]) -> list[CliOption]:
    """The options the second pass applies, in order (positionals included: each one fails)."""
    return [o for o in options if o.option not in PRE_PASS_OPTIONS]


def format_option_error(prog: str, option: CliOption, message: str, hint: str | None = None) -> str:
    """`PROG: LOCATION: MESSAGE`, then the hint lines as qsd prints them (no trailing newline).

    Also right for warnings: pass message="warning: ...".
    """
    line = f"{prog}: {option.location}: {message}"
    if hint:
        line += "\n" + hint.rstrip("\n")
    return line


# ---- option values ---------------------------------------------------------------------------

# The key a keyval argument's first element may omit, per option (None: no implied key).
IMPLIED_KEYS: dict[str, str | None] = {
    "--blockdev": "driver",
    "--export": "type",
    "--object": "qom-type",
    "--monitor": "chardev",
    "--nbd-server": None,
}


def parse_option_value(option: CliOption) -> tuple[Any, bool]:
    """Parse --blockdev/--export/--object/--monitor/--nbd-server's argument.

    Returns (tree, is_keyval): JSON when the argument starts with `{` (then is_keyval is
    False and the tree has JSON types), else a keyval tree of dicts, lists and strings.
    Raises KeyvalError with qsd's message (`Help is not available for this option` for a
    help request: check keyval.is_help_request first for --object).
    """
    if option.option not in IMPLIED_KEYS:
        raise ValueError(f"{option.option} does not take a keyval/JSON argument")
    arg = option.arg or ""
    if arg.startswith("{"):
        return parse_json_option(arg), False
    return parse_keyval(arg, IMPLIED_KEYS[option.option]), True


# ---- legacy --chardev (QemuOpts) -------------------------------------------------------------

# Every key qsd 7.2's QemuOpts list for chardevs accepts, with its QemuOpts type
# ("bool", "str", "num", "size"); `id` is handled apart. Any backend accepts any of these.
CHARDEV_OPTS: dict[str, str] = {
    "abstract": "bool",
    "append": "bool",
    "backend": "str",
    "chardev": "str",
    "clipboard": "bool",
    "cols": "num",
    "debug": "num",
    "delay": "bool",
    "fd": "str",
    "height": "num",
    "host": "str",
    "ipv4": "bool",
    "ipv6": "bool",
    "localaddr": "str",
    "localport": "str",
    "logappend": "bool",
    "logfile": "str",
    "mouse": "bool",
    "mux": "bool",
    "name": "str",
    "nodelay": "bool",
    "path": "str",
    "port": "str",
    "reconnect": "num",
    "rows": "num",
    "server": "bool",
    "signal": "bool",
    "size": "size",
    "telnet": "bool",
    "tight": "bool",
    "tls-authz": "str",
    "tls-creds": "str",
    "tn3270": "bool",
    "to": "num",
    "wait": "bool",
    "websocket": "bool",
    "width": "num",
}

# qsd 7.2's backends, in the order `--chardev help` lists them.
CHARDEV_BACKENDS = (
    "pty",
    "udp",
    "memory",
    "file",
    "socket",
    "stdio",
    "ringbuf",
    "null",
    "parallel",
    "pipe",
    "mux",
    "serial",
)
IMPLEMENTED_CHARDEV_BACKENDS = ("socket", "stdio", "null")

_COMMON = frozenset({"backend", "id", "logfile", "logappend", "mux"})
# The keys each backend reads. qsd accepts (and ignores) any other CHARDEV_OPTS key too.
CHARDEV_BACKEND_PARAMS: dict[str, frozenset[str]] = {
    "socket": _COMMON
    | {
        "path",
        "host",
        "port",
        "fd",
        "to",
        "ipv4",
        "ipv6",
        "server",
        "wait",
        "telnet",
        "tn3270",
        "websocket",
        "delay",
        "nodelay",
        "reconnect",
        "tls-creds",
        "tls-authz",
        "abstract",
        "tight",
    },
    "null": _COMMON,
    "stdio": _COMMON | {"signal"},
    "file": _COMMON | {"path", "append"},
    "ringbuf": _COMMON | {"size"},
    "pipe": _COMMON | {"path"},
    "udp": _COMMON | {"host", "port", "localaddr", "localport", "ipv4", "ipv6"},
    "pty": _COMMON,
}

IDENTIFIER_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
_SIZE_HINT = (
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
    "and exabytes, respectively."
)


def id_wellformed(text: str) -> bool:
    """QEMU's id_wellformed(): an ASCII letter, then letters, digits, '-', '.', '_'."""
    if not text or not (text[0].isascii() and text[0].isalpha()):
        return False
    return all(c.isascii() and (c.isalnum() or c in "-._") for c in text)


@dataclass
class ChardevArgs:
    """A parsed legacy --chardev argument.

    `params` maps key -> string value in first-appearance order (a repeated key keeps the last
    value) and includes "backend" (the implied first element) and "id" when given.
    `warnings` are (message, hint) pairs, message without the "warning: " prefix: print each
    as format_option_error(prog, option, "warning: " + message, hint), before anything else.
    `help_wanted`: a `help`/`?` element asked for the option list
    (chardev_options_help_text() on stdout, exit status 1, as qsd does).
    """

    params: dict[str, str] = field(default_factory=dict)
    warnings: list[tuple[str, str | None]] = field(default_factory=list)
    help_wanted: bool = False

    @property
    def backend(self) -> str | None:
        return self.params.get("backend")

    @property
    def id(self) -> str | None:
        return self.params.get("id")


class ChardevParseError(KeyvalError):
    """A --chardev parse error; `warnings` were already due before it (print them first)."""

    def __init__(
        self, message: str, hint: str | None, warnings: list[tuple[str, str | None]]
    ) -> None:
        super().__init__(message, hint)
        self.warnings = warnings


def _opt_value(text: str, pos: int) -> tuple[str, int]:
    """QemuOpts get_opt_value: read to the next single ',' (`,,` is a comma); return end too."""
    chars: list[str] = []
    n = len(text)
    while pos < n:
        if text[pos] == ",":
            if pos + 1 < n and text[pos + 1] == ",":
                chars.append(",")
                pos += 2
                continue
            break
        chars.append(text[pos])
        pos += 1
    return "".join(chars), pos


def _check_opt_value(name: str, kind: str, value: str, out: ChardevArgs) -> None:
    if kind == "bool":
        if value not in ("on", "yes", "true", "y", "off", "no", "false", "n"):
            raise KeyvalError(f"Parameter '{name}' expects 'on' or 'off'")
    elif kind == "num":
        if parse_uint(value) is None:
            raise KeyvalError(f"Parameter '{name}' expects a number")
    elif kind == "size":
        try:
            _, hex_suffix = parse_size_checked(value)
        except OverflowError:
            raise KeyvalError(f"Value '{value}' is out of range for parameter '{name}'") from None
        except ValueError:
            raise KeyvalError(
                f"Parameter '{name}' expects a non-negative number below 2^64", _SIZE_HINT
            ) from None
        if hex_suffix:
            out.warnings.append(
                (f"Using a multiplier suffix on hex numbers is deprecated: {value}", None)
            )


def parse_chardev_legacy(text: str) -> ChardevArgs:
    """Parse `--chardev BACKEND,id=ID,key=val,...` the way qsd 7.2's QemuOpts does.

    Checks made here, in qsd's order: the id (found as a leading `id=` or the first `,id=` in
    the raw text) must be an identifier; then element by element: short-form booleans (`server`
    = server=on, `nowait` = wait=off) warn, unknown keys give `Invalid parameter 'x'`, bool/
    number/size values are checked; a `help`/`?` element stops parsing with help_wanted.
    Later `id=` elements are ignored. Raises ChardevParseError.
    """
    out = ChardevArgs()
    ident: str | None = None
    if text.startswith("id="):
        ident = _opt_value(text, 3)[0]
    elif (at := text.find(",id=")) >= 0:
        ident = _opt_value(text, at + 4)[0]
    if ident is not None and not id_wellformed(ident):
        raise ChardevParseError("Parameter 'id' expects an identifier", IDENTIFIER_HINT, [])
    pos = 0
    first = True
    n = len(text)
    try:
        while pos < n:
            end = pos
            while end < n and text[end] not in "=,":
                end += 1
            if end >= n or text[end] != "=":
                if first:
                    name = "backend"
                    value, pos = _opt_value(text, pos)
                else:
                    name = text[pos:end]
                    pos = end
                    prefix = ""
                    if name.startswith("no"):
                        name, value, prefix = name[2:], "off", "no"
                    else:
                        value = "on"
                        if is_help_option(name):
                            out.help_wanted = True
                            return out
                    if name == "delay":
                        advice = f"Please use nodelay={'on' if prefix else 'off'} instead"
                    else:
                        advice = f"Please use {name}={value} instead"
                    out.warnings.append(
                        (f"short-form boolean option '{prefix}{name}' deprecated", advice)
                    )
            else:
                name = text[pos:end]
                value, pos = _opt_value(text, end + 1)
            if pos < n:
                pos += 1  # the separating ','
            first = False
            if name == "id":
                continue
            kind = CHARDEV_OPTS.get(name)
            if kind is None:
                raise KeyvalError(f"Invalid parameter '{name}'")
            _check_opt_value(name, kind, value, out)
            out.params[name] = value
    except ChardevParseError:
        raise
    except KeyvalError as err:
        raise ChardevParseError(err.message, err.hint, out.warnings) from None
    if ident is not None:
        out.params["id"] = ident
    return out


def check_chardev_params(
    parsed: ChardevArgs, backends: Collection[str] = IMPLEMENTED_CHARDEV_BACKENDS
) -> bool:
    """qsd's checks after parsing, in its order; False when `--chardev help` was asked for.

    A backend of `help`/`?` means: print chardev_help_text() on stdout, exit 0 (returns
    False). Else raises KeyvalError: `chardev: no id specified`, `chardev: "ID" missing
    backend`, `'x' is not a valid char driver name` (for names not in `backends`). Keys a
    backend does not read are accepted and ignored, as qsd does.
    """
    backend = parsed.backend
    if backend is not None and is_help_option(backend):
        return False
    if parsed.id is None:
        raise KeyvalError("chardev: no id specified")
    if backend is None:
        raise KeyvalError(f'chardev: "{parsed.id}" missing backend')
    if backend not in backends:
        raise KeyvalError(f"'{backend}' is not a valid char driver name")
    return True


def chardev_help_text(backends: Sequence[str] = IMPLEMENTED_CHARDEV_BACKENDS) -> str:
    """`--chardev help` output (stdout, exit 0), one backend per line, trailing newline."""
    return "Available chardev backend types: \n" + "".join(f"  {b}\n" for b in backends)


_OPT_TYPE_TEXT = {"bool": "bool (on/off)", "str": "str", "num": "num", "size": "size"}


def chardev_options_help_text() -> str:
    """`--chardev null,help` output (stdout, exit status 1 in qsd), trailing newline."""
    lines = [f"  {k}=<{_OPT_TYPE_TEXT[v]}>\n" for k, v in sorted(CHARDEV_OPTS.items())]
    return "chardev options:\n" + "".join(lines)


# ---- help and version ------------------------------------------------------------------------

_HELP = """\
Usage: {prog} [options]
QEMU storage daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend: qsd's syntax
                         (socket,id=<id>,path=<path>,server=on,wait=off) or
                         the typed one (socket,id=<id>,addr.type=unix,
                         addr.path=<path>,server=on,wait=off, or JSON)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmaps.<n>=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.

  --pidfile <path>       write process ID to a file after startup

The options taking keyval or JSON also answer `help`:
  --blockdev help        list the block drivers
  --blockdev <driver>,help
                         list a driver's options, with types and defaults
  --chardev help         list the chardev backends
  --chardev <backend>,help
                         list a backend's options (typed and legacy names)
  --export help          list the export types; --export <type>,help: options
  --monitor help, --nbd-server help
                         list the options
See storage-daemon(1) for every driver, object type and backend.
"""


def help_text(prog: str) -> str:
    """Our --help (stdout, exit 0): qsd's text and structure, limited to what we implement.

    Differences from qsd 7.2: no FUSE / vhost-user-blk / vduse-blk exports; the NBD export
    line names the real `bitmaps.<n>` member (qsd's help says `bitmap`, which it rejects);
    --chardev names its typed syntax; a closing list of the per-option help requests (which
    qsd lacks) replaces qsd's bug-report lines.
    """
    return _HELP.format(prog=prog)


def version_text(prog: str) -> str:
    """Our --version (stdout, exit 0), trailing newline."""
    return f"{prog} version {__version__} (qemu-storage-daemon 7.2 compatible)\n"
