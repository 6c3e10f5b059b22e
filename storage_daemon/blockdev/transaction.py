"""Transactions: several graph and job actions applied all together or not at all.

Domain ring. Each action has four phases, run as qsd runs them: `prepare` for every action in
order; if one fails, `abort` for every action prepared so far *including the failing one*, in
reverse order; otherwise `commit` for all in order; then `clean` for all in order, whatever
happened. Like qsd, a transaction first drains everything (each running job pauses and
resumes), and an action may hold a drained section on a node from its `prepare` to its
`clean` (the jobs above that node stay paused meanwhile). A drained section also reaches the
drivers of the node and every node above it (`drained_begin`/`drained_end`: a throttle filter
lets its queued requests go). Invariant: `abort` and `clean` never fail and cope with a
`prepare` that stopped half-way; only `prepare` may refuse; every drained section a
transaction begins is ended before it returns, on the very drivers it began on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from storage_daemon.blockdev import io
from storage_daemon.blockdev.jobs.job import Job, JobTxn
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.driver import BlockDriver
    from storage_daemon.blockdev.node import BlockNode
    from storage_daemon.daemon import Daemon

log = logging.getLogger(__name__)

INDIVIDUAL = "individual"
GROUPED = "grouped"


def jobs_above(node: BlockNode) -> list[Job]:
    """The jobs a drain of `node` reaches, in the order QEMU's drain visits them: the node's
    parents newest first, a parent node's own parents before the next parent of `node`."""
    found: list[Job] = []
    seen: set[int] = set()

    def walk(current: BlockNode) -> None:
        for edge in list(current.parents):
            parent = edge.parent
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            parent_node = edge.parent_node
            if parent_node is not None:
                walk(parent_node)
            elif isinstance(parent, Job):
                found.append(parent)

    walk(node)
    return found


def nodes_above(node: BlockNode) -> list[BlockNode]:
    """`node` and every node above it: what QEMU's drain of `node` quiesces (its parents,
    recursively)."""
    found: list[BlockNode] = []
    seen: set[int] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        for edge in current.parents:
            parent_node = edge.parent_node
            if parent_node is not None:
                pending.append(parent_node)
    return found


def _drivers_begin(nodes: Sequence[BlockNode]) -> list[BlockDriver]:
    drivers = [node.driver for node in nodes]
    for driver in drivers:
        driver.drained_begin()
    return drivers


def _drivers_end(drivers: Sequence[BlockDriver]) -> None:
    for driver in drivers:
        driver.drained_end()


class DrainedSection:
    """QEMU's bdrv_drained_begin/end on one node: the drivers of the node and of the nodes
    above it are told, the jobs above it are paused (waited for until they park), jobs
    attached meanwhile start paused, and `end` resumes them all."""

    def __init__(self, node: BlockNode) -> None:
        self.node = node
        self.paused: list[Job] = []
        self.drivers: list[BlockDriver] = []

    async def begin(self) -> None:
        self.drivers = _drivers_begin(nodes_above(self.node))
        await io.settled(self.node)
        await self.refresh()

    async def refresh(self) -> None:
        """Pause the jobs that appeared above the node since the section began."""
        for job in jobs_above(self.node):
            if job not in self.paused:
                self.paused.append(job)
                await job.drain_pause()

    async def end(self) -> None:
        order = [job for job in jobs_above(self.node) if job in self.paused]
        order += [job for job in self.paused if job not in order]
        self.paused = []
        drivers, self.drivers = self.drivers, []
        _drivers_end(drivers)
        for job in order:
            await job.drain_resume()


async def drain_twice(node: BlockNode) -> None:
    """What qsd does to a node when a user adds a parent edge to it (blockdev-add of a node
    that names it as a child, even one that fails to attach) or removes an export's, or a job
    lets go of its own backend on it (blk_drain, then blk_remove_bs): two drained sections
    in a row, so each job above it pauses and resumes twice."""
    for _ in range(2):
        section = DrainedSection(node)
        await section.begin()
        await section.end()


def drain_all_order(daemon: Daemon) -> tuple[list[Job], list[Job]]:
    """The jobs QEMU's bdrv_drain_all reaches: (the order they pause in, the order they
    resume in). The drain visits every node in creation order and, on each, the jobs holding
    it, newest edge first; a job pauses at its first node and resumes at its last."""
    visits: list[Job] = [
        edge.parent
        for node in daemon.graph
        for edge in list(node.parents)
        if isinstance(edge.parent, Job)
    ]
    pause = list(dict.fromkeys(visits))
    resume = list(reversed(dict.fromkeys(reversed(visits))))
    return pause, resume


async def drain_all(daemon: Daemon) -> None:
    """QEMU's bdrv_drain_all at the start of a transaction: every job pauses, then each
    resumes. (QEMU asks them all, then polls; a job of ours that is busy between two of its
    pause points is waited for before the next is asked, which is what qsd shows for jobs
    that wait for their I/O outside their coroutine, as a backup does.)"""
    pause, resume = drain_all_order(daemon)
    drivers = _drivers_begin(list(daemon.graph))
    try:
        for job in pause:
            await job.drain_pause()
    finally:
        _drivers_end(drivers)
    for job in resume:
        await job.drain_resume()


