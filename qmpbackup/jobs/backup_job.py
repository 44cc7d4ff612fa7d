"""One backup job: its options and guests resolved, the host lock, the job hooks, one guest after
the other, the status mail.

The options come from vzdump.conf < storage < jobs.cfg job < command line. A failed guest
is in the results while the others still run; the job's own failures (bad options, the lock,
a failing ``job-start`` hook) raise. The job layer decides what a guest's run includes: it
hands each run its features (fleecing when enabled, dirty-bitmap incremental reads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fleecing.feature import FleecingFeature
from fleecing.storage import fleecing_storage
from qmpbackup.backup.features import Feature
from qmpbackup.backup.incremental_feature import IncrementalFeature
from qmpbackup.backup.request import GuestRequest, GuestResult
from qmpbackup.backup.run import backup_guest
from qmpbackup.errors import QmpBackupError, UsageError
from qmpbackup.guest_config import GuestDefinition, guest_path, load_guest
from qmpbackup.jobs.command_line import vzdump_command_line
from qmpbackup.jobs.hooks import HookRunner
from qmpbackup.jobs.jobs_cfg import find_job, load_jobs_cfg
from qmpbackup.jobs.lock import DEFAULT_RUN_DIR, HostLock
from qmpbackup.jobs.notify import JobReport, MailGuest, notify
from qmpbackup.jobs.storage_cfg import Storage, load_storage_cfg
from qmpbackup.jobs.target import Target, resolve_target
from qmpbackup.jobs.vzdump_conf import VzdumpOptions
from qmpbackup.store.protection import count_protected

log = logging.getLogger(__name__)
task = logging.getLogger("qmpbackup.task")


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A backup job as the command line gives it (option values still as text)."""

    config_dir: Path
    options: Mapping[str, str]  # vzdump option name -> text, only those given
    state_dir: Path  # journals and records of spawned QEMUs
    vmids: tuple[int, ...] = ()
    all_guests: bool = False
    job_id: str | None = None  # run a jobs.cfg job's options and guests
    qmp: Path | None = None  # sockets of the one VM
    qga: Path | None = None
    run_dir: Path = DEFAULT_RUN_DIR
    stdout: BinaryIO | None = None  # where the archive goes with ``stdout 1``


@dataclass(frozen=True, slots=True)
class JobOutcome:
    results: list[GuestResult]
    to_stdout: bool  # the archive went to standard output (nothing else may be printed there)

    @property
    def failed(self) -> bool:
        return any(r.status != "ok" for r in self.results)


@dataclass(frozen=True, slots=True)
class JobPlan:
    """A backup job checked and resolved, before anything runs (see :func:`plan_backup_job`)."""

    request: JobRequest
    target: Target
    vmids: list[int]
    definitions: dict[int, GuestDefinition | None]
    fleece_storage: Storage | None
    hooks: HookRunner | None
    command_line: str  # ``vzdump 100 --mode stop …``: the first log line and the mail's
    skip: str | None = None  # why this host does nothing (``node`` names another host)

    @property
    def options(self) -> VzdumpOptions:
        return self.target.options


def plan_backup_job(req: JobRequest) -> JobPlan:
    """Everything checked before the lock is taken: a bad option fails the job with one line."""
    job = find_job(load_jobs_cfg(req.config_dir), req.job_id) if req.job_id else None
    target = resolve_target(req.config_dir, req.options, job.options if job else None)
    opts = target.options
    if opts.pool is not None:
        raise UsageError("--pool: pools are not supported (guest definitions name no pool); give VMIDs or --all")
    written = {**(job.text if job else {}), **req.options, **({"job-id": job.id} if job else {})}
    command_line = vzdump_command_line(req.vmids or opts.vmid, bool(req.all_guests or opts.all), written)
    here = os.uname().nodename
    if opts.node is not None and opts.node != here:
        return JobPlan(req, target, [], {}, None, None, command_line,
                       skip=f"skipping backup job: it is for node '{opts.node}', this is '{here}'")
    vmids = _guests(req, opts)
    if opts.protected:
        _check_protected_room(target, vmids)
    if (req.qmp or req.qga) and len(vmids) != 1:
        raise UsageError("--qmp/--qga name the sockets of one VM: give exactly one VMID")
    if opts.stdout and len(vmids) != 1:
        raise UsageError("--stdout writes one archive: give exactly one VMID")
    definitions = {vmid: _definition(req.config_dir, vmid, req.qmp) for vmid in vmids}
    fleece_storage = None
    if opts.fleecing.enabled:
        if not opts.fleecing.storage:
            raise UsageError("fleecing enabled=1 needs storage=ID (a storage of storage.cfg)")
        fleece_storage = fleecing_storage(load_storage_cfg(req.config_dir), opts.fleecing.storage)
    hooks = HookRunner(opts.script, storeid=target.storage.storeid if target.storage else None,
                       dumpdir=target.dump_dir, on_output=task.info) if opts.script else None
    return JobPlan(req, target, vmids, definitions, fleece_storage, hooks, command_line)


