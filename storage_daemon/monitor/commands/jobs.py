"""Job commands: job-*, block-job-*, query-jobs, query-block-jobs and blockdev-create.

Domain ring. job-* find any job ("Job not found"); block-job-* find only block jobs
("Block job 'x' not found", DeviceNotActive), as qsd does. State changes that qsd makes before
replying (pause, resume, cancel of a paused job, finalize, dismiss) are emitted here,
synchronously, so their events precede the reply. A verb sent while a job's transaction
is being finalized or aborted waits for its end, which qsd reaches before reading a command.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.blockdev.jobs.create import CreateJob, creator_for
from storage_daemon.blockdev.jobs.job import JobGone
from storage_daemon.errors import DeviceNotActive, QmpError
from storage_daemon.monitor.dispatch import CommandContext, command


def _wire(value: Any) -> Any:
    return getattr(value, "value", value)


# --- generic jobs -------------------------------------------------------------------------


@command("query-jobs")
async def query_jobs(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    return [job.info() for job in ctx.daemon.jobs]


@command("job-pause")
async def job_pause(ctx: CommandContext, args: Any) -> None:
    (await ctx.daemon.jobs.lookup_settled(args.id)).user_pause()


@command("job-resume")
async def job_resume(ctx: CommandContext, args: Any) -> None:
    (await ctx.daemon.jobs.lookup_settled(args.id)).user_resume()


@command("job-cancel")
async def job_cancel(ctx: CommandContext, args: Any) -> None:
    await (await ctx.daemon.jobs.lookup_settled(args.id)).user_cancel(True)


@command("job-complete")
async def job_complete(ctx: CommandContext, args: Any) -> None:
    (await ctx.daemon.jobs.lookup_settled(args.id)).user_complete()


@command("job-finalize")
async def job_finalize(ctx: CommandContext, args: Any) -> None:
    await (await ctx.daemon.jobs.lookup_settled(args.id)).user_finalize()


@command("job-dismiss")
async def job_dismiss(ctx: CommandContext, args: Any) -> None:
    (await ctx.daemon.jobs.lookup_settled(args.id)).user_dismiss()


# --- block jobs ---------------------------------------------------------------------------


@command("query-block-jobs")
async def query_block_jobs(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    return [job.block_info() for job in ctx.daemon.jobs.block_jobs()]


@command("block-job-set-speed")
async def block_job_set_speed(ctx: CommandContext, args: Any) -> None:
    (await ctx.daemon.jobs.lookup_block_job_settled(args.device)).user_set_speed(args.speed)


@command("block-job-cancel")
async def block_job_cancel(ctx: CommandContext, args: Any) -> None:
    job = await ctx.daemon.jobs.lookup_block_job_settled(args.device)
    force = bool(args.force)
    if job.user_paused and not force:
        raise QmpError(f"The block job for device '{args.device}' is currently paused")
    try:
        await job.user_cancel(force)
    except JobGone:
        raise DeviceNotActive(f"Block job '{args.device}' not found") from None


@command("block-job-pause")
async def block_job_pause(ctx: CommandContext, args: Any) -> None:
    (await ctx.daemon.jobs.lookup_block_job_settled(args.device)).user_pause()


@command("block-job-resume")
async def block_job_resume(ctx: CommandContext, args: Any) -> None:
    (await ctx.daemon.jobs.lookup_block_job_settled(args.device)).user_resume()


@command("block-job-complete")
async def block_job_complete(ctx: CommandContext, args: Any) -> None:
    (await ctx.daemon.jobs.lookup_block_job_settled(args.device)).user_complete()


@command("block-job-dismiss")
async def block_job_dismiss(ctx: CommandContext, args: Any) -> None:
    (await ctx.daemon.jobs.lookup_block_job_settled(args.id)).user_dismiss()


@command("block-job-finalize")
async def block_job_finalize(ctx: CommandContext, args: Any) -> None:
    await (await ctx.daemon.jobs.lookup_block_job_settled(args.id)).user_finalize()


# --- image creation -----------------------------------------------------------------------


@command("blockdev-create")
async def blockdev_create(ctx: CommandContext, args: Any) -> None:
    creator = creator_for(_wire(args.options.driver))
    jobs = ctx.daemon.jobs
    job = CreateJob(jobs, args.job_id, args.options, creator, ctx.daemon.graph)
    await jobs.launch(job)
