"""The QMP command dispatcher: name -> schema-checked arguments -> handler -> wire value.

Domain ring. Command-line options reach the same handlers (`--blockdev X` is `blockdev-add
X`), so every check lives in one place. Handlers receive typed models and return models or
plain JSON-able values; errors are `QmpError`s carrying qsd's class and text.
Handler modules are imported when first needed, in a worker thread (start-up imports only
what the command line uses; the daemon loads the rest before it reports ready). Invariant:
`load_handlers()` returns only once every module named in `commands/__init__.py` is imported,
and a command whose module is not imported yet waits for it rather than failing.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import re
import sys
import threading
from collections.abc import Awaitable, Callable
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage_daemon.errors import IN_COMMAND, CommandNotFound
from storage_daemon.qapi.runtime import command_args, to_wire
from storage_daemon.qapi_generated.commands import COMMANDS

if TYPE_CHECKING:
    from storage_daemon.daemon import Daemon


class CommandContext:
    """Who runs a command: the daemon, and the monitor session (None on the command line)."""

    __slots__ = ("daemon", "monitor")

    def __init__(self, daemon: Daemon, monitor: Any = None) -> None:
        self.daemon = daemon
        self.monitor = monitor


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


# ---- loading the handler modules --------------------------------------------------------
#
# `storage_daemon.monitor.commands/__init__.py` imports every command module (adding one is
# one import line there). Importing all of them costs tens of milliseconds, most of it for
# commands a start-up never runs. So the package module is first created without running its
# __init__, single modules are imported into it as their commands are needed, and
# `load_handlers()` runs the __init__ later (it skips the modules already imported).

_PACKAGE = "storage_daemon.monitor.commands"
_REGISTRATION = re.compile(r"""@command\(\s*["']([^"']+)["']\s*\)""")
# Serialises the imports the daemon runs in worker threads (command modules here, block
# drivers in __main__), one module at a time: two threads importing modules that import each
# other from opposite ends would deadlock, which Python reports by failing one import.
IMPORT_LOCK = threading.RLock()
_lock = threading.Lock()  # guards the three below
_deferred: list[ModuleSpec] = []  # the package's spec while its __init__ has not run
_modules: list[str] = []  # the command modules, as the package's __init__ names them
_index: dict[str, str] = {}  # command -> module
_CLIENTS_START_WITH = ("query-version", "query-commands", "query-qmp-schema")


def scan_package(directory: Path) -> tuple[list[str], dict[str, str]]:
    """The modules the commands package in `directory` imports, and which registers what.

    Read from the sources: the names its __init__ imports, and their `@command("name")`
    lines. Only a hint: for a command it misses, the dispatcher loads every module, so a
    handler registered some other way is still found."""
    init = ast.parse((directory / "__init__.py").read_text(encoding="utf-8"))
    modules: list[str] = []
    for node in ast.walk(init):
        if isinstance(node, ast.ImportFrom) and (
            node.module == _PACKAGE or (node.level == 1 and node.module is None)
        ):
            modules += [alias.name for alias in node.names]
    index: dict[str, str] = {}
    for module in modules:
        path = directory / f"{module}.py"
        if path.is_file():
            for name in _REGISTRATION.findall(path.read_text(encoding="utf-8")):
                index.setdefault(name, module)
    return modules, index


def handler_index(directory: Path) -> dict[str, str]:
    """Command name -> the module of the commands package in `directory` registering it."""
    return scan_package(directory)[1]


def _scan() -> tuple[list[str], dict[str, str]]:
    """The command modules and the handler index, creating the package module without
    running its __init__ if nothing imported it yet."""
    with _lock:
        if not _modules:
            package = sys.modules.get(_PACKAGE)
            if package is None:
                spec = importlib.util.find_spec(_PACKAGE)
                assert spec is not None and spec.loader is not None
                package = importlib.util.module_from_spec(spec)
                sys.modules[_PACKAGE] = package
                parent, _, child = _PACKAGE.rpartition(".")
                setattr(sys.modules[parent], child, package)  # as an import would
                _deferred.append(spec)
            modules, index = scan_package(Path(package.__path__[0]))
            _modules.extend(modules)
            _index.update(index)
        return _modules, _index


def _import(module: str) -> None:
    with IMPORT_LOCK:
        importlib.import_module(f"{_PACKAGE}.{module}")


def import_handler(name: str) -> None:
    """Import the module that registers command `name` (all of them if unsure). Blocking:
    the dispatcher runs it in a worker thread."""
    module = _scan()[1].get(name)
    if module is not None:
        _import(module)
    if name not in HANDLERS:
        load_handlers()


def load_handlers() -> dict[str, Handler]:
    """Import every command module (they register themselves) and return the table."""
    modules, index = _scan()
    # Clients usually start with these: their modules go first. One module at a time, so a
    # command's own module can go in between.
    first = [index[name] for name in _CLIENTS_START_WITH if name in index]
    for module in dict.fromkeys([*first, *modules]):
        _import(module)
    with IMPORT_LOCK:  # a second caller waits until the first one ran the __init__
        with _lock:
            spec = _deferred.pop() if _deferred else None
        if spec is not None:
            assert spec.loader is not None
            try:
                spec.loader.exec_module(sys.modules[_PACKAGE])  # the __init__ deferred above
            except BaseException:
                with _lock:
                    _deferred.append(spec)  # the next call tries again (and fails alike)
                raise
        importlib.import_module(_PACKAGE)
    return HANDLERS


class Dispatcher:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.handlers = HANDLERS  # fills up as command modules are imported

    async def handler(self, name: str) -> Handler:
        """The handler of command `name`, importing its module (off the loop) if needed."""
        handler = HANDLERS.get(name)
        if handler is None:
            await asyncio.to_thread(import_handler, name)
            handler = HANDLERS.get(name)
        if handler is None:
            raise CommandNotFound(f"The command {name} has not been found")
        return handler

    async def dispatch(self, monitor: Any, name: str, arguments: dict[str, Any] | None) -> Any:
        """Run one command; returns the JSON-able `return` value or raises QmpError."""
        if name not in COMMANDS:
            raise CommandNotFound(f"The command {name} has not been found")
        handler = await self.handler(name)
        args = command_args(name, arguments)
        token = IN_COMMAND.set(True)
        try:
            result = await handler(CommandContext(self.daemon, monitor), args)
        finally:
            IN_COMMAND.reset(token)
        return {} if result is None else to_wire(result)
