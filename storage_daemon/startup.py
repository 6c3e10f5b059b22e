"""Applying command-line options to a running daemon, strictly left to right.

Edge ring. Each option goes through the same path as its QMP command: parse (keyval or
JSON), visit into the schema type, call the handler. Every failure becomes qsd's one-line
`PROG: --option ARG: MESSAGE` (plus hint lines) and exit status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from storage_daemon.chardevs import (
    LEGACY_KEYS,
    add_chardev,
    backend_from_legacy,
    create_chardev,
    is_typed_chardev,
    parse_typed_chardev,
)
from storage_daemon.cli import (
    POSITIONAL,
    ChardevParseError,
    CliOption,
    check_chardev_params,
    format_option_error,
    parse_chardev_legacy,
    parse_option_value,
)
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.keyval import KeyvalError, is_help_request
from storage_daemon.monitor.chardev import Chardev, SocketChardev
from storage_daemon.objects import check_id
from storage_daemon.qapi.runtime import visit_input

# Options whose argument can ask for help (`help`, `KIND,help`), with their implied key.
# Beyond qsd, which answers `Help is not available for this option` for all but --object and
# --chardev: the help comes from the schema's docs (storage_daemon/help.py).
_HELP_KEYS = {
    "--blockdev": "driver",
    "--chardev": "backend",
    "--export": "type",
    "--monitor": "chardev",
    "--nbd-server": None,
    "--object": "qom-type",
}


def option_help(option: str, kind: str | None) -> str:
    """The help text of an option (imported on demand: a serving daemon never needs it)."""
    from storage_daemon.help import option_help as text

    return text(option, kind)


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
    if name in _HELP_KEYS:
        wants_help, kind = is_help_request(arg, _HELP_KEYS[name])
        if wants_help:
            raise OptionFailed(option_help(name, kind), 0, stdout=True)
    if name == "--blockdev":
        tree, keyval = parse_option_value(option)
        options = visit_input("BlockdevOptions", tree, keyval=keyval)
        await daemon.call_handler("blockdev-add", options)
    elif name == "--nbd-server":
        tree, keyval = parse_option_value(option)
        options = visit_input("NbdServerOptions", tree, keyval=keyval)
        await daemon.call_handler("nbd-server-start", options)
    elif name == "--export":
        tree, keyval = parse_option_value(option)
        options = visit_input("BlockExportOptions", tree, keyval=keyval)
        await daemon.call_handler("block-export-add", options)
    elif name == "--object":
        await _object(daemon, option)
    elif name == "--chardev":
        await _chardev(daemon, option, prog)
    elif name == "--monitor":
        tree, keyval = parse_option_value(option)
        options = visit_input("MonitorOptions", tree, keyval=keyval)
        await _monitor(daemon, options)


async def _object(daemon: Daemon, option: CliOption) -> None:
    tree, keyval = parse_option_value(option)
    options = visit_input("ObjectOptions", tree, keyval=keyval)
    await daemon.call_handler("object-add", options)


async def _chardev(daemon: Daemon, option: CliOption, prog: str) -> None:
    """qsd's legacy syntax, or the typed one (chardevs.is_typed_chardev says which)."""
    arg = option.arg or ""

    def report(message: str) -> None:  # a client chardev's reconnection failures
        sys.stderr.write(f"{prog}: {message}\n")

    chardev: Chardev
    if is_typed_chardev(arg):
        chardev_id, backend = parse_typed_chardev(arg)
        check_id(chardev_id)
        chardev = await add_chardev(daemon.chardevs, chardev_id, backend, on_error=report)
    else:
        chardev = await _legacy_chardev(daemon, option, prog, report)
    if isinstance(chardev, SocketChardev) and chardev.wait:
        sys.stderr.write(
            format_option_error(prog, option, f"info: {chardev.waiting_message}") + "\n"
        )
        await chardev.wait_for_client()


async def _legacy_chardev(
    daemon: Daemon, option: CliOption, prog: str, report: Callable[[str], None]
) -> Chardev:
    parsed = parse_chardev_legacy(option.arg or "")
    for message, hint in parsed.warnings:
        sys.stderr.write(format_option_error(prog, option, f"warning: {message}", hint) + "\n")
    if parsed.help_wanted:  # e.g. `socket,server,help`, which keyval cannot parse
        raise OptionFailed(option_help("--chardev", parsed.backend), 0, stdout=True)
    if not check_chardev_params(parsed, LEGACY_KEYS):
        raise OptionFailed(option_help("--chardev", None), 0, stdout=True)
    params = parsed.params
    chardev_id = params["id"]
    check_id(chardev_id)
    existing = daemon.chardevs.get(chardev_id)
    if params["backend"] == "socket" and isinstance(existing, SocketChardev):
        raise QmpError("duplicate yank instance")
    backend = backend_from_legacy(params)
    if existing is not None:
        raise QmpError(
            f"attempt to add duplicate property '{chardev_id}' to object (type 'container')"
        )
    chardev = await create_chardev(daemon.chardevs, chardev_id, backend, on_error=report)
    daemon.chardevs[chardev_id] = chardev
    return chardev


async def _monitor(daemon: Daemon, options: Any) -> None:
    mode = getattr(options.mode, "value", options.mode)
    if mode is not None and mode != "control":
        raise QmpError("Only QMP is supported")
    chardev = daemon.chardevs.get(options.chardev)
    if chardev is None:
        raise QmpError(f'chardev "{options.chardev}" not found')
    daemon.add_monitor(chardev, pretty=bool(options.pretty), monitor_id=options.id)
