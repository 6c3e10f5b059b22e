"""Block jobs: jobs that hold block nodes (stream, commit, mirror, backup).

Domain ring. A block job is a parent of every node it touches, through graph edges carrying
real permissions, so it takes part in permission checks and conflict messages name it as qsd
does ("stream job 's0' (uses node 'base' as 'intermediate node' child)"). It adds the
BLOCK_JOB_* events, the `query-block-jobs` entry, speed and the on-error policies.
Invariant: every edge the job holds is in `self.edges` and is detached when the job goes away.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.jobs.fsm import READY_STATES
from storage_daemon.blockdev.jobs.job import Job, JobTxn
from storage_daemon.blockdev.perm import PERM_ALL, PERM_NONE, Perm

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph
    from storage_daemon.blockdev.jobs.manager import JobManager
    from storage_daemon.blockdev.node import BlockNode

# BlockdevOnError values -> what to do about an error (BlockErrorAction).
ON_ERROR_POLICIES = ("report", "ignore", "enospc", "stop", "auto")


class BlockJob(Job):
    """A job on block nodes. The first node (`main_node`) is held as "main node" with
    `perm`/`shared`, as QEMU's block_job_create does; subclasses add more with `add_node()`.

    If anything fails after the job was created (a permission conflict, a bad speed), the
    constructor reports CREATED -> NULL and raises the error, as qsd does."""

    def __init__(
        self,
        manager: JobManager,
        job_id: str | None,
        graph: BlockGraph,
        main_node: BlockNode,
        *,
        perm: Perm = PERM_NONE,
        shared: Perm = PERM_ALL,
        speed: int = 0,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        txn: JobTxn | None = None,
    ) -> None:
        # qsd: without a job-id the id is the node's device name, which qsd nodes never have.
        super().__init__(
            manager,
            "" if job_id is None else job_id,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
            txn=txn,
        )
        self.graph = graph
        self.edges: list[BdrvChild] = []
        self.io_status = "ok"  # BlockDeviceIoStatus
        try:
            self.add_node("main node", main_node, perm, shared)
            self.set_speed(speed)
        except BaseException:
            self.early_fail()
            raise

    # --- nodes --------------------------------------------------------------------------

    def parent_description(self, child: BdrvChild) -> str:
        return (
            f"{self.job_type} job '{self.id}' "
            f"(uses node '{child.node.name}' as '{child.name}' child)"
        )

    def add_node(self, name: str, node: BlockNode, perm: Perm, shared: Perm) -> BdrvChild:
        """Hold `node` as child `name`; QmpError (qsd's conflict text) if others disagree."""
        edge = self.graph.attach(self, node, name, ChildRole(0), perm, shared)
        self.edges.append(edge)
        return edge

    def set_node_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> None:
        self.graph.set_edge_perm(edge, perm, shared)

    def remove_node(self, edge: BdrvChild) -> None:
        if edge in self.edges:
            self.edges.remove(edge)
            self.graph.detach(edge)

    def remove_all_nodes(self) -> None:
        """Drop every node but the main one (QEMU keeps that until the job is freed)."""
        for edge in list(self.edges[1:]):
            self.remove_node(edge)

    def release(self) -> None:
        for edge in reversed(list(self.edges)):
            self.remove_node(edge)

    # --- errors -------------------------------------------------------------------------

    def error_action(self, on_error: str, is_read: bool, err: int) -> str:
        """Apply an on-error policy to an I/O error (errno `err`); emit BLOCK_JOB_ERROR.

        Returns the BlockErrorAction: "report" (fail the job), "ignore" (carry on) or "stop"
        (the job is now user-paused until block-job-resume/job-resume; the caller should
        retry after its next pause point)."""
        if on_error in ("enospc", "auto"):
            action = "stop" if err == errno.ENOSPC else "report"
        elif on_error in ("stop", "report", "ignore"):
            action = on_error
        else:
            raise ValueError(f"unknown on-error policy {on_error!r}")
        self.manager.emit(
            "BLOCK_JOB_ERROR",
            {"device": self.id, "operation": "read" if is_read else "write", "action": action},
        )
        if action == "stop":
            if not self.user_paused:
                self.pause()
                self.user_paused = True  # visible to the user, who resumes it
            if self.io_status == "ok":
                self.io_status = "nospace" if err == errno.ENOSPC else "failed"
        return action

    def user_resume_hook(self) -> None:
        self.io_status = "ok"

    # --- events and queries -------------------------------------------------------------

    def _event_data(self) -> dict[str, Any]:
        return {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "speed": self.speed,
        }

    def event_ready(self) -> None:
        self.manager.emit("BLOCK_JOB_READY", self._event_data())

    def event_pending(self) -> None:
        self.manager.emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def event_completed(self) -> None:
        data = self._event_data()
        if self.failed:
            data["error"] = self.error
        self.manager.emit("BLOCK_JOB_COMPLETED", data)

    def event_cancelled(self) -> None:
        self.manager.emit("BLOCK_JOB_CANCELLED", self._event_data())

    def query_paused(self) -> bool:
        """query-block-jobs' `paused`: QEMU shows the pause counter, which drains raise too."""
        return self.pause_count > 0

    def block_info(self) -> dict[str, Any]:
        """A query-block-jobs entry (BlockJobInfo)."""
        entry: dict[str, Any] = {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.query_paused(),
            "speed": self.speed,
            "io-status": self.io_status,
            "ready": self.status in READY_STATES,
            "status": self.status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.failed:
            entry["error"] = self.error
        return entry
