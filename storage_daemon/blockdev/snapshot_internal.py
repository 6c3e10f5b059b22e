"""Internal snapshots of a node: the blockdev-snapshot-internal-sync transaction action and
the deletion behind blockdev-snapshot-delete-internal-sync (their QMP handlers are in
monitor/commands/snapshot_internal.py).

Domain ring. Checks run in qsd's order with qsd's texts; the image work is in
drivers/qcow2/snapshot_internal.py, run under the driver's metadata lock with no write in
flight. Invariant: a prepared snapshot that the transaction aborts is deleted again.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2 import snapshot_internal as snap_ops
from storage_daemon.blockdev.drivers.qcow2.driver import Qcow2Driver
from storage_daemon.blockdev.graph import check_not_blocked
from storage_daemon.blockdev.jobs.mirror import root_node
from storage_daemon.blockdev.transaction import Action, DrainedSection, register_action
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph
    from storage_daemon.blockdev.node import BlockNode

ACTION = "blockdev-snapshot-internal-sync"


async def _locked(driver: Qcow2Driver, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run `work` as the driver runs a metadata change: under its lock, once no write is in
    flight anywhere on the image (corruption found on the way fences the node)."""
    result: list[Any] = []

    async def op(_writer: Any) -> None:
        result.append(await work())

    await driver._run_write(op, False)
    return result[0]


def snapshot_driver(node: BlockNode) -> Qcow2Driver | None:
    """The qcow2 driver that takes `node`'s internal snapshots: its own, or, as qsd falls
    back for drivers without snapshots (filters, raw), its primary child's when no other
    child holds data, metadata or filtered data; None when there is none."""
    from storage_daemon.blockdev.child import ChildRole

    holds = ChildRole.DATA | ChildRole.METADATA | ChildRole.FILTERED
    current: BlockNode | None = node
    while current is not None:
        driver = current.driver
        if isinstance(driver, Qcow2Driver):
            return driver
        primary = current.primary
        if primary is None or any(
            edge is not primary and edge.role & holds for edge in current.children
        ):
            return None
        current = primary.node
    return None


def _errno_text(err: OSError) -> str:
    code = err.errno or errno.EIO
    return os.strerror(code)


@register_action
class InternalSnapshotAction(Action):
    """QEMU's internal_snapshot_* phases: the snapshot is made in prepare, deleted on abort."""

    kind = ACTION

    def __init__(self, ctx: Any, data: Any) -> None:
        super().__init__(ctx, data)
        self.driver: Qcow2Driver | None = None
        self.created: fmt.Snapshot | None = None

    async def prepare(self) -> None:
        self.check_completion_mode()
        device: str = self.data.device
        name: str = self.data.name
        node = root_node(self.ctx.daemon.graph, device)
        await self.ctx.drain(node)
        check_not_blocked(node)
        if node.read_only:
            raise QmpError(f"Device '{device}' is read only")
        driver = snapshot_driver(node)
        if driver is None:
            raise QmpError(
                f"Block format '{node.driver.format_name()}' used by device '{device}' "
                "does not support internal snapshots"
            )
        if not name:
            raise QmpError("Name is empty")
        if snap_ops.find(driver, None, name) is not None:
            raise QmpError(f"Snapshot with name '{name}' already exists on device '{device}'")
        now = self.ctx.daemon.clock.realtime_ns()
        try:
            self.created = await _locked(driver, lambda: snap_ops.create(driver, name, now))
        except OSError as err:
            raise QmpError(
                f"Failed to create snapshot '{name}' on device '{device}': {_errno_text(err)}"
            ) from err
        self.driver = driver

    async def abort(self) -> None:
        driver, created = self.driver, self.created
        if driver is None or created is None:
            return
        self.created = None
        try:
            await _locked(driver, lambda: snap_ops.delete(driver, created))
        except (OSError, QmpError):
            pass  # qsd reports this on stderr only; the image keeps the snapshot


async def delete_internal(
    graph: BlockGraph, device: str, sid: str | None, name: str | None
) -> dict[str, object]:
    """blockdev-snapshot-delete-internal-sync: the deleted snapshot's SnapshotInfo."""
    node = root_node(graph, device)
    if sid is None and name is None:
        raise QmpError("Name or id must be provided")
    check_not_blocked(node)
    driver = snapshot_driver(node)
    if driver is None:
        raise QmpError("Failed to get a snapshot list: Operation not supported")
    found = snap_ops.find(driver, sid, name)
    if found is None:
        raise QmpError(
            f"Snapshot with id '{'null' if sid is None else sid}' and name "
            f"'{'null' if name is None else name}' does not exist on device '{device}'"
        )
    if node.read_only:
        raise QmpError("Failed to remove snapshot from snapshot list: " + os.strerror(errno.EPERM))
    section = DrainedSection(node)
    await section.begin()
    try:
        await _locked(driver, lambda: snap_ops.delete(driver, found))
    except OSError as err:
        raise QmpError(str(err.strerror or _errno_text(err))) from err
    finally:
        await section.end()
    return found.info()


__all__ = ["ACTION", "InternalSnapshotAction", "delete_internal", "snapshot_driver"]