def _guests(req: JobRequest, opts: VzdumpOptions) -> list[int]:
    if req.vmids and (req.all_guests or opts.all):
        raise UsageError("give VMIDs or --all, not both")
    vmids = list(req.vmids) or list(opts.vmid)
    if req.all_guests or opts.all or (opts.exclude and not vmids):  # vzdump: --exclude alone means all but these
        folder = req.config_dir / "guests"
        found = sorted(int(p.stem) for p in folder.glob("*.conf") if p.stem.isdigit()) if folder.is_dir() else []
        vmids = sorted(set(vmids) | set(found))
    vmids = [v for v in sorted(dict.fromkeys(vmids)) if v not in opts.exclude]
    if not vmids:
        raise UsageError("no VM to back up: give VMIDs, --all or --job-id")
    return vmids


def _check_protected_room(target: Target, vmids: list[int]) -> None:
    """vzdump refuses ``--protected 1`` before the backup when the storage's limit is reached."""
    storage = target.storage
    limit = storage.max_protected_backups if storage else None
    if storage is None or limit is None or limit < 0:
        return
    for vmid in vmids:
        count = count_protected(target.dump_dir, vmid) if target.dump_dir.is_dir() else 0
        if count >= limit:
            raise UsageError(
                f"VM {vmid}: cannot back up as protected: {count} protected backup(s) already, "
                f"the maximum (max-protected-backups of storage '{storage.storeid}') is {limit}"
            )


def _definition(config_dir: Path, vmid: int, qmp: Path | None) -> GuestDefinition | None:
    if guest_path(config_dir, vmid).exists():
        return load_guest(config_dir, vmid)
    if qmp is None:
        load_guest(config_dir, vmid)  # raises the clear "no guest definition" error
    return None


def features(opts: VzdumpOptions, fleece_storage: Storage | None) -> tuple[Feature, ...]:
    """A new set for each guest (features keep per-run state). Fleecing comes first: it takes
    the point in time, and the incremental reads follow it there."""
    chosen: list[Feature] = []
    if fleece_storage is not None:
        chosen.append(FleecingFeature(fleece_storage))
    chosen.append(IncrementalFeature(enabled=opts.dirty_bitmap))
    return tuple(chosen)


async def run_backup_job(plan: JobPlan) -> JobOutcome:
    """The whole job; guests fail into their results, the job's own failures raise."""
    opts, hooks = plan.options, plan.hooks
    if plan.skip is not None:
        task.info(plan.skip)
        return JobOutcome([], to_stdout=opts.stdout)
    if hooks:
        await hooks.job_phase("job-init", explicit_dumpdir=opts.dumpdir is not None)
    lock = HostLock(plan.request.run_dir)
    await lock.acquire_async(opts.lockwait_min * 60)
    results: list[GuestResult] = []
    started = time.monotonic()
    try:
        task.info(f"starting new backup job: {plan.command_line}")
        if hooks:
            try:
                await hooks.job_phase("job-start")
            except BaseException:
                await _quiet_job_abort(hooks)
                raise
        try:
            for vmid in plan.vmids:
                results.append(await backup_guest(_guest_request(plan, vmid)))
        except BaseException:  # a job-level error (a signal ends the whole job)
            if hooks:
                await _quiet_job_abort(hooks)
            raise
        failed = [r for r in results if r.status != "ok"]
        if hooks:
            await hooks.job_phase("job-end")  # vzdump: failed guests still end the job; job-abort is for job errors
        task.info("Backup job finished with errors" if failed else "Backup job finished successfully")
    finally:
        lock.release()
    _send_mail(plan, results, time.monotonic() - started)
    return JobOutcome(results, to_stdout=opts.stdout)


def _guest_request(plan: JobPlan, vmid: int) -> GuestRequest:
    req, opts, storage = plan.request, plan.options, plan.target.storage
    return GuestRequest(
        vmid=vmid,
        options=opts,
        dump_dir=plan.target.dump_dir,
        storeid=storage.storeid if storage else None,
        definition=plan.definitions[vmid],
        qmp=req.qmp,
        qga=req.qga,
        state_dir=req.state_dir,
        stdout=req.stdout if opts.stdout else None,
        hooks=plan.hooks,
        features=features(opts, plan.fleece_storage),
    )


async def _quiet_job_abort(hooks: HookRunner) -> None:
    try:
        await hooks.job_phase("job-abort")
    except QmpBackupError as exc:
        log.warning("%s", exc)


def _send_mail(plan: JobPlan, results: list[GuestResult], seconds: float) -> None:
    """vzdump's status mail (``mailto``, ``mailnotification``); a failure to send only warns."""
    guests = []
    for r in results:
        lines: list[str] = []
        if r.log:
            with contextlib.suppress(OSError):
                lines = Path(r.log).read_text(errors="replace").splitlines()
        definition = plan.definitions.get(r.vmid)
        guests.append(MailGuest(vmid=r.vmid, ok=r.status == "ok", duration_s=r.duration_s,
                                name=definition.name if definition else None, size=r.archive_size,
                                filename=r.archive, error=r.error, log_lines=lines))
    report = JobReport(hostname=os.uname().nodename, cmdline=plan.command_line, guests=guests,
                       total_time_s=seconds, job_id=plan.request.job_id)
    try:
        notify(plan.options, report)
    except QmpBackupError as exc:
        task.warning("%s", exc)
