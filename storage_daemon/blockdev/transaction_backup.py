"""The backup actions of a transaction: blockdev-backup and drive-backup.

Domain ring. As in qsd, `prepare` drains the source (until the action's clean, so the new job
starts paused and resumes then, and the jobs above the source pause meanwhile), creates the
job (and lets it set up: it checks its arguments and takes its nodes) without starting it;
`commit` starts it; `abort` cancels it, so a job of a failed transaction ends without having
copied anything. In grouped completion mode every job joins the transaction's JobTxn.
Invariant: a job is started only by `commit`.
"""

from __future__ import annotations

import importlib
from typing import Any

from storage_daemon.blockdev.jobs.job import Job, JobTxn
from storage_daemon.blockdev.transaction import Action, register_action
from storage_daemon.errors import QmpError

_BACKUP_MODULE = "storage_daemon.blockdev.jobs.backup"


def _factory(*names: str) -> Any:
    """The backup module's job class (or factory) for an action, imported when first used."""
    try:
        module = importlib.import_module(_BACKUP_MODULE)
    except ImportError:
        module = None
    for name in names:
        found = getattr(module, name, None)
        if found is not None:
            return found
    raise QmpError("Backup jobs are not available in this daemon")


class _BackupAction(Action):
    supports_grouped = True
    factory_names: tuple[str, ...] = ()

    def __init__(self, ctx: Any, data: Any) -> None:
        super().__init__(ctx, data)
        self.job: Job | None = None

    async def prepare(self) -> None:
        make = _factory(*self.factory_names)
        source = self.ctx.daemon.graph.find(self.data.device)
        if source is not None:
            await self.ctx.drain(source)
        job: Job = make(self.ctx.daemon, self.data, txn=self.ctx.job_txn)
        try:
            await job.setup()
        except BaseException:
            job.early_fail()
            raise
        self.job = job

    async def commit(self) -> None:
        if self.job is not None:
            await self.job.start()

    async def abort(self) -> None:
        job, self.job = self.job, None
        if job is None or job.started:
            return
        if len(job.txn.jobs) > 1:
            # A grouped JobTxn would wait for its other never-started jobs to finish, which
            # they never do (qsd 7.2 hangs right here): each job is cancelled on its own.
            job.txn.jobs.remove(job)
            JobTxn().add(job)
        await job.cancel(True)


@register_action
class BlockdevBackupAction(_BackupAction):
    kind = "blockdev-backup"
    factory_names = ("BackupJob",)


@register_action
class DriveBackupAction(_BackupAction):
    kind = "drive-backup"
    factory_names = ("DriveBackupJob", "drive_backup_job")


__all__ = ["BlockdevBackupAction", "DriveBackupAction"]
