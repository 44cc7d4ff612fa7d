"""One guest's backup, in vzdump's order, with vzdump's log lines.

The order (vzdump's): status → include/exclude lines → the archive's
``qemu-server.conf`` → open the archive and our NBD endpoint → NBD target
nodes in QEMU → freeze (snapshot mode, agent configured and answering) → all
drive jobs started in one ``transaction`` → thaw at once → resume (suspend
mode) → progress until every job concluded → targets deleted (QEMU flushes
and disconnects) → archive closed, fsynced, renamed → notes, protection,
prune.

Cleanup does not depend on the way out: everything we create in QEMU is in
the journal and is undone in reverse order in ``finally`` (and by the next run
after a SIGKILL); the freeze window always thaws; a VM we paused is resumed; a
QEMU we spawned is stopped; the ``.dat`` file is removed unless it was
published under its final name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from fleecing.drives import Fleecing
from fleecing.storage import plan_fleecing
from qmpbackup.atomic_file import atomic_output
from qmpbackup.backup import incremental
from qmpbackup.backup.archive_config import DiskMap, assemble, vma_device_name
from qmpbackup.backup.blockjobs import (
    BlockJobError,
    JobProgress,
    attach_targets,
    detach_targets,
    plan_jobs,
    run_jobs,
)
from qmpbackup.backup.datapath import ArchiveDataPath, DeviceSpec
from qmpbackup.backup.guard import guarded
from qmpbackup.backup.kill_points import hold
from qmpbackup.backup.progress import Progress, closing_lines
from qmpbackup.backup.synthetic import PreviousArchiveError, complete_from_previous
from qmpbackup.backup.tasklog import TaskLog
from qmpbackup.compress import Compression, CompressOptions
from qmpbackup.errors import QmpBackupError, UsageError
from qmpbackup.guest_agent.client import GuestAgentClient
from qmpbackup.guest_agent.freeze import frozen_window
from qmpbackup.guest_config import GuestDefinition, format_size, guest_from_running
from qmpbackup.jobs.hooks import GuestInfo, HookRunner
from qmpbackup.jobs.storage_cfg import Storage
from qmpbackup.jobs.vzdump_conf import VzdumpOptions
from qmpbackup.qemu.capabilities import Capabilities, probe
from qmpbackup.qemu.discovery import Disk, discover_disks
from qmpbackup.qemu.session import QmpSession
from qmpbackup.qemu.spawn import SpawnedQemu
from qmpbackup.recovery import kinds
from qmpbackup.recovery.host_files import journaled_output, run_folder
from qmpbackup.recovery.journal import Journal
from qmpbackup.recovery.replay import Sessions, replay
from qmpbackup.recovery.state import DEFAULT_STATE_DIR, journal_path
from qmpbackup.recovery.steps import undo_steps
from qmpbackup.render import render_archive_size, render_hms
from qmpbackup.store.dumpdir import check_backup_limit, prune_after_backup
from qmpbackup.store.names import archive_name, log_name, temp_name
from qmpbackup.store.notes import render_notes, write_notes
from qmpbackup.store.protection import protect

log = logging.getLogger(__name__)

#: Seconds between progress lines (vzdump: when the percentage changed and > 2 s passed).
PROGRESS_INTERVAL_S = 3.0


class BackupError(QmpBackupError):
    """A guest's backup failed for a reason of its own (not a QEMU or format error)."""


@dataclass(frozen=True, slots=True)
class GuestRequest:
    """Everything one guest's backup needs, resolved and typed (no argparse below here)."""

    vmid: int
    options: VzdumpOptions
    dump_dir: Path
    storeid: str | None
    definition: GuestDefinition | None
    qmp: Path | None = None
    qga: Path | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    stdout: BinaryIO | None = None
    hooks: HookRunner | None = None
    fleecing_storage: Storage | None = None  # resolved from storage.cfg when fleecing is enabled
    node: str = field(default_factory=lambda: os.uname().nodename)


@dataclass(slots=True)
class GuestResult:
    """One guest's outcome, as ``--output-format json`` prints it."""

    vmid: int
    status: str = "error"
    archive: str | None = None
    archive_size: int | None = None
    log: str | None = None
    duration_s: float = 0.0
    bytes_read: int = 0
    bytes_reused: int = 0  # taken from the previous archive (incremental runs)
    zero_bytes: int = 0
    written_bytes: int = 0
    freeze_window_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _compression(options: VzdumpOptions) -> Compression:
    return Compression(options.compress)


