"""QMP command handlers, one module per area; importing this package registers them all."""

from storage_daemon.monitor.commands import block, chardev, control, exports, jobs, objects

__all__ = ["block", "chardev", "control", "exports", "jobs", "objects"]
