"""Applying command-line options to a running daemon, strictly left to right.

Edge ring. Each option goes through the same path as its QMP command: parse (keyval or
JSON), visit into the schema type, call the handler. Every failure becomes qsd's one-line
`PROG: --option ARG: MESSAGE` (plus hint lines) and exit status 1.
"""

from __future__ import annotations

import sys
from typing import Any

from storage_daemon.cli import (
    POSITIONAL,
    ChardevParseError,
    CliOption,
    chardev_help_text,
    chardev_options_help_text,
    check_chardev_params,
    format_option_error,
    parse_chardev_legacy,
    parse_option_value,
)
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.keyval import KeyvalError, is_help_request
from storage_daemon.monitor.chardev import Chardev, NullChardev, SocketChardev, StdioChardev
from storage_daemon.objects import check_id
from storage_daemon.qapi.runtime import member_docs, visit_input

# Options whose argument cannot ask for help (qsd answers this text, exit 1).
_NO_HELP = {
    "--blockdev": "driver",
    "--monitor": "chardev",
    "--export": "type",
    "--nbd-server": None,
}
_NOT_YET = ("--export", "--nbd-server")


class OptionFailed(Exception):
    """Startup must stop: `text` goes to stderr (or stdout for help), `status` is the exit."""

    def __init__(self, text: str, status: int = 1, stdout: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.stdout = stdout


async def apply_option(daemon: Daemon, option: CliOption, prog: str) -> None:
    try:
        await _apply(daemon, option, prog)
    except ChardevParseError as err:
        lines = [format_option_error(prog, option, f"warning: {m}", h) for m, h in err.warnings]
        lines.append(format_option_error(prog, option, err.message, err.hint))
        raise OptionFailed("\n".join(lines)) from err
    except (QmpError, KeyvalError) as err:
        message = err.desc if isinstance(err, QmpError) else err.message
        raise OptionFailed(format_option_error(prog, option, message, err.hint)) from err


async def _apply(daemon: Daemon, option: CliOption, prog: str) -> None:
    name, arg = option.option, option.arg or ""
    if name == POSITIONAL:
        raise QmpError("Unexpected argument")
    if name == "--trace":
        return  # accepted; this daemon has no trace events (see README)
    if name in _NO_HELP and is_help_request(arg, _NO_HELP[name])[0]:
        raise QmpError("Help is not available for this option")
    if name in _NOT_YET:
        raise QmpError("NBD exports are not supported yet by this daemon")
    if name == "--blockdev":
        tree, keyval = parse_option_value(option)
        options = visit_input("BlockdevOptions", tree, keyval=keyval)
        await daemon.call_handler("blockdev-add", options)
    elif name == "--object":
        await _object(daemon, option)
    elif name == "--chardev":
        await _chardev(daemon, option, prog)
    elif name == "--monitor":
        tree, keyval = parse_option_value(option)
        options = visit_input("MonitorOptions", tree, keyval=keyval)
        await _monitor(daemon, options)


async def _object(daemon: Daemon, option: CliOption) -> None:
    wants_help, qom_type = is_help_request(option.arg or "", "qom-type")
    if wants_help:
        if qom_type is None:
            types = "".join(f"  {t}\n" for t in daemon.objects.user_creatable_types())
            raise OptionFailed("List of user creatable objects:\n" + types, 0, stdout=True)
        docs = member_docs(daemon.objects.properties_type(qom_type))
        lines = "".join(f"  {m.name}=<{m.type}>\n" for m in sorted(docs, key=_by_name))
        raise OptionFailed(f"{qom_type} options:\n" + lines, 0, stdout=True)
    tree, keyval = parse_option_value(option)
    options = visit_input("ObjectOptions", tree, keyval=keyval)
    await daemon.call_handler("object-add", options)


def _by_name(member: Any) -> str:
    return str(member.name)


async def _chardev(daemon: Daemon, option: CliOption, prog: str) -> None:
    parsed = parse_chardev_legacy(option.arg or "")
    for message, hint in parsed.warnings:
        sys.stderr.write(format_option_error(prog, option, f"warning: {message}", hint) + "\n")
    if parsed.help_wanted:  # `--chardev null,help`: qsd lists the options and fails
        raise OptionFailed(chardev_options_help_text(), 1, stdout=True)
    if not check_chardev_params(parsed):
        raise OptionFailed(chardev_help_text(), 0, stdout=True)
    params = parsed.params
    chardev_id = params["id"]
    check_id(chardev_id)
    backend = params["backend"]
    chardev: Chardev
    if backend == "socket":
        if chardev_id in daemon.chardevs and isinstance(daemon.chardevs[chardev_id], SocketChardev):
            raise QmpError("duplicate yank instance")
        path, host = params.get("path"), params.get("host")
        if path is None and host is None:
            raise QmpError("Unable to parse FD number ")
        chardev = SocketChardev(
            chardev_id,
            path=path,
            host=host,
            port=params.get("port"),
            server=_on(params.get("server", "off")),
            wait=_on(params.get("wait", "on")),
            reconnect=int(params.get("reconnect", "0")),
        )
    elif backend == "stdio":
        chardev = StdioChardev(chardev_id)
    else:
        chardev = NullChardev(chardev_id)
    if chardev_id in daemon.chardevs:
        raise QmpError(
            f"attempt to add duplicate property '{chardev_id}' to object (type 'container')"
        )
    await chardev.start()
    daemon.chardevs[chardev_id] = chardev
    if isinstance(chardev, SocketChardev) and chardev.wait:
        sys.stderr.write(
            format_option_error(prog, option, f"info: {chardev.waiting_message}") + "\n"
        )
        await chardev.wait_for_client()


def _on(value: str) -> bool:
    return value in ("on", "yes", "true", "y")


async def _monitor(daemon: Daemon, options: Any) -> None:
    mode = getattr(options.mode, "value", options.mode)
    if mode is not None and mode != "control":
        raise QmpError("Only QMP is supported")
    chardev = daemon.chardevs.get(options.chardev)
    if chardev is None:
        raise QmpError(f'chardev "{options.chardev}" not found')
    daemon.add_monitor(chardev, pretty=bool(options.pretty), monitor_id=options.id)
