"""QMP command handlers, one module per area; importing this package registers them all."""

from storage_daemon.monitor.commands import (
    amend,
    backup,
    bitmaps,
    block,
    block_jobs,
    chardev,
    control,
    exports,
    jobs,
    mirror,
    node_admin,
    objects,
    qom,
    snapshot_internal,
    transaction,
)

__all__ = [
    "amend",
    "backup",
    "bitmaps",
    "block",
    "block_jobs",
    "chardev",
    "control",
    "exports",
    "jobs",
    "mirror",
    "node_admin",
    "objects",
    "qom",
    "snapshot_internal",
    "transaction",
]
