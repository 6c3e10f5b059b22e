"""x-blockdev-amend as a job of type "amend": changing an open image's format options.

Domain ring. Drivers that can amend register a function in `AMENDERS` under their
BlockdevDriver name; this module registers qcow2's. Invariant: the checks that qsd makes
before creating the job (`check_amend`) raise in qsd's order with its texts; the job itself
goes 0/1 -> 1/1 without waiting, so that (as on qsd) its whole life, up to CONCLUDED, is
over before the command replies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev.jobs.job import Job
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.jobs.manager import JobManager
    from storage_daemon.blockdev.node import BlockNode

#: (node, typed BlockdevAmendOptions, force) -> None; raises QmpError with qsd's text.
Amender = Callable[["BlockNode", Any, bool], None]

AMENDERS: dict[str, Amender] = {}


def register_amender(driver: str, amender: Amender) -> None:
    AMENDERS[driver] = amender


def _wire(value: Any) -> Any:
    return getattr(value, "value", value)


def check_amend(node: BlockNode, options: Any) -> Amender:
    """qsd's checks before the job exists: the driver named must be the node's, and that
    driver must support amending."""
    if _wire(options.driver) != node.driver.name:
        raise QmpError("x-blockdev-amend doesn't support changing the block driver")
    amender = AMENDERS.get(node.driver.name)
    if amender is None:
        raise QmpError("Driver does not support x-blockdev-amend")
    return amender


class AmendJob(Job):
    """x-blockdev-amend: auto-finalized, never auto-dismissed (job-dismiss needed), as qsd."""

    job_type = "amend"

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        node: BlockNode,
        options: Any,
        amender: Amender,
        force: bool = False,
    ) -> None:
        self.node = node
        self.options = options
        self.amender = amender
        self.force = force
        super().__init__(manager, job_id, auto_finalize=True, auto_dismiss=False)
        node.held += 1  # as qsd: blockdev-del refuses the node until the job is dismissed

    def release(self) -> None:
        self.node.held -= 1

    async def run(self) -> None:
        self.progress_set_remaining(1)
        try:
            self.amender(self.node, self.options, self.force)
        finally:
            self.progress_update(1)


def amend_qcow2(node: BlockNode, options: Any, force: bool) -> None:
    """qcow2's amend: only the encryption can change, and no image this daemon opens is
    encrypted, so naming `encrypt` always fails with qsd's text; otherwise nothing to do."""
    if options.encrypt is not None:
        raise QmpError("image is not encrypted, can't amend")


register_amender("qcow2", amend_qcow2)
