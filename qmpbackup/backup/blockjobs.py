"""QEMU's side of a push backup: NBD target nodes, the jobs, waiting for them, tearing down.

Every node and job is written to the journal before QEMU is asked to create it,
and every teardown step here is safe to run twice (it asks QEMU first), so the
same steps serve a normal end, an error, a signal and the replay of a crashed
run's journal.

Bandwidth: vzdump's ``bwlimit`` is a limit for the whole backup. All drive jobs
start together (one ``transaction``, one point in time) and share it: each gets
``limit / running jobs``, re-divided whenever a job finishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmpbackup.errors import QmpBackupError
from qmpbackup.qemu import naming
from qmpbackup.qemu.capabilities import Capabilities
from qmpbackup.qemu.errors import QmpCommandError, QmpTimeoutError
from qmpbackup.qemu.nodes import (
    CANCEL_TIMEOUT_S,
    cancel_job,
    delete_node,
    job_states,
)
from qmpbackup.qemu.session import QmpSession
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Entry, Journal

log = logging.getLogger(__name__)

JOB_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "JOB_STATUS_CHANGE")
#: How often job progress is polled (vzdump polls query-backup every second).
POLL_INTERVAL_S = 1.0



class BlockJobError(QmpBackupError):
    """A drive's backup job failed or was cancelled by QEMU; ``error`` is QEMU's own text."""

    def __init__(self, job_id: str, error: str) -> None:
        self.job_id = job_id
        self.error = error
        super().__init__(f"backup job {job_id} failed: {error}")


@dataclass(frozen=True, slots=True)
class DriveJob:
    """One drive's job: QEMU reads ``source_node`` and writes into ``target_node``."""

    key: str
    source_node: str
    target_node: str
    job_id: str
    export: str
    size: int


def plan_jobs(vmid: int, sources: Sequence[tuple[str, str, int]]) -> list[DriveJob]:
    """Names for each ``(key, source node, size)``; the names come from :mod:`qmpbackup.qemu.naming`."""
    return [
        DriveJob(
            key=key,
            source_node=node,
            target_node=naming.node_name(vmid, key, naming.ROLE_TARGET),
            job_id=naming.job_id(vmid, key),
            export=naming.export_name(vmid, key),
            size=size,
        )
        for key, node, size in sources
    ]


async def _set_speed(session: QmpSession, job_id: str, speed: int) -> None:
    """A job that concluded meanwhile (its event not yet handled) needs no new speed."""
    try:
        await session.execute("block-job-set-speed", {"device": job_id, "speed": speed})
    except QmpCommandError:
        if (await job_states(session)).get(job_id, {}).get("status") not in (None, "concluded", "null"):
            raise


async def attach_targets(session: QmpSession, journal: Journal, jobs: Sequence[DriveJob], socket: Path,
                         caps: Capabilities) -> None:
    """Add one NBD client node per drive, pointing at our endpoint's export for it."""
    for job in jobs:
        entry = journal.record(kinds.BLOCKDEV, node=job.target_node)
        args: dict[str, Any] = {
            "driver": "nbd",
            "node-name": job.target_node,
            "server": {"type": "unix", "path": str(socket)},
            "export": job.export,
        }
        try:
            await session.execute("blockdev-add", args)
        except QmpCommandError:
            journal.resolve(entry)  # QEMU said no: nothing was created
            raise


async def detach_targets(session: QmpSession, journal: Journal, jobs: Sequence[DriveJob]) -> None:
    """Delete the NBD client nodes; QEMU sends FLUSH and DISC to our endpoint on the way."""
    pending = {str(e.data.get("node")): e for e in journal.pending() if e.kind == kinds.BLOCKDEV.name}
    for job in reversed(jobs):
        await delete_node(session, job.target_node)
        if job.target_node in pending:
            journal.resolve(pending[job.target_node])


def backup_action(job: DriveJob, caps: Capabilities, *, speed: int, max_workers: int | None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "job-id": job.job_id,
        "device": job.source_node,
        "target": job.target_node,
        "sync": "full",
        "speed": speed,
        "on-source-error": "report",
        "on-target-error": "report",
        "auto-dismiss": False,
    }
    if max_workers and caps.has_backup_x_perf:
        data["x-perf"] = {"max-workers": max_workers}
    for key, value in (extra or {}).items():
        if key == "x-perf":  # merged: fleecing adds min-cluster-size beside max-workers
            data["x-perf"] = {**data.get("x-perf", {}), **value}
        else:
            data[key] = value
    return {"type": "blockdev-backup", "data": data}