@dataclass
class TransactionContext:
    """What the actions of one transaction share: the daemon, the completion mode and, when
    the mode is grouped, the JobTxn every job of the transaction joins."""

    daemon: Daemon
    completion_mode: str = INDIVIDUAL
    job_txn: JobTxn | None = None
    # The phases each action went through, in order (kept for tests and debugging).
    trace: list[tuple[str, str]] = field(default_factory=list)
    # Drained sections begun by the action being prepared (run_transaction files them).
    pending_drains: list[DrainedSection] = field(default_factory=list)

    async def drain(self, node: BlockNode) -> None:
        """Begin a drained section on `node` that lasts until the calling action's clean."""
        section = DrainedSection(node)
        self.pending_drains.append(section)
        await section.begin()


class Action:
    """One action of a transaction (QEMU's BlkActionOps). Subclasses set `kind` and override
    the phases they need; `abort` and `clean` must not raise."""

    kind: ClassVar[str] = ""
    supports_grouped: ClassVar[bool] = False

    def __init__(self, ctx: TransactionContext, data: Any) -> None:
        self.ctx = ctx
        self.data = data
        self.drains: list[DrainedSection] = []

    def check_completion_mode(self) -> None:
        """qsd's refusal of grouped completion by actions that start no job."""
        if self.ctx.completion_mode != INDIVIDUAL and not self.supports_grouped:
            raise QmpError(
                f"Action '{self.kind}' does not support Transaction property "
                f"completion-mode = {self.ctx.completion_mode}"
            )

    async def prepare(self) -> None:
        """Check and do what can be undone; raise QmpError to fail the transaction."""

    async def commit(self) -> None:
        """Make the prepared change final (every action prepared successfully)."""

    async def abort(self) -> None:
        """Undo what `prepare` did, however far it got."""

    async def clean(self) -> None:
        """Release what both outcomes leave behind."""


ACTIONS: dict[str, type[Action]] = {}


def register_action(cls: type[Action]) -> type[Action]:
    """Class decorator: make `cls` the action for `cls.kind`."""
    if not cls.kind or cls.kind in ACTIONS:
        raise RuntimeError(f"transaction action {cls.kind!r} registered twice or unnamed")
    ACTIONS[cls.kind] = cls
    return cls


def _load_actions() -> None:
    # The modules that define actions register them when imported.
    from storage_daemon.blockdev import (  # noqa: F401
        snapshot,
        snapshot_internal,
        transaction_backup,
    )
    from storage_daemon.blockdev.bitmaps import actions  # noqa: F401


def action_class(kind: str) -> type[Action]:
    if kind not in ACTIONS:
        _load_actions()
    cls = ACTIONS.get(kind)
    if cls is None:
        raise QmpError(f"Transaction action '{kind}' is not supported")
    return cls


@register_action
class AbortAction(Action):
    """Fails on purpose so that the transaction is rolled back (any completion mode)."""

    kind = "abort"

    async def prepare(self) -> None:
        raise QmpError("Transaction aborted using Abort action")


async def _quietly(phase: Callable[[], Any], what: str) -> None:
    try:
        await phase()
    except Exception:  # an undo that fails must not hide the error being reported
        log.exception("transaction: %s failed", what)


async def run_transaction(
    daemon: Daemon,
    actions: Sequence[tuple[str, Any]],
    completion_mode: str = INDIVIDUAL,
    *,
    ctx: TransactionContext | None = None,
) -> None:
    """Run (kind, data) actions as one transaction; raises the failing action's QmpError."""
    if ctx is None:
        ctx = TransactionContext(daemon, completion_mode)
    if ctx.completion_mode != INDIVIDUAL and ctx.job_txn is None:
        ctx.job_txn = JobTxn()
    states: list[Action] = []
    await drain_all(daemon)
    try:
        try:
            for kind, data in actions:
                state = action_class(kind)(ctx, data)
                states.append(state)
                ctx.trace.append(("prepare", kind))
                try:
                    await state.prepare()
                finally:
                    state.drains += ctx.pending_drains
                    ctx.pending_drains = []
                # Jobs the action attached under drained nodes start paused.
                for earlier in states:
                    for section in earlier.drains:
                        await section.refresh()
        except BaseException:
            for state in reversed(states):
                ctx.trace.append(("abort", state.kind))
                await _quietly(state.abort, f"abort of {state.kind}")
            raise
        for state in states:
            ctx.trace.append(("commit", state.kind))
            await _quietly(state.commit, f"commit of {state.kind}")
    finally:
        for state in states:
            ctx.trace.append(("clean", state.kind))
            await _quietly(state.clean, f"clean of {state.kind}")
            for section in state.drains:
                await section.end()
            state.drains = []


def action_list(actions: Sequence[Any]) -> list[tuple[str, Any]]:
    """The generated TransactionAction models as (kind, data) pairs."""
    return [(getattr(a.type, "value", a.type), a.data) for a in actions]


__all__ = [
    "ACTIONS",
    "GROUPED",
    "INDIVIDUAL",
    "AbortAction",
    "Action",
    "DrainedSection",
    "TransactionContext",
    "action_class",
    "action_list",
    "drain_all",
    "jobs_above",
    "nodes_above",
    "register_action",
    "run_transaction",
]