def compress_options(options: VzdumpOptions) -> CompressOptions:
    return CompressOptions(zstd_threads=options.zstd_threads, pigz=options.pigz_threads,
                           ionice=options.ionice)


async def backup_guest(req: GuestRequest) -> GuestResult:
    """Back up one guest; failures become the result's error (the other guests still run).

    Cancellation (a signal) propagates after cleanup, so the whole job stops.
    """
    started = time.time()
    when = datetime.fromtimestamp(started)
    compression = _compression(req.options)
    archive = req.dump_dir / archive_name(req.vmid, when, compression.extension)
    result = GuestResult(req.vmid)
    if req.stdout is None and (archive.exists() or temp_name(archive).exists()):
        # Another backup of this VM started in the same second: its files are not ours to touch.
        result.error = f"{archive} (or its .dat) already exists; not overwriting it"
        logging.getLogger("qmpbackup.task").error(f"Backup of VM {req.vmid} failed - {result.error}")
        return result
    log_path = None if req.stdout is not None else log_name(archive)
    if log_path is not None:
        req.dump_dir.mkdir(parents=True, exist_ok=True)
        result.log = str(log_path)
    tasklog = TaskLog(log_path)
    guest = GuestInfo(vmid=req.vmid, mode=req.options.mode,
                      hostname=req.definition.name if req.definition else None,
                      target="-" if req.stdout is not None else archive, logfile=log_path)

    async def hook(phase: str) -> None:
        if req.hooks is not None:
            await req.hooks.guest_phase(phase, guest)

    try:
        tasklog.info(f"Starting Backup of VM {req.vmid} (qemu)")
        tasklog.info(f"Backup started at {when:%Y-%m-%d %H:%M:%S}")
        try:
            try:
                await _backup(req, archive, compression, tasklog, result, hook)
            except PreviousArchiveError as exc:
                # Nothing of the damaged archive may reach the new one: start over, reading everything.
                tasklog.warn(str(exc))
                await _backup(req, archive, compression, tasklog, result, hook, full_reason=str(exc))
            await hook("backup-end")
        except asyncio.CancelledError:
            tasklog.error(f"Backup of VM {req.vmid} failed - interrupted by signal")
            await _quietly(hook("backup-abort"), tasklog)
            raise
        except (QmpBackupError, OSError) as exc:  # OSError: the dump storage (full, gone, read-only)
            result.error = _describe(exc)
            tasklog.error(f"Backup of VM {req.vmid} failed - {result.error}")
            tasklog.info(f"Failed at {datetime.now():%Y-%m-%d %H:%M:%S}")
            await _quietly(hook("backup-abort"), tasklog)
        else:
            result.status = "ok"
            tasklog.info(f"Finished Backup of VM {req.vmid} ({render_hms(time.time() - started)})")
            tasklog.info(f"Backup finished at {datetime.now():%Y-%m-%d %H:%M:%S}")
    finally:
        result.duration_s = round(time.time() - started, 3)
        result.warnings = list(tasklog.warnings)
        tasklog.close()
    await _quietly(hook("log-end"), None)
    return result


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


async def _quietly(step: Awaitable[None], tasklog: TaskLog | None) -> None:
    """Hooks on the way out only warn: the first error stays the one reported."""
    try:
        await step
    except QmpBackupError as exc:
        if tasklog is not None:
            tasklog.warn(str(exc))
        else:
            log.warning("%s", exc)


@dataclass(slots=True)
class _Access:
    """How this run reaches the VM's disks."""

    session: QmpSession
    running: bool  # the VM itself (not a QEMU we spawned)
    stopped_by_us: bool = False  # stop mode shut the VM down (hooks backup-start/pre-stop ran)


