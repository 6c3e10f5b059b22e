"""Every command the schema advertises has a handler, and every handler a schema entry."""

from __future__ import annotations

from storage_daemon.monitor.dispatch import load_handlers
from storage_daemon.qapi_generated.commands import COMMANDS


def test_schema_commands_and_handlers_match() -> None:
    handlers = load_handlers()
    # qmp_capabilities is protocol state: the QMP session answers it itself.
    session_commands = {"qmp_capabilities"}
    missing = sorted(set(COMMANDS) - set(handlers) - session_commands)
    assert missing == [], "commands without a handler"
    assert sorted(set(handlers) - set(COMMANDS)) == [], "handlers without a schema entry"
