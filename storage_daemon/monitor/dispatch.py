"""The QMP command dispatcher: name -> schema-checked arguments -> handler -> wire value.

Domain ring. Command-line options reach the same handlers (`--blockdev X` is `blockdev-add
X`), so every check lives in one place. Handlers receive typed models and return models or
plain JSON-able values; errors are `QmpError`s carrying qsd's class and text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage_daemon.errors import CommandNotFound
from storage_daemon.qapi.runtime import command_args, to_wire
from storage_daemon.qapi_generated.commands import COMMANDS

if TYPE_CHECKING:
    from storage_daemon.daemon import Daemon


@dataclass
class CommandContext:
    """Who runs a command: the daemon, and the monitor session (None on the command line)."""

    daemon: Daemon
    monitor: Any = None


Handler = Callable[[CommandContext, Any], Awaitable[Any]]
HANDLERS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Register the handler of a schema command."""

    def register(handler: Handler) -> Handler:
        if name in HANDLERS:
            raise RuntimeError(f"command {name} registered twice")
        HANDLERS[name] = handler
        return handler

    return register


def load_handlers() -> dict[str, Handler]:
    """Import every command module (they register themselves) and return the table."""
    from storage_daemon.monitor import commands  # noqa: F401  (registers handlers)

    return HANDLERS


class Dispatcher:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.handlers = load_handlers()

    async def dispatch(self, monitor: Any, name: str, arguments: dict[str, Any] | None) -> Any:
        """Run one command; returns the JSON-able `return` value or raises QmpError."""
        handler = self.handlers.get(name)
        if handler is None or name not in COMMANDS:
            raise CommandNotFound(f"The command {name} has not been found")
        args = command_args(name, arguments)
        result = await handler(CommandContext(self.daemon, monitor), args)
        return {} if result is None else to_wire(result)
