"""QEMU's side of a push backup: NBD target nodes, the block jobs, waiting for them, tearing down.

"Block job" is QEMU's ``blockdev-backup`` job of one drive; "job" alone, elsewhere, is the
backup job of :mod:`qmpbackup.jobs` (many guests, one lock, one mail).

Every node and block job is written to the journal before QEMU is asked to create it,
and every teardown step here is safe to run twice (it asks QEMU first), so the
same steps serve a normal end, an error, a signal and the replay of a crashed
run's journal.

The target of each block job is a qcow2 node whose external data file (``data-file-raw``) is
the NBD client node on our export, with its small metadata image in the run folder. Why not
the NBD node itself: QEMU's block-copy asks its target for a cluster size and, as an NBD
node cannot say, warns on every backup that "the backup may be unusable". The qcow2 node
says 64 KiB (VMA's cluster and QEMU's default, so the job copies as before), and passes
every write at the same offset, and every zero write as a zero write (``data-file-raw``
keeps the data file a plain image), through to our export; only its metadata image sees
the rest. That image maps the whole disk from the start (qemu-img enforces this for a raw
data file): 128 MiB per TiB of disk, written when the run starts, removed with the run folder.

Bandwidth: vzdump's ``bwlimit`` is a limit for the whole backup. All block jobs
start together (one ``transaction``, one point in time) and share it: each gets
``limit / running jobs``, re-divided whenever a job finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from qmpbackup.errors import QmpBackupError
from qmpbackup.qemu import naming
from qmpbackup.qemu_img import failure_detail, run_qemu_img
from qmpbackup.qemu.capabilities import Capabilities
from qmpbackup.qemu.errors import QmpCommandError, QmpTimeoutError
from qmpbackup.qemu.nodes import (
    CANCEL_TIMEOUT_S,
    add_node,
    cancel_job,
    delete_node,
    job_states,
)
from qmpbackup.qemu.session import EventWaiter, QmpSession
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Entry, Journal

log = logging.getLogger(__name__)

JOB_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "JOB_STATUS_CHANGE")
#: How often job progress is polled (vzdump polls query-backup every second).
POLL_INTERVAL_S = 1.0
#: Cluster size of the target's qcow2 image: what QEMU's block-copy copies in (VMA's cluster).
TARGET_CLUSTER = 64 * 1024



class BlockJobError(QmpBackupError):
    """A drive's block job failed or was cancelled by QEMU; ``error`` is QEMU's own text."""

    def __init__(self, job_id: str, key: str, error: str) -> None:
        self.job_id = job_id
        self.key = key
        self.error = error
        super().__init__(f"backup job {job_id} failed: {error}")


@dataclass(frozen=True, slots=True)
class BlockJob:
    """One drive's block job: QEMU reads ``source_node`` and writes into ``target_node`` (qcow2),
    whose data file is ``data_node`` (NBD, on our ``export``) and whose metadata is on ``meta_node``."""

    key: str
    source_node: str
    target_node: str
    job_id: str
    export: str
    size: int
    data_node: str
    meta_node: str

    @property
    def target_nodes(self) -> tuple[str, str, str]:
        """The nodes :func:`attach_targets` adds, users first (the order they are deleted in)."""
        return self.target_node, self.meta_node, self.data_node


def plan_block_jobs(vmid: int, sources: Sequence[tuple[str, str, int]]) -> list[BlockJob]:
    """Names for each ``(key, source node, size)``; the names come from :mod:`qmpbackup.qemu.naming`."""
    return [
        BlockJob(
            key=key,
            source_node=node,
            target_node=naming.node_name(vmid, key, naming.ROLE_TARGET),
            job_id=naming.job_id(vmid, key),
            export=naming.export_name(vmid, key),
            size=size,
            data_node=naming.node_name(vmid, key, naming.ROLE_TARGET_DATA),
            meta_node=naming.node_name(vmid, key, naming.ROLE_TARGET_META),
        )
        for key, node, size in sources
    ]


async def _set_speed(session: QmpSession, job_id: str, speed: int) -> None:
    """A block job that concluded meanwhile (its event not yet handled) needs no new speed."""
    try:
        await session.execute("block-job-set-speed", {"device": job_id, "speed": speed})
    except QmpCommandError:
        if (await job_states(session)).get(job_id, {}).get("status") not in (None, "concluded", "null"):
            raise


class TargetError(QmpBackupError):
    """The target's metadata image could not be made, or a target node's name is taken in QEMU."""


def create_target_metadata(path: Path, size: int) -> None:
    """The qcow2 metadata image of a target of ``size`` bytes whose data file is raw (see the module
    docstring). qemu-img wants a data file to size: a sparse placeholder, removed again at once."""
    placeholder = path.with_name(f"{path.name}.data")
    options = f"data_file={str(placeholder).replace(',', ',,')},data_file_raw=on,cluster_size={TARGET_CLUSTER}"
    try:
        proc = run_qemu_img(["create", "-q", "-f", "qcow2", "-o", options, str(path), str(size)],
                            timeout=max(120.0, size / (8 << 30)), what=f"creating {path}", error=TargetError)
    finally:
        placeholder.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise TargetError(f"creating {path}: {failure_detail(proc)}")


async def attach_targets(session: QmpSession, journal: Journal, jobs: Sequence[BlockJob], socket: Path,
                         caps: Capabilities) -> None:
    """Per drive: an NBD client node on our endpoint's export for it, and the qcow2 node above it
    that the block job writes into; the metadata images go beside ``socket`` (the run folder)."""
    for job in jobs:
        metadata = socket.parent / f"{job.key}.qcow2"
        await asyncio.to_thread(create_target_metadata, metadata, job.size)
        for args in ({"driver": "nbd", "node-name": job.data_node,
                      "server": {"type": "unix", "path": str(socket)}, "export": job.export},
                     {"driver": "file", "node-name": job.meta_node, "filename": str(metadata)},
                     {"driver": "qcow2", "node-name": job.target_node, "file": job.meta_node,
                      "data-file": job.data_node}):
            await add_node(session, journal, args, error=TargetError)


async def detach_targets(session: QmpSession, journal: Journal, jobs: Sequence[BlockJob]) -> None:
    """Delete the target nodes; QEMU flushes the qcow2 node, then sends FLUSH and DISC to our endpoint."""
    pending = {str(e.data.get("node")): e for e in journal.pending() if e.kind == kinds.BLOCKDEV.name}
    for job in reversed(jobs):
        for node in job.target_nodes:
            await delete_node(session, node)
            if node in pending:
                journal.resolve(pending[node])


def backup_action(job: BlockJob, caps: Capabilities, *, speed: int, max_workers: int | None,
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
    """Each running block job's ``speed``: an equal share of the limit (0 means unlimited)."""
    if limit_bps <= 0 or running <= 0:
        return 0
    return max(1, limit_bps // running)


@dataclass(slots=True)
class BlockJobProgress:
    """Bytes QEMU reports as done per block job (``current-progress`` of ``query-jobs``)."""

    done: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    @property
    def bytes_done(self) -> int:
        return sum(self.done.values())


class BlockJobs:
    """The block jobs of one backup: :meth:`start` them in one transaction, then :meth:`progress`.

    Use as ``async with BlockJobs(...) as block_jobs``: entering registers for the job
    events *before* the transaction (none is missed); leaving with an exception, including
    a cancellation, cancels every block job that is still running (shielded from a second
    cancellation: a block job must not outlive the run).
    """

    def __init__(self, session: QmpSession, journal: Journal, jobs: Sequence[BlockJob], caps: Capabilities, *,
                 limit_bps: int, max_workers: int | None) -> None:
        self.session, self.journal, self.jobs, self.caps = session, journal, list(jobs), caps
        self.limit_bps = limit_bps
        self.max_workers = max_workers
        self._remaining = {j.job_id for j in jobs}
        self._entries: dict[str, Entry] = {}
        self._events: EventWaiter | None = None
        self._listening: contextlib.AbstractAsyncContextManager[EventWaiter] | None = None

    async def __aenter__(self) -> BlockJobs:
        self._listening = self.session.events(JOB_EVENTS)
        self._events = await self._listening.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if exc is not None:
                await self._cancel_remaining()
        finally:
            assert self._listening is not None
            await self._listening.__aexit__(None, None, None)

    async def start(self, actions: Sequence[Mapping[str, Any]] = (),
                    job_args: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """One ``transaction``: ``actions`` first (e.g. ``block-dirty-bitmap-add``, so a new bitmap
        starts exactly with the block jobs), then every drive's ``blockdev-backup`` with its
        extra arguments from ``job_args`` (by drive key)."""
        speed = share(self.limit_bps, len(self.jobs))
        for job in self.jobs:
            self._entries[job.job_id] = self.journal.record(kinds.BLOCKJOB, job=job.job_id)
        all_actions = [dict(a) for a in actions]
        all_actions += [backup_action(j, self.caps, speed=speed, max_workers=self.max_workers,
                                      extra=(job_args or {}).get(j.key)) for j in self.jobs]
        args: dict[str, Any] = {"actions": all_actions}
        if self.caps.has_transaction_completion_mode:
            args["properties"] = {"completion-mode": "individual"}
        try:
            await self.session.execute("transaction", args)
        except QmpCommandError:
            for entry in self._entries.values():
                self.journal.resolve(entry)  # a transaction is all or nothing
            self._entries.clear()
            raise

    async def progress(self) -> AsyncIterator[BlockJobProgress]:
        """Yields the progress after every look (at least once a second) until all concluded.

        Raises :class:`BlockJobError` for the first block job that failed or vanished. The
        caller checks its own side between looks (and raises to stop the block jobs).
        """
        assert self._events is not None, "use BlockJobs as an async context manager"
        progress = BlockJobProgress(total={j.job_id: j.size for j in self.jobs})
        keys = {j.job_id: j.key for j in self.jobs}
        while self._remaining:
            # Events only wake us up; query-jobs is the truth (an event can be missed,
            # a concluded job stays listed until we dismiss it).
            try:
                await self._events.wait_for(lambda e: True, POLL_INTERVAL_S)
            except QmpTimeoutError:
                pass
            states = await job_states(self.session)
            for job_id in sorted(self._remaining):
                job = states.get(job_id)
                if job is None:
                    raise BlockJobError(job_id, keys[job_id], "it disappeared from QEMU")
                progress.done[job_id] = int(job.get("current-progress", 0))
                progress.total[job_id] = int(job.get("total-progress", 0)) or progress.total[job_id]
                if job.get("status") != "concluded":
                    continue
                error = job.get("error")
                await self.session.execute("job-dismiss", {"id": job_id})
                self._remaining.discard(job_id)
                self.journal.resolve(self._entries[job_id])
                if error:
                    raise BlockJobError(job_id, keys[job_id], str(error))
                progress.done[job_id] = progress.total[job_id]
                await self._reshare()
            yield progress

    async def _reshare(self) -> None:
        """A block job finished: the others share the limit among fewer."""
        if self._remaining and self.limit_bps > 0:
            new_speed = share(self.limit_bps, len(self._remaining))
            for other in sorted(self._remaining):
                await _set_speed(self.session, other, new_speed)

    async def _cancel_remaining(self) -> None:
        """Best effort, shielded from a second cancellation."""
        started = [job_id for job_id in sorted(self._remaining) if job_id in self._entries]

        async def cancel() -> None:
            for job_id in started:
                try:
                    await cancel_job(self.session, job_id)
                except Exception as exc:
                    log.warning("could not cancel block job %s: %s", job_id, exc)
                    continue
                self.journal.resolve(self._entries[job_id])

        task = asyncio.ensure_future(cancel())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait_for(task, CANCEL_TIMEOUT_S + 5)
            raise


async def run_block_jobs(session: QmpSession, journal: Journal, jobs: Sequence[BlockJob], caps: Capabilities, *,
                         limit_bps: int = 0, max_workers: int | None = None,
                         actions: Sequence[Mapping[str, Any]] = (),
                         job_args: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Start and wait, with nothing around them (tests and the fleecing benchmark)."""
    async with BlockJobs(session, journal, jobs, caps, limit_bps=limit_bps, max_workers=max_workers) as block_jobs:
        await block_jobs.start(actions, job_args)
        async for _ in block_jobs.progress():
            pass
