"""QMP command handlers, one module per area; importing this package registers them all."""

from storage_daemon.monitor.commands import block, control, objects

__all__ = ["block", "control", "objects"]