@contextlib.asynccontextmanager
async def _qemu_for(req: GuestRequest, tasklog: TaskLog,
                    hook: Callable[[str], Awaitable[None]]) -> AsyncIterator[_Access]:
    """A QMP session to the VM, or to a paused QEMU we spawned for its disks.

    Stop mode shuts a running VM down first and starts it again afterwards, also
    when the backup failed (a VM must not stay down because its backup did).
    """
    qmp = req.qmp or (req.definition.reach.qmp if req.definition else None)
    running = qmp is not None and qmp.exists()
    if running and req.options.mode != "stop":
        assert qmp is not None
        async with QmpSession(str(req.vmid), qmp) as session:
            yield _Access(session, True)
        return
    definition = req.definition
    if definition is None:
        raise UsageError(f"VM {req.vmid}: QMP socket {qmp} does not exist and the VM has no guest definition")
    if running:
        assert qmp is not None
        if not definition.reach.start:
            raise UsageError(f"VM {req.vmid}: stop mode needs a 'start' command in the [qmpbackup] section "
                             "of its guest definition, to start the VM again")
        tasklog.info("status = running")
        await hook("backup-start")
        await hook("pre-stop")
        await _shut_down(req, definition, qmp, tasklog)
    else:
        tasklog.info("status = stopped")
    stopped_at = time.monotonic()
    failed = True
    try:
        tasklog.info("starting kvm to execute backup task")
        async with SpawnedQemu(definition, state_dir=req.state_dir) as spawned:
            async with QmpSession(str(req.vmid), spawned.qmp_path) as session:
                yield _Access(session, False, stopped_by_us=running)
            tasklog.info("stopping kvm after backup task")
        failed = False
    finally:
        if running and not await _start_again(definition, tasklog, hook, stopped_at) and not failed:
            raise BackupError(f"VM {req.vmid} was backed up but could not be started again")


async def _shut_down(req: GuestRequest, definition: GuestDefinition, qmp: Path, tasklog: TaskLog) -> None:
    """A clean shutdown through the agent (else ACPI), waiting up to ``stopwait`` minutes for QEMU to exit."""
    limit = req.options.stopwait_min * 60
    tasklog.info("stopping virtual guest")
    async with QmpSession(str(req.vmid), qmp) as session:
        qga = req.qga or definition.reach.qga
        asked = False
        if definition.agent.enabled and qga is not None:
            try:
                async with GuestAgentClient(str(qga), name=f"VM {req.vmid}") as agent:
                    await agent.shutdown()
                asked = True
            except QmpBackupError as exc:
                tasklog.warn(f"guest agent shutdown failed ({exc}), trying ACPI")
        if not asked:
            await session.execute("system_powerdown")
        try:
            async with asyncio.timeout(limit):
                while True:
                    try:
                        status = (await session.execute("query-status"))["status"]
                    except QmpBackupError:
                        break  # QEMU has gone away
                    if status == "shutdown":  # started with -no-shutdown: ask it to leave
                        with contextlib.suppress(QmpBackupError):
                            await session.execute("quit")
                        break
                    await asyncio.sleep(0.5)
        except TimeoutError:
            raise BackupError(f"VM {req.vmid} did not shut down within {req.options.stopwait_min} minutes") from None
    # QEMU releases its image locks when it exits; its QMP socket goes with it.
    async with asyncio.timeout(30):
        while qmp.exists() and _accepts(qmp):
            await asyncio.sleep(0.1)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