def share(limit_bps: int, running: int) -> int:
    """Each running job's ``speed``: an equal share of the limit (0 means unlimited)."""
    if limit_bps <= 0 or running <= 0:
        return 0
    return max(1, limit_bps // running)


@dataclass(slots=True)
class JobProgress:
    """Bytes QEMU reports as done per job (``offset`` of ``query-block-jobs``)."""

    done: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    @property
    def bytes_done(self) -> int:
        return sum(self.done.values())


async def run_jobs(
    session: QmpSession,
    journal: Journal,
    jobs: Sequence[DriveJob],
    caps: Capabilities,
    *,
    limit_bps: int,
    max_workers: int | None,
    start_window: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]],
    failure: Callable[[], Awaitable[QmpBackupError]],
    on_progress: Callable[[JobProgress], None],
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    actions: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Start every drive's job in one transaction and wait until all have completed.

    ``start_window(start)`` runs ``start`` inside the freeze/pause window (it freezes,
    awaits ``start``, thaws). ``failure()`` resolves when the data path fails (our NBD
    endpoint saw a protocol error or a point-in-time violation); the jobs are then
    cancelled and that error raised. Any exception, including cancellation, cancels
    the jobs that are still running before it propagates. ``extra`` adds job arguments per
    drive key (e.g. an incremental ``sync``); ``actions`` go into the same transaction before
    the jobs (e.g. ``block-dirty-bitmap-add``, so a new bitmap starts exactly with the jobs).
    """
    progress = JobProgress(total={j.job_id: j.size for j in jobs})
    remaining = {j.job_id for j in jobs}
    speed = share(limit_bps, len(jobs))
    entries = {}
    async with session.events(JOB_EVENTS) as events:

        async def start() -> None:
            for job in jobs:
                entries[job.job_id] = journal.record(kinds.BLOCKJOB, job=job.job_id)
            all_actions = [dict(a) for a in actions]
            all_actions += [backup_action(j, caps, speed=speed, max_workers=max_workers,
                                          extra=(extra or {}).get(j.key)) for j in jobs]
            props = {"completion-mode": "individual"} if caps.has_transaction_completion_mode else None
            args: dict[str, Any] = {"actions": all_actions}
            if props:
                args["properties"] = props
            try:
                await session.execute("transaction", args)
            except QmpCommandError:
                for entry in entries.values():
                    journal.resolve(entry)  # a transaction is all or nothing
                raise

        await start_window(start)
        failure_task = asyncio.ensure_future(failure())
        try:
            while remaining:
                # Events only wake us up; query-jobs is the truth (an event can be missed,
                # a concluded job stays listed until we dismiss it).
                try:
                    await events.wait_for(lambda e: True, POLL_INTERVAL_S)
                except QmpTimeoutError:
                    pass
                if failure_task.done():
                    raise failure_task.result()
                states = await job_states(session)
                for job_id in sorted(remaining):
                    job = states.get(job_id)
                    if job is None:
                        raise BlockJobError(job_id, "it disappeared from QEMU")
                    progress.done[job_id] = int(job.get("current-progress", 0))
                    progress.total[job_id] = int(job.get("total-progress", 0)) or progress.total[job_id]
                    if job.get("status") != "concluded":
                        continue
                    error = job.get("error")
                    await session.execute("job-dismiss", {"id": job_id})
                    remaining.discard(job_id)
                    journal.resolve(entries[job_id])
                    if error:
                        raise BlockJobError(job_id, str(error))
                    progress.done[job_id] = progress.total[job_id]
                    if remaining and limit_bps > 0:
                        new_speed = share(limit_bps, len(remaining))
                        for other in sorted(remaining):
                            await _set_speed(session, other, new_speed)
                on_progress(progress)
        except BaseException:
            await _cancel_all(session, journal, entries, remaining)
            raise
        finally:
            failure_task.cancel()
            await asyncio.gather(failure_task, return_exceptions=True)


async def _cancel_all(session: QmpSession, journal: Journal, entries: Mapping[str, Entry],
                      remaining: set[str]) -> None:
    """Best effort, shielded from a second cancellation: a job must not outlive the run."""

    async def cancel() -> None:
        for job_id in sorted(remaining):
            try:
                await cancel_job(session, job_id)
            except Exception as exc:
                log.warning("could not cancel backup job %s: %s", job_id, exc)
                continue
            if job_id in entries:
                journal.resolve(entries[job_id])

    task = asyncio.ensure_future(cancel())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait_for(task, CANCEL_TIMEOUT_S + 5)
        raise
