"""QMP command handlers, one module per area; importing this package registers them all."""

from storage_daemon.monitor.commands import (
    block,
    block_jobs,
    chardev,
    control,
    exports,
    jobs,
    objects,
    qom,
)

__all__ = ["block", "block_jobs", "chardev", "control", "exports", "jobs", "objects", "qom"]