async def _start_again(definition: GuestDefinition, tasklog: TaskLog, hook: Callable[[str], Awaitable[None]],
                       stopped_at: float) -> bool:
    """Run the definition's start command; a failure is logged as an error and returns False."""
    assert definition.reach.start
    try:
        await hook("pre-restart")
        tasklog.info("restarting VM")
        proc = await asyncio.create_subprocess_exec(
            *definition.reach.start, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        async with asyncio.timeout(120):
            out, _ = await proc.communicate()
        tasklog.lines(logging.INFO, out.decode(errors="replace"))
        if proc.returncode != 0:
            raise BackupError(f"start command of VM {definition.vmid} failed with exit status {proc.returncode}")
        tasklog.info(f"guest is online again after {int(time.monotonic() - stopped_at)} seconds")
        await hook("post-restart")
    except (QmpBackupError, OSError, TimeoutError) as exc:
        tasklog.error(f"unable to start VM {definition.vmid} again: {exc}")
        return False
    return True


async def _backup(req: GuestRequest, archive: Path, compression: Compression, tasklog: TaskLog,
                  result: GuestResult, hook: Callable[[str], Awaitable[None]],
                  full_reason: str | None = None) -> None:
    opts = req.options
    if not opts.remove and req.stdout is None:  # vzdump's retention pre-check, before anything else
        check_backup_limit(req.dump_dir, req.vmid, opts.effective_prune)
    async with contextlib.AsyncExitStack() as stack:
        access = await stack.enter_async_context(_qemu_for(req, tasklog, hook))
        session, running = access.session, access.running
        status = (await session.execute("query-status"))["status"] if running else "prelaunch"
        user_paused = status in ("paused", "prelaunch") and running
        if running:
            tasklog.info("status = running")

        journal = Journal.open(journal_path(req.state_dir, req.vmid))
        stack.callback(journal.close)
        sessions = Sessions(req.vmid, session)
        if journal.pending():
            tasklog.warn("cleaning up what an earlier run of this VM left behind")
            for failure in await replay(journal, sessions, info=tasklog.info, say=tasklog.warn):
                tasklog.warn(failure)
        journal.bind(sessions.current_qemu)
        stack.push_async_callback(_final_unwind, journal, sessions, tasklog)
        await hold("journal")

        caps = await probe(session)
        disks = await discover_disks(session, str(req.vmid))
        definition = req.definition or guest_from_running(
            req.vmid, req.qmp or Path(), req.qga, disks)
        if definition.name:
            tasklog.info(f"VM Name: {definition.name}")
        chosen = _select_disks(definition, disks, tasklog)

        mode = opts.mode if running else "stop"
        tasklog.info(f"backup mode: {mode}")
        if opts.bwlimit_kib:
            tasklog.info(f"bandwidth limit: {opts.bwlimit_kib} KiB/s")
        tasklog.info(f"ionice priority: {opts.ionice}")

        if not access.stopped_by_us:
            await hook("backup-start")
        if mode in ("snapshot", "suspend"):
            await hook("pre-stop")
        if mode == "snapshot":  # vzdump runs these before the freeze for QEMU in snapshot mode
            await hook("pre-restart")
            await hook("post-restart")

        maps = [DiskMap(d.key, vma_device_name(d.key), "", d.format) for d in chosen]
        configs = [("qemu-server.conf", assemble(definition.proxmox_text, maps))]
        target_text = "-" if req.stdout is not None else str(archive)
        tasklog.info(f"creating vzdump archive '{target_text}'")

        rundir = stack.enter_context(run_folder(journal, req.vmid))
        fleece = await _fleecing(req, session, journal, caps, chosen, rundir, running, mode, tasklog)
        if fleece is not None:
            stack.push_async_callback(_teardown, fleece)
            await fleece.prepare()
            await hold("prepared")
            sources = fleece.sources()
        else:
            sources = [(d.key, d.top_node, d.size) for d in chosen]
        jobs = plan_jobs(req.vmid, sources)
        devices = [DeviceSpec(j.key, vma_device_name(j.key), j.size, j.export) for j in jobs]

        with contextlib.ExitStack() as output:
            if req.stdout is None:  # the partial archive is journaled before it exists
                output.enter_context(journaled_output(journal, temp_name(archive)))
                out = output.enter_context(atomic_output(archive, temp_name(archive), ionice=opts.ionice))
            else:
                out = req.stdout
            datapath = ArchiveDataPath(out, compression, compress_options(opts), configs, devices,
                                       rundir / "nbd.sock", str(req.vmid),
                                       wrap=(lambda dev, c: fleece.consumer(dev.key, c)) if fleece else None)
            try:
                plan = await incremental.plan_incremental(
                    session, req.vmid, jobs, dump_dir=req.dump_dir, enabled=opts.dirty_bitmap,
                    new_uuid=datapath.uuid, to_stdout=req.stdout is not None,
                    persistent_ok=caps.has_persistent_bitmaps, full_reason=full_reason,
                    nodes={d.key: d.top_node for d in chosen} if fleece else None)
                for line in plan.log_lines():
                    tasklog.info(line)
                if fleece is None:
                    plan.record(journal)  # the bitmaps start in the jobs' transaction
                else:
                    await plan.start_bitmaps(session, journal)  # before the snapshot point
                await datapath.server.start()
                await attach_targets(session, journal, jobs, datapath.server.path, caps)
                await hold("attached")
                started = time.monotonic()
                progress = Progress(total_bytes=sum(j.size for j in jobs), started=started,
                                    interval_s=PROGRESS_INTERVAL_S)

                def on_progress(_: JobProgress) -> None:
                    stats = datapath.stats()
                    line = progress.line(time.monotonic(), stats.received, stats.zero)
                    if line:
                        tasklog.info(line)

                async def snapshot_point() -> None:
                    assert fleece is not None
                    await fleece.insert()
                    await plan.bind_snapshots(session, journal, {j.key: j.source_node for j in jobs})

                window = _start_window(req, definition, session, journal, tasklog, mode, status,
                                       user_paused, result, before_start=snapshot_point if fleece else None)

                async def window_then_hold(job_start: Callable[[], Awaitable[None]]) -> None:
                    await window(job_start)
                    await hold("running")
                try:
                    await run_jobs(session, journal, jobs, caps,
                                   limit_bps=opts.bwlimit_kib * 1024,
                                   max_workers=opts.performance.max_workers,
                                   start_window=window_then_hold,
                                   failure=datapath.server.wait_failure,
                                   on_progress=on_progress,
                                   extra=_merged(plan.job_args(), fleece.job_extra() if fleece else {}),
                                   actions=plan.actions())
                except BlockJobError as exc:
                    key = next((j.key for j in jobs if j.job_id == exc.job_id), None)
                    if fleece is not None and key is not None:
                        raise fleece.broken(key, exc.error) from exc
                    raise
                await detach_targets(session, journal, jobs)
                await hold("detached")
                reused = await complete_from_previous(plan, datapath, session)
                await datapath.finish()
                await hold("finished")
                stats = datapath.stats()
                if jobs:
                    tasklog.info(progress.line(time.monotonic(), stats.received, stats.zero, force=True) or "")
            except BaseException:
                await datapath.abort()
                raise
            elapsed = time.monotonic() - started
        datapath.publish_index(archive if req.stdout is None else None)
        await hold("published")
        stats = datapath.stats()
        result.bytes_read, result.zero_bytes = stats.received, stats.zero
        result.written_bytes = stats.written
        result.bytes_reused = sum(reused.values())
        received = {j.key: datapath.assemblers[j.export].stats.bytes_received for j in jobs}
        for line in incremental.closing_lines(plan, received, reused):
            tasklog.info(line)
        for line in closing_lines(sum(j.size for j in jobs), stats.zero, elapsed):
            tasklog.info(line)
        for warning in await plan.commit(session, journal):
            tasklog.warn(warning)
    if req.stdout is None:
        result.archive = str(archive)
        result.archive_size = archive.stat().st_size
        tasklog.info(f"archive file size: {render_archive_size(result.archive_size)}")
        _after_archive(req, archive, definition, tasklog)


async def _teardown(fleece: Fleecing) -> None:
    await hold("teardown")
    await fleece.teardown()


def _merged(*extras: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per drive key, the extra job arguments of several features together."""
    result: dict[str, dict[str, Any]] = {}
    for extra in extras:
        for key, args in extra.items():
            result.setdefault(key, {}).update(args)
    return result


async def _fleecing(req: GuestRequest, session: QmpSession, journal: Journal, caps: Capabilities,
                    disks: list[Disk], rundir: Path, running: bool, mode: str, tasklog: TaskLog) -> Fleecing | None:
    """The fleecing set-up, when enabled and useful: checked before anything changes in QEMU."""
    if not req.options.fleecing.enabled or not disks:
        return None
    if not running or mode == "stop":
        tasklog.info("fleecing not used: the guest does not run during the backup")
        return None
    storage = req.fleecing_storage
    if storage is None:
        raise UsageError("fleecing is enabled but no fleecing storage is set (fleecing enabled=1,storage=ID)")
    plan = await plan_fleecing(storage, [d.size for d in disks])
    fleece = Fleecing(session, journal, caps, req.vmid, disks, plan, rundir=rundir)
    for warning in fleece.warnings:
        tasklog.warn(warning)
    for disk in disks:
        tasklog.info(f"drive-{disk.key}: attaching fleecing image on storage '{plan.storeid}' to QEMU")
    return fleece


def _select_disks(definition: GuestDefinition, disks: tuple[Disk, ...], tasklog: TaskLog) -> list[Disk]:
    """vzdump's include/exclude lines; ``backup=0`` drives are left out."""
    chosen = []
    for disk in sorted(disks, key=lambda d: d.key):
        drive = definition.drive(disk.key)
        if drive is not None and not drive.backup:
            tasklog.info(f"exclude disk '{disk.key}' '{disk.filename}' (backup=no)")
            continue
        tasklog.info(f"include disk '{disk.key}' '{disk.filename}' {format_size(disk.size)}")
        chosen.append(disk)
    return chosen


def _start_window(req: GuestRequest, definition: GuestDefinition, session: QmpSession, journal: Journal,
                  tasklog: TaskLog, mode: str, status: str, user_paused: bool, result: GuestResult,
                  before_start: Callable[[], Awaitable[None]] | None = None,
                  ) -> Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]:
    """The moment the jobs start: frozen (snapshot), or paused (suspend), and nothing else.

    ``before_start`` runs inside the window right before the jobs' transaction (fleecing puts
    its copy-before-write filters under the devices there: that is the point in time).
    """

    async def window(job_start: Callable[[], Awaitable[None]]) -> None:
        async def start() -> None:
            if before_start is not None:
                await before_start()
                await hold("snapshot")
            await job_start()
            await hold("started")

        label = f"VM {req.vmid}"
        pause = mode == "suspend" and status == "running"
        async with contextlib.AsyncExitStack() as stack:
            if pause:  # journaled and guarded: a run that dies now does not leave the VM paused
                tasklog.info("suspending guest")
                await stack.enter_async_context(guarded(
                    journal, kinds.PAUSE, {"qmp": session.socket_path}, undo_steps(session)[kinds.PAUSE.name],
                    label=label, warn=tasklog.warn, qmp=session.socket_path))
                await hold("recorded")
                await session.execute("stop")
                await hold("paused")
            paused_at = time.monotonic()
            qga = req.qga or definition.reach.qga
            wants_freeze = mode == "snapshot" and status == "running" and not user_paused
            if wants_freeze and not (definition.agent.enabled and definition.agent.freeze_fs and qga):
                if definition.agent.enabled and not definition.agent.freeze_fs:
                    tasklog.info("skipping guest filesystem freeze - disabled in VM options")
                wants_freeze = False
            if wants_freeze and qga is not None:
                async with guarded(journal, kinds.FREEZE, {"qga": str(qga), "vm": label},
                                   undo_steps(None)[kinds.FREEZE.name], label=label, warn=tasklog.warn,
                                   qga=str(qga)):
                    await hold("recorded")
                    agent = GuestAgentClient(str(qga), name=label)
                    try:
                        async with frozen_window(agent) as outcome:
                            if outcome.thawed_first:
                                tasklog.warn("guest filesystems were still frozen (a run that died?) "
                                             "- thawed them before freezing")
                            if outcome.frozen:
                                tasklog.info("issuing guest-agent 'fs-freeze' command")
                                await hold("frozen")
                            elif outcome.skipped:
                                tasklog.warn(f"skipping guest filesystem freeze - {outcome.skipped}")
                            elif outcome.error:
                                tasklog.error(f"guest filesystem freeze failed - {outcome.error}")
                            tasklog.info("starting backup via QMP command")
                            await start()
                            if outcome.frozen:
                                tasklog.info("issuing guest-agent 'fs-thaw' command")
                    finally:
                        await agent.close()
                result.freeze_window_s = outcome.frozen_for_s
                if outcome.frozen_for_s is not None:
                    tasklog.info(f"guest filesystems were frozen for {outcome.frozen_for_s:.3f} s")
            else:
                tasklog.info("starting backup via QMP command")
                await start()
            tasklog.info("started backup task")
            if pause:
                tasklog.info(f"resuming VM again after {int(time.monotonic() - paused_at)} seconds")
                await session.execute("cont")

    return window


async def _final_unwind(journal: Journal, sessions: Sessions, tasklog: TaskLog) -> None:
    """Undo whatever is still recorded; runs shielded so a second signal cannot cut it short."""
    if not journal.pending():
        return
    task = asyncio.ensure_future(replay(journal, sessions, info=tasklog.info, say=tasklog.warn))
    try:
        failures = await asyncio.shield(task)
    except asyncio.CancelledError:
        failures = await task
        for failure in failures:
            tasklog.warn(failure)
        raise
    for failure in failures:
        tasklog.warn(failure)


def _after_archive(req: GuestRequest, archive: Path, definition: GuestDefinition, tasklog: TaskLog) -> None:
    """Notes, protection and prune: vzdump's steps 14 and 15."""
    opts = req.options
    if opts.notes_template:
        tasklog.info("adding notes to backup")
        try:
            text = render_notes(opts.notes_template, cluster=None, guestname=definition.name,
                                node=req.node, vmid=req.vmid)
            write_notes(archive, text)
        except QmpBackupError as exc:
            tasklog.warn(f"unable to add notes - {exc}")
    if opts.protected:
        tasklog.info("marking backup as protected")
        protect(archive)
    if opts.remove and req.stdout is None:
        prune_after_backup(req.dump_dir, req.vmid, opts.effective_prune, tasklog.info, req.storeid)
