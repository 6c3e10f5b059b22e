"""Option help and the man page, generated from the schema's doc comments.

Pure text generation over the generated type tables (no I/O; only `main()`, the
`python -m storage_daemon.help --man` entry point, writes a file). Invariant: every member of
every type an option accepts appears in that option's help with its one-line doc; the only
hand-written text here is the option synopses and the man page's frame.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from storage_daemon import __version__
from storage_daemon.errors import QmpError
from storage_daemon.qapi.spec import MemberSpec
from storage_daemon.qapi_generated.types import TYPES

__all__ = [
    "OPTION_TYPES",
    "OptionLine",
    "chardev_help",
    "kind_list",
    "man_page",
    "option_help",
    "option_lines",
]

# option -> (schema type, implied key). Unions list their kinds for `--opt help` and the
# options of one kind for `--opt KIND,help`; structs list their options for `--opt help`.
OPTION_TYPES: dict[str, tuple[str, str | None]] = {
    "--blockdev": ("BlockdevOptions", "driver"),
    "--chardev": ("ChardevOptions", "backend"),
    "--export": ("BlockExportOptions", "type"),
    "--monitor": ("MonitorOptions", "chardev"),
    "--nbd-server": ("NbdServerOptions", None),
    "--object": ("ObjectOptions", "qom-type"),
}

_NAME_COLUMN = 24  # `  name=<type>` is padded to this width before ` - doc`, as QEMU does
_REF_RE = re.compile(r"@([A-Za-z][\w-]*)")  # `@member` in docs names a member
_DEFAULT_RE = re.compile(r"\s*(?:\(default:?\s+([^()]*)\)|;\s*default\s+(.*))$")


@dataclass(frozen=True)
class OptionLine:
    """One option of a help listing: dotted keyval name, type text, doc, default, condition."""

    name: str
    type: str
    doc: str
    default: str | None = None
    required: bool = False
    when: str | None = None  # e.g. "addr.type=unix" for a union branch's member

    def render(self) -> str:
        head = f"  {self.name}=<{self.type}>"
        notes = self.doc
        if self.when:
            notes += f" (only with {self.when})"
        if self.required:
            notes += " (required)"
        if self.default is not None:
            notes += f" (default: {self.default})"
        if not notes:
            return head
        return f"{head.ljust(_NAME_COLUMN)} - {notes.strip()}"


def split_default(doc: str) -> tuple[str, str | None]:
    """`"read-only (default off)"` -> ("read-only", "off"): the doc convention for defaults.

    A member doc ending in `(default X)`, `(default: X)` or `; default X` states the default;
    any other doc has none. Backward compatible: the doc text itself is unchanged.
    """
    doc = _REF_RE.sub(r"\1", doc)
    m = _DEFAULT_RE.search(doc)
    if m is None:
        return doc, None
    return doc[: m.start()].rstrip(), (m.group(1) or m.group(2)).strip()


def _type_text(type_name: str) -> str:
    spec = TYPES[type_name]
    if spec.kind == "enum":
        return "|".join(spec.values)
    if spec.kind == "alternate":
        types = [b.type for b in spec.branches]
        if "BlockdevOptions" in types:
            # a node name, or an inline definition NAME.driver=...
            return "node reference" + (" or null" if "null" in types else "")
        return " or ".join(_type_text(t) for t in types)
    if spec.kind == "array":
        assert spec.element is not None
        return f"list of {_type_text(spec.element)}"
    if spec.kind == "object":
        return "object"
    return type_name


def _member_lines(
    member: MemberSpec, prefix: str, when: str | None, stack: tuple[str, ...]
) -> list[OptionLine]:
    name = prefix + member.name
    spec = TYPES[member.type]
    doc, default = split_default(member.doc)
    required = not member.optional
    if spec.kind == "object" and member.type not in stack:
        return _object_lines(member.type, name + ".", when, (*stack, member.type))
    if spec.kind == "array" and spec.element is not None:
        element = MemberSpec(member.name + ".N", "", spec.element, member.optional, member.doc)
        return _member_lines(element, prefix, when, stack)
    lines = [OptionLine(name, _type_text(member.type), doc, default, required, when)]
    if spec.kind == "alternate":
        for branch in spec.branches:
            expand = TYPES[branch.type].kind == "object" and branch.type != "BlockdevOptions"
            if expand and branch.type not in stack:
                lines += _object_lines(branch.type, name + ".", when, (*stack, branch.type))
    return lines


def _object_lines(
    type_name: str, prefix: str, when: str | None, stack: tuple[str, ...]
) -> list[OptionLine]:
    spec = TYPES[type_name]
    lines: list[OptionLine] = []
    for m in spec.members:
        lines += _member_lines(m, prefix, when, stack)
    if spec.tag is not None:
        for v in spec.variants:
            cond = f"{prefix}{spec.tag}={v.case}"
            if when:
                cond = f"{when}, {cond}"
            for m in TYPES[v.type].members:
                lines += _member_lines(m, prefix, cond, (*stack, v.type))
    return lines


def option_lines(type_name: str, case: str | None = None, *, base: bool = True) -> list[OptionLine]:
    """Every option of struct `type_name`, or of union `type_name`'s branch `case` (with the
    base members unless `base` is False), nested members as dotted keyval names, sorted."""
    spec = TYPES[type_name]
    lines: list[OptionLine] = []
    stack = (type_name,)
    if base:
        for m in spec.members:
            if case is not None and m.name == spec.tag:
                continue  # the kind is given already
            lines += _member_lines(m, "", None, stack)
    if case is not None:
        variant = next(v for v in spec.variants if v.case == case)
        for m in TYPES[variant.type].members:
            lines += _member_lines(m, "", None, (*stack, variant.type))
    return sorted(lines, key=lambda line: (line.name, line.when or ""))


def kind_list(type_name: str) -> list[tuple[str, str]]:
    """A union's kinds (its tag enum's values) with their docs, in schema order."""
    spec = TYPES[type_name]
    assert spec.tag is not None
    tag_type = next(m.type for m in spec.members if m.name == spec.tag)
    enum = TYPES[tag_type]
    cases = {v.case for v in spec.variants}
    return [(v, d) for v, d in zip(enum.values, enum.value_docs, strict=True) if v in cases]


# --object help speaks QOM type names; the one ObjectType value that differs from its QOM
# type (qsd 7.2's schema says `authz-listfile`, the type is `authz-list-file`).
_QOM_TYPE_NAMES = {"authz-listfile": "authz-list-file"}
_OBJECT_KINDS = {qom: kind for kind, qom in _QOM_TYPE_NAMES.items()}


def shown_kind(option: str, kind: str) -> str:
    """The name help shows (and accepts) for union kind `kind` of `option`."""
    return _QOM_TYPE_NAMES.get(kind, kind) if option == "--object" else kind


def _kind_lines(type_name: str) -> str:
    out = ""
    option = "--object" if type_name == OPTION_TYPES["--object"][0] else ""
    for value, doc in kind_list(type_name):
        head, doc = f"  {shown_kind(option, value)}", _REF_RE.sub(r"\1", doc)
        out += (f"{head.ljust(_NAME_COLUMN)} - {doc}" if doc else head) + "\n"
    return out


_KIND_HEADERS = {
    "--blockdev": "Available block drivers ({opt} DRIVER,help lists the options of one):\n",
    "--export": "Available export types ({opt} TYPE,help lists the options of one):\n",
    "--object": "List of user creatable objects:\n",
}


def option_help(option: str, kind: str | None) -> str:
    """The help for `OPTION help` (kind None) or `OPTION KIND,help` (stdout, exit 0).

    Raises QmpError (`Parameter 'driver' does not accept value 'x'`) for an unknown kind.
    """
    if option == "--chardev":
        return chardev_help(kind)
    type_name, implied = OPTION_TYPES[option]
    spec = TYPES[type_name]
    if spec.tag is None:
        name = option.removeprefix("--")
        return f"{name} options:\n" + "".join(
            line.render() + "\n" for line in option_lines(type_name)
        )
    if kind is None:
        return _KIND_HEADERS[option].format(opt=option) + _kind_lines(type_name)
    shown = kind
    if option == "--object":
        kind = None if kind in _QOM_TYPE_NAMES else _OBJECT_KINDS.get(kind, kind)
    if kind not in {v.case for v in spec.variants}:
        if option == "--object":  # qsd lists the types for `--object nosuch,help`
            return option_help(option, None)
        raise QmpError(f"Parameter '{implied}' does not accept value '{kind}'")
    # --object TYPE,help lists the type's properties only (not id/qom-type), as qsd does.
    lines = option_lines(type_name, kind, base=option != "--object")
    return f"{shown} options:\n" + "".join(line.render() + "\n" for line in lines)


def _legacy_type(kind: str) -> str:
    return {"bool": "bool", "num": "num", "size": "size"}.get(kind, "str")


def chardev_help(backend: str | None) -> str:
    """`--chardev help` (backends with docs) or `--chardev BACKEND,help` (its typed options,
    then the legacy qsd names and what each one sets)."""
    from storage_daemon.chardevs import LEGACY_KEYS
    from storage_daemon.cli import CHARDEV_OPTS

    if backend is None:
        return "Available chardev backend types: \n" + _kind_lines("ChardevOptions")
    if backend not in LEGACY_KEYS:
        raise QmpError(f"'{backend}' is not a valid char driver name")
    typed = option_lines("ChardevOptions", backend)
    out = f"{backend} options (typed syntax, --chardev {backend},id=ID,...):\n"
    out += "".join(line.render() + "\n" for line in typed)
    docs: dict[str, OptionLine] = {}
    for line in typed:
        docs.setdefault(line.name, line)  # addr.port: the inet one (host/port are TCP)
    out += f"{backend} options (legacy syntax of qemu-storage-daemon 7.2):\n"
    for key, target in sorted(LEGACY_KEYS[backend].items()):
        inverted = target.startswith("!")
        target = target.lstrip("!")
        line = docs[target]
        default = LEGACY_DEFAULTS.get((backend, key), line.default)
        note = f"{'the opposite of' if inverted else 'same as'} {target}: {line.doc}"
        legacy = OptionLine(key, _legacy_type(CHARDEV_OPTS[key]), note, default)
        out += legacy.render() + "\n"
    return out


# Where the legacy syntax's default differs from the typed member's.
LEGACY_DEFAULTS = {("socket", "server"): "off", ("socket", "delay"): "on"}


# ---- the man page ----------------------------------------------------------------------------

_SYNOPSES: list[tuple[str, str]] = [
    ("-h, --help", "Print the option summary and exit."),
    ("-V, --version", "Print the version and exit."),
    ("-T, --trace [[enable=]PATTERN][,events=FILE][,file=FILE]", "Accepted and ignored."),
    (
        "--blockdev [driver=]DRIVER,node-name=NAME[,OPTION=VALUE...]",
        "Add a block node, as blockdev-add does. JSON is accepted too. "
        "--blockdev help lists the drivers, --blockdev DRIVER,help a driver's options.",
    ),
    (
        "--chardev BACKEND,id=ID[,OPTION=VALUE...]",
        "Add a character device, in qemu-storage-daemon's legacy syntax or in the typed syntax "
        "(see TYPED CHARDEV). --chardev help lists the backends, --chardev BACKEND,help a "
        "backend's options in both syntaxes.",
    ),
    ("--daemonize", "Detach once start-up has finished; the parent exits then."),
    (
        "--export [type=]nbd,id=ID,node-name=NODE[,OPTION=VALUE...]",
        "Export a block node, as block-export-add does. --export help lists the export "
        "types, --export TYPE,help an export type's options.",
    ),
    (
        "--monitor [chardev=]ID[,mode=control][,pretty=on|off]",
        "Run a QMP monitor on a character device. --monitor help lists the options.",
    ),
    (
        "--nbd-server addr.type=unix,addr.path=PATH[,OPTION=VALUE...]",
        "Start the NBD server, as nbd-server-start does (flat socket address). "
        "--nbd-server help lists the options.",
    ),
    (
        "--object [qom-type=]TYPE,id=ID[,PROPERTY=VALUE...]",
        "Create an object, as object-add does. --object help lists the types, "
        "--object TYPE,help a type's properties.",
    ),
    ("--pidfile PATH", "Write the process id to PATH once start-up has finished."),
]


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _man_lines(lines: list[OptionLine]) -> list[str]:
    out: list[str] = []
    for line in lines:
        out += [".TP", f"\\fB{_esc(line.name)}\\fR=<{_esc(line.type)}>"]
        text = line.render().partition(" - ")[2]
        out.append(_esc(text) if text else "(undocumented)")
    return out


def _section_for_union(option: str, title: str) -> list[str]:
    type_name, _ = OPTION_TYPES[option]
    out = [f".SH {title}"]
    base_lines = [line for line in option_lines(type_name) if line.name != TYPES[type_name].tag]
    if option != "--object" and base_lines:
        out += [".SS Options every kind has", *_man_lines(base_lines)]
    for kind, doc in kind_list(type_name):
        out += [f".SS {_esc(kind)}", _esc(_REF_RE.sub(r"\1", doc)) if doc else ""]
        out += _man_lines(option_lines(type_name, kind, base=False))
        if option == "--chardev":
            out += [".PP", _esc(f"Legacy syntax: {_legacy_summary(kind)}.")]
    return out


def _legacy_summary(backend: str) -> str:
    from storage_daemon.chardevs import LEGACY_KEYS

    pairs = sorted(LEGACY_KEYS[backend].items())
    return ", ".join(
        f"{k} (the opposite of {t[1:]})" if t.startswith("!") else f"{k} (= {t})" for k, t in pairs
    )


def man_page() -> str:
    """docs/storage-daemon.1 (troff), from the same tables as the option help."""
    out = [
        '.\\" Generated by python -m storage_daemon.help --man from schema/*.json; do not edit.',
        f'.TH STORAGE\\-DAEMON 1 "" "storage-daemon {__version__}" "User Commands"',
        ".SH NAME",
        "storage\\-daemon \\- block storage daemon compatible with qemu\\-storage\\-daemon 7.2",
        ".SH SYNOPSIS",
        "\\fBstorage\\-daemon\\fR [\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        "A re\\-implementation of qemu\\-storage\\-daemon 7.2: the same command line, QMP "
        "protocol and NBD behaviour. Options are applied strictly left to right; each one "
        "goes through the same handler as the QMP command it names.",
        "Every option taking keyval or JSON accepts \\fBhelp\\fR (e.g. \\fB\\-\\-blockdev help\\fR, "
        "\\fB\\-\\-blockdev qcow2,help\\fR), printed on standard output with exit status 0.",
        ".SH OPTIONS",
    ]
    for synopsis, text in _SYNOPSES:
        out += [".TP", f"\\fB{_esc(synopsis)}\\fR", _esc(text)]
    out += _section_for_union("--blockdev", "BLOCK DRIVERS")
    out += _section_for_union("--export", "EXPORT TYPES")
    out += [".SH NBD SERVER OPTIONS", *_man_lines(option_lines("NbdServerOptions"))]
    out += [".SH MONITOR OPTIONS", *_man_lines(option_lines("MonitorOptions"))]
    out += _section_for_union("--object", "OBJECT TYPES")
    out += _section_for_union("--chardev", "CHARDEV BACKENDS")
    out += [
        ".SH TYPED CHARDEV",
        "Besides qemu\\-storage\\-daemon's legacy syntax, \\fB\\-\\-chardev\\fR takes the "
        "options of chardev\\-add with the \\fIdata\\fR wrappers flattened away, as keyval or "
        "JSON. An argument is typed when it starts with \\fB{\\fR or uses a key the legacy "
        "syntax does not have (a dotted key such as \\fBaddr.type\\fR, or \\fBaddr\\fR, "
        "\\fBin\\fR, \\fBout\\fR); anything else is parsed exactly as qemu\\-storage\\-daemon "
        "7.2 parses it. Examples:",
        ".nf",
        "\\-\\-chardev socket,id=m0,addr.type=unix,addr.path=/run/qsd.sock,server=on,wait=off",
        "\\-\\-chardev file,id=f0,out=/var/log/qsd.out",
        '\\-\\-chardev \'{"id":"m0","backend":"socket","addr":{"type":"unix",'
        '"path":"/run/qsd.sock"},"wait":false}\'',
        '\\-\\-chardev \'{"id":"m0","backend":{"type":"null","data":{}}}\'',
        ".fi",
        ".SH EXIT STATUS",
        "0 after a clean shutdown (quit, SIGTERM, SIGINT, SIGHUP) or a help request; "
        "1 when an option fails.",
        ".SH SEE ALSO",
        "\\fBqemu\\-storage\\-daemon\\fR(1), \\fBqemu\\-img\\fR(1), \\fBnbdinfo\\fR(1)",
    ]
    return "\n".join(line for line in out if line != "") + "\n"


MAN_PATH = "docs/storage-daemon.1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m storage_daemon.help", description="Write or check the man page."
    )
    ap.add_argument("--man", action="store_true", help=f"write {MAN_PATH}")
    ap.add_argument("--check", action="store_true", help=f"exit 1 when {MAN_PATH} is stale")
    args = ap.parse_args(argv)
    path = Path(__file__).resolve().parents[1] / MAN_PATH
    text = man_page()
    if args.check:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            print(f"{MAN_PATH} is stale: run python -m storage_daemon.help --man", file=sys.stderr)
            return 1
        return 0
    if args.man:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {MAN_PATH}")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
