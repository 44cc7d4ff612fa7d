"""One guest's backup as named phases, in vzdump's order, with vzdump's log lines.

::

    prepare     reach QEMU (spawn or stop it in stop mode), journal and a crashed run's
                leftovers, capabilities, disks, include/exclude, hooks, the archive's config
    attach      the features (fleecing graph, dirty bitmaps), the archive and our NBD
                endpoint, one NBD target node per drive in QEMU
    window      frozen (snapshot) or paused (suspend): the features' snapshot point, then
                start   every drive's block job in one ``transaction``; thaw, resume
    transfer    progress lines until every block job concluded
    finish      targets deleted (QEMU flushes and disconnects), what the block jobs did not
                send, archive closed, fsynced, renamed; the features commit
    teardown    on every way out, in reverse: block jobs cancelled, ``.dat`` removed, the
                features torn down, the journal unwound, QEMU left as it was found
    then        notes, protection, prune

Each phase leaves :attr:`GuestRun.state` at its :class:`RunState`; a failure leaves
``FAILED`` with :attr:`GuestRun.failed_in` the phase it happened in. Cleanup does not depend
on the way out: everything created in QEMU is in the journal and undone in reverse order
(and by the next run after a SIGKILL). A teardown step that fails after the run already
failed is a warning: the first error stays the one reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType

from qmpbackup.atomic_file import atomic_output
from qmpbackup.backup.access import QemuAccess, reach_qemu, vm_is_running
from qmpbackup.backup.archive_config import DiskMap, assemble, vma_device_name
from qmpbackup.backup.blockjobs import (
    BlockJob,
    BlockJobError,
    BlockJobProgress,
    BlockJobs,
    attach_targets,
    detach_targets,
    plan_block_jobs,
)
from qmpbackup.backup.datapath import ArchiveDataPath, DeviceSpec
from qmpbackup.backup.features import Feature, RunContext, merged_job_args
from qmpbackup.backup.kill_points import hold
from qmpbackup.backup.progress import Progress, closing_lines
from qmpbackup.backup.request import GuestRequest, GuestResult
from qmpbackup.backup.synthetic import PreviousArchiveError
from qmpbackup.backup.tasklog import TaskLog
from qmpbackup.backup.window import consistency_window
from qmpbackup.compress import Compression, CompressOptions
from qmpbackup.errors import QmpBackupError
from qmpbackup.guest_config import GuestDefinition, format_size, guest_from_running
from qmpbackup.jobs.hooks import GuestInfo
from qmpbackup.jobs.vzdump_conf import VzdumpOptions
from qmpbackup.nbd.export import ExportConsumer
from qmpbackup.qemu.capabilities import probe
from qmpbackup.qemu.discovery import Disk, discover_disks
from qmpbackup.recovery.host_files import journaled_output, run_folder
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Entry, Journal
from qmpbackup.recovery.replay import Sessions, replay
from qmpbackup.recovery.spawned import kill_orphans
from qmpbackup.recovery.state import journal_path
from qmpbackup.recovery.steps import undo_steps
from qmpbackup.render import render_archive_size, render_hms
from qmpbackup.store.dumpdir import check_backup_limit, prune_after_backup
from qmpbackup.store.names import archive_name, log_name, temp_name
from qmpbackup.store.notes import render_notes, write_notes
from qmpbackup.store.protection import protect

log = logging.getLogger(__name__)

#: Seconds between progress lines (vzdump: when the percentage changed and > 2 s passed).
PROGRESS_INTERVAL_S = 3.0


class RunState(enum.Enum):
    NEW = "new"
    PREPARED = "prepared"  # QEMU reached, leftovers undone, disks chosen, hooks ran
    ATTACHED = "attached"  # features built, archive open, endpoint serving, targets in QEMU
    STARTED = "started"  # point in time taken, block jobs running, window closed
    TRANSFERRED = "transferred"  # every block job concluded
    FINISHED = "finished"  # archive published, features committed
    TORN_DOWN = "torn-down"  # nothing of the run is left in QEMU (or in the journal for the next run)
    FAILED = "failed"


def compress_options(options: VzdumpOptions) -> CompressOptions:
    return CompressOptions(zstd_threads=options.zstd_threads, pigz=options.pigz_threads, ionice=options.ionice)


async def backup_guest(req: GuestRequest) -> GuestResult:
    """Back up one guest; failures become the result's error (the other guests still run).

    Cancellation (a signal) propagates after cleanup, so the whole job stops.
    """
    return await GuestRun(req).backup()


def _accounted(jobs: Sequence[BlockJob], progress: BlockJobProgress) -> int:
    """Bytes accounted for: what QEMU copied, plus what it will not copy (unchanged since the
    previous archive, whose clusters the archive takes from there)."""
    return sum(j.size - progress.total.get(j.job_id, j.size) + progress.done.get(j.job_id, 0) for j in jobs)


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


class GuestRun:
    """One guest's backup: :meth:`execute` runs the phases (module docstring) in order."""

    def __init__(self, req: GuestRequest) -> None:
        self.req = req
        self.started = time.time()
        self.compression = Compression(req.options.compress)
        self.archive = req.dump_dir / archive_name(req.vmid, datetime.fromtimestamp(self.started),
                                                   self.compression.extension)
        self.result = GuestResult(req.vmid)
        self.tasklog = TaskLog(None)  # opened by backup(), once the archive's name is known to be free
        self.features: tuple[Feature, ...] = req.features
        self.state = RunState.NEW
        self.failed_in: RunState | None = None
        #: Every state the run went through, in order (for its tests and debug lines).
        self.history: list[RunState] = [RunState.NEW]
        self.guest = GuestInfo(vmid=req.vmid, mode=req.options.mode,
                               hostname=req.definition.name if req.definition else None,
                               target="-" if req.stdout is not None else self.archive,
                               logfile=None if req.stdout is not None else log_name(self.archive))
        self._reset()

    def _reset(self, full_reason: str | None = None) -> None:
        """The state the phases fill in, empty (again: a retry reads every disk in full)."""
        req = self.req
        self.full_reason = full_reason
        self.access: QemuAccess | None = None
        self.status = "prelaunch"
        self.mode = req.options.mode
        self.definition: GuestDefinition | None = req.definition
        self.run: RunContext | None = None
        self.jobs: list[BlockJob] = []
        self.datapath: ArchiveDataPath | None = None
        self._archive = contextlib.AsyncExitStack()  # the output file and the endpoint
        self._configs: list[tuple[str, bytes]] = []
        self._transfer_started = 0.0
        self._progress: Progress | None = None

    def __repr__(self) -> str:
        return f"<GuestRun vm{self.req.vmid} {self.state.value}>"

    async def backup(self) -> GuestResult:
        """The run with vzdump's first and last lines and the guest hooks; failures go to the result."""
        req, result, started = self.req, self.result, self.started
        if req.stdout is None and (self.archive.exists() or temp_name(self.archive).exists()):
            # Another backup of this VM started in the same second: its files are not ours to touch.
            result.error = f"{self.archive} (or its .dat) already exists; not overwriting it"
            logging.getLogger("qmpbackup.task").error(f"Backup of VM {req.vmid} failed - {result.error}")
            return result
        if req.stdout is None:
            req.dump_dir.mkdir(parents=True, exist_ok=True)
            result.log = str(log_name(self.archive))
        tasklog = self.tasklog = TaskLog(None if req.stdout is not None else log_name(self.archive))
        try:
            tasklog.info(f"Starting Backup of VM {req.vmid} (qemu)")
            tasklog.file_only(f"Backup started at {datetime.fromtimestamp(started):%Y-%m-%d %H:%M:%S}")
            try:
                try:
                    try:
                        await self.execute()
                    except PreviousArchiveError as exc:
                        # Nothing of the damaged archive may reach the new one: start over, reading everything.
                        tasklog.warn(str(exc))
                        self._reset(full_reason=str(exc))
                        await self.execute()
                    await self.hook("backup-end")
                finally:
                    await self._restart_hooks()
            except asyncio.CancelledError:
                tasklog.error(f"Backup of VM {req.vmid} failed - interrupted by signal")
                await _quietly(self.hook("backup-abort"), tasklog)
                raise
            except (QmpBackupError, OSError) as exc:  # OSError: the dump storage (full, gone, read-only)
                result.error = _describe(exc)
                tasklog.error(f"Backup of VM {req.vmid} failed - {result.error}")
                tasklog.file_only(f"Failed at {datetime.now():%Y-%m-%d %H:%M:%S}")
                await _quietly(self.hook("backup-abort"), tasklog)
            else:
                result.status = "ok"
                tasklog.info(f"Finished Backup of VM {req.vmid} ({render_hms(time.time() - started)})")
                tasklog.file_only(f"Backup finished at {datetime.now():%Y-%m-%d %H:%M:%S}")
        finally:
            result.duration_s = round(time.time() - started, 3)
            result.warnings = list(tasklog.warnings)
            tasklog.close()
        await _quietly(self.hook("log-end"), None)
        return result

    async def hook(self, phase: str) -> None:
        if self.req.hooks is not None:
            await self.req.hooks.guest_phase(phase, self.guest)

    async def _restart_hooks(self) -> None:
        """vzdump runs ``pre-restart``/``post-restart`` of suspend and stop mode in its clean-up step:
        after ``backup-end``, before ``backup-abort``, whenever the guest was resumed or started
        again (here it already runs again by then); their failures are only warnings."""
        access = self.access
        suspended = self.mode == "suspend" and access is not None and access.running and self.status == "running"
        if suspended or (access is not None and access.stopped_by_us):
            await _quietly(self.hook("pre-restart"), self.tasklog)
            await _quietly(self.hook("post-restart"), self.tasklog)

    def _enter(self, state: RunState) -> None:
        log.debug("VM %d: %s -> %s", self.req.vmid, self.state.value, state.value)
        self.state = state
        self.history.append(state)

    async def execute(self) -> None:
        """All phases; the teardown runs on every way out (the stack unwinds in reverse)."""
        try:
            async with contextlib.AsyncExitStack() as teardown:
                try:
                    await self._prepare(teardown)
                    self._enter(RunState.PREPARED)
                    await self._attach(teardown)
                    self._enter(RunState.ATTACHED)
                    await self._start_and_transfer()
                    await self._finish()
                    self._enter(RunState.FINISHED)
                except BaseException:
                    self.failed_in = self.state
                    self._enter(RunState.FAILED)
                    raise
        finally:
            self.history.append(RunState.TORN_DOWN)
            if self.state is not RunState.FAILED:
                self.state = RunState.TORN_DOWN
        if self.req.stdout is None:
            self._after_archive()

    # -- prepare --------------------------------------------------------------------------

    async def _prepare(self, teardown: contextlib.AsyncExitStack) -> None:
        req, tasklog, opts = self.req, self.tasklog, self.req.options
        if not opts.remove and req.stdout is None:  # vzdump's retention pre-check, before anything else
            check_backup_limit(req.dump_dir, req.vmid, opts.effective_prune)
        # Open (and locked) before QEMU is reached: stop mode journals its shutdown and instant copies there.
        journal = Journal.open(journal_path(req.state_dir, req.vmid))
        teardown.callback(journal.close)
        leftovers = {e.id for e in journal.pending()}
        await _start_left_stopped(journal, leftovers, req.vmid, req.state_dir, tasklog)
        if not vm_is_running(req):  # as vzdump: a stopped VM is backed up (and its hooks run) in stop mode
            self.mode = "stop"
            self.guest = dataclasses.replace(self.guest, mode="stop")
        access = self.access = await teardown.enter_async_context(reach_qemu(req, tasklog, self.hook, journal))
        session, running = access.session, access.running
        if running:
            self.status = (await session.execute("query-status"))["status"]
            tasklog.info("status = running")

        sessions = Sessions(req.vmid, session)

        def leftover(entry: Entry) -> bool:  # an earlier run's stopped-vm is undone before QEMU is reached
            return entry.id in leftovers and entry.kind != kinds.STOPPED_VM.name

        if any(leftover(e) for e in journal.pending()):
            tasklog.warn("cleaning up what an earlier run of this VM left behind")
            for failure in await replay(journal, sessions, info=tasklog.info, say=tasklog.warn, only=leftover):
                tasklog.warn(failure)
        journal.bind(sessions.current_qemu)
        teardown.push_async_callback(_final_unwind, journal, sessions, tasklog, leftovers)
        await hold("journal")

        caps = await probe(session)
        disks = await discover_disks(session, str(req.vmid))
        definition = self.definition = req.definition or guest_from_running(req.vmid, req.qmp or Path(), req.qga,
                                                                            disks)
        if definition.name:
            tasklog.info(f"VM Name: {definition.name}")
        chosen = _select_disks(definition, disks, tasklog)

        self.mode = opts.mode if running else "stop"
        self.guest = dataclasses.replace(self.guest, mode=self.mode)  # the hooks say what the log says
        tasklog.info(f"backup mode: {self.mode}")
        if opts.bwlimit_kib:
            tasklog.info(f"bandwidth limit: {opts.bwlimit_kib} KiB/s")
        tasklog.info(f"ionice priority: {opts.ionice}")
        await self._hooks_before_backup(access)

        maps = [DiskMap(d.key, vma_device_name(d.key), "", d.format) for d in chosen]
        self._configs = [("qemu-server.conf", assemble(definition.proxmox_text, maps))]
        tasklog.info(f"creating vzdump archive '{'-' if req.stdout is not None else self.archive}'")

        rundir = teardown.enter_context(run_folder(journal, req.vmid))
        self.run = RunContext(
            vmid=req.vmid, session=session, journal=journal, caps=caps, disks=chosen, rundir=rundir,
            running=running and self.mode != "stop", archive_uuid=uuid.uuid4(), dump_dir=req.dump_dir,
            to_stdout=req.stdout is not None, log=tasklog, full_reason=self.full_reason,
            sources={d.key: d.top_node for d in chosen})

    async def _hooks_before_backup(self, access: QemuAccess) -> None:
        if not access.stopped_by_us:
            await self.hook("backup-start")
        if self.mode in ("snapshot", "suspend"):
            await self.hook("pre-stop")
        if self.mode == "snapshot":  # vzdump runs these before the freeze for QEMU in snapshot mode
            await self.hook("pre-restart")
            await self.hook("post-restart")

    # -- attach ---------------------------------------------------------------------------

    async def _attach(self, teardown: contextlib.AsyncExitStack) -> None:
        run, req = self._context(), self.req
        for feature in self.features:
            teardown.push_async_exit(self._feature_teardown(feature))
            reroute = await feature.attach(run)
            if reroute:
                run.sources.update(reroute)
                run.snapshot_in_transaction = False
                await hold("prepared")
        self.jobs = plan_block_jobs(req.vmid, [(d.key, run.sources[d.key], d.size) for d in run.disks])
        devices = [DeviceSpec(j.key, vma_device_name(j.key), j.size, j.export) for j in self.jobs]

        teardown.push_async_exit(self._archive)  # on failure: endpoint stopped, .dat removed
        if req.stdout is not None:
            out = req.stdout
        else:  # the partial archive is journaled before it exists
            self._archive.enter_context(journaled_output(run.journal, temp_name(self.archive)))
            out = self._archive.enter_context(
                atomic_output(self.archive, temp_name(self.archive), ionice=req.options.ionice))
        datapath = self.datapath = ArchiveDataPath(
            out, self.compression, compress_options(req.options), self._configs, devices, run.rundir / "nbd.sock",
            str(req.vmid), archive_uuid=run.archive_uuid, wrap=self._wrap)
        self._archive.push_async_exit(_abort_on_error(datapath))
        await datapath.server.start()
        await attach_targets(run.session, run.journal, self.jobs, datapath.server.path, run.caps)
        await hold("attached")

    def _wrap(self, device: DeviceSpec, consumer: ExportConsumer) -> ExportConsumer:
        for feature in self.features:
            consumer = feature.wrap_consumer(device.key, consumer)
        return consumer

    def _feature_teardown(self, feature: Feature) -> Callable[
            [type[BaseException] | None, BaseException | None, TracebackType | None], Awaitable[bool]]:
        """Tears ``feature`` down; its failure is the run's error only if the run had none."""

        async def exit_(exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
            try:
                await hold("teardown")
                await feature.teardown()
            except Exception as teardown_exc:
                if exc is None:
                    raise
                self.tasklog.warn(f"cleanup after the failure: {_describe(teardown_exc)}")
            return False

        return exit_

    # -- window, start, transfer ----------------------------------------------------------

    async def _start_and_transfer(self) -> None:
        run, req, datapath = self._context(), self.req, self._datapath()
        assert self.definition is not None
        opts = req.options
        async with BlockJobs(run.session, run.journal, self.jobs, run.caps, limit_bps=opts.bwlimit_kib * 1024,
                             max_workers=opts.performance.max_workers) as block_jobs:
            async with consistency_window(run.session, run.journal, self.tasklog, vmid=req.vmid,
                                          definition=self.definition,
                                          qga=req.qga or self.definition.reach.qga,
                                          mode=self.mode, status=self.status,
                                          task_id=str(run.archive_uuid)) as window:
                for feature in self.features:
                    await feature.at_snapshot_point(run)
                if not run.snapshot_in_transaction:
                    await hold("snapshot")
                await block_jobs.start([a for f in self.features for a in f.actions()],
                                       merged_job_args(*(f.job_args() for f in self.features)))
                await hold("started")
            self.result.freeze_window_s = window.frozen_for_s
            await hold("running")
            self._enter(RunState.STARTED)
            self._transfer_started = time.monotonic()
            progress = self._progress = Progress(total_bytes=sum(j.size for j in self.jobs),
                                                 started=self._transfer_started, interval_s=PROGRESS_INTERVAL_S)
            try:
                async for job_progress in block_jobs.progress():
                    datapath.server.check()  # the endpoint failed: stop the block jobs
                    stats = datapath.stats()
                    line = progress.line(time.monotonic(), stats.received, stats.zero,
                                         done=_accounted(self.jobs, job_progress))
                    if line:
                        self.tasklog.info(line)
            except BlockJobError as exc:
                datapath.server.check()  # the endpoint's failure is the cause, not its effect
                for feature in self.features:
                    clearer = feature.explain(exc.key, exc.error)
                    if clearer is not None:
                        raise clearer from exc
                raise
        self._enter(RunState.TRANSFERRED)

    # -- finish ---------------------------------------------------------------------------

    async def _finish(self) -> None:
        run, datapath, progress, tasklog = self._context(), self._datapath(), self._progress, self.tasklog
        assert progress is not None
        await detach_targets(run.session, run.journal, self.jobs)
        await hold("detached")
        reused = 0
        for feature in self.features:
            reused += await feature.complete_archive(run, datapath)
        await datapath.finish()
        await hold("finished")
        stats = datapath.stats()
        last = progress.final(time.monotonic(), stats.received, stats.zero) if self.jobs else None
        if last:
            tasklog.info(last)
        elapsed = time.monotonic() - self._transfer_started
        await self._archive.aclose()  # fsync, rename: the archive is published
        datapath.publish_index(self.archive if self.req.stdout is None else None)
        await hold("published")
        stats = datapath.stats()
        self.result.bytes_read, self.result.zero_bytes = stats.received, stats.zero
        self.result.written_bytes = stats.written
        self.result.bytes_reused = reused
        received = {j.key: datapath.assemblers[j.export].stats.bytes_received for j in self.jobs}
        for feature in self.features:
            for line in feature.closing_lines(received):
                tasklog.info(line)
        for line in closing_lines(sum(j.size for j in self.jobs), stats.zero, elapsed):
            tasklog.info(line)
        for feature in self.features:
            for warning in await feature.commit(run):
                tasklog.warn(warning)

    def _after_archive(self) -> None:
        """Archive size, notes, protection and prune (vzdump's steps 14 and 15), after the teardown."""
        req, opts, tasklog, archive = self.req, self.req.options, self.tasklog, self.archive
        assert self.definition is not None
        self.result.archive = str(archive)
        self.result.archive_size = archive.stat().st_size
        tasklog.info(f"archive file size: {render_archive_size(self.result.archive_size)}")
        if opts.notes_template:
            tasklog.info("adding notes to backup")
            try:
                text = render_notes(opts.notes_template, cluster=None, guestname=self.definition.name,
                                    node=req.node, vmid=req.vmid)
                write_notes(archive, text)
            except QmpBackupError as exc:
                tasklog.warn(f"unable to add notes - {exc}")
        if opts.protected:
            tasklog.info("marking backup as protected")
            protect(archive)
        if opts.remove:
            prune_after_backup(req.dump_dir, req.vmid, opts.effective_prune, tasklog.info, req.storeid)

    def _context(self) -> RunContext:
        assert self.run is not None, f"{self!r}: not prepared"
        return self.run

    def _datapath(self) -> ArchiveDataPath:
        assert self.datapath is not None, f"{self!r}: not attached"
        return self.datapath


def _abort_on_error(datapath: ArchiveDataPath) -> Callable[
        [type[BaseException] | None, BaseException | None, TracebackType | None], Awaitable[bool]]:
    async def exit_(exc_type: type[BaseException] | None, exc: BaseException | None,
                    tb: TracebackType | None) -> bool:
        if exc is not None:
            await datapath.abort()
        return False

    return exit_


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


async def _start_left_stopped(journal: Journal, leftovers: set[int], vmid: int, state_dir: Path,
                              tasklog: TaskLog) -> None:
    """Start the VM first if an earlier stop-mode run shut it down and died before starting it again
    (a ``stopped-vm`` entry), so that this run finds it running as that run did: that run's QEMU
    on its disks is killed and its instant copies dropped first (newest first, as always). A VM
    that cannot be started is backed up as a stopped one; the entry stays for ``qmpbackup cleanup``."""
    if not any(e.kind == kinds.STOPPED_VM.name for e in journal.pending() if e.id in leftovers):
        return
    tasklog.warn("cleaning up what an earlier run of this VM left behind")
    await asyncio.to_thread(kill_orphans, state_dir, vmid=vmid)
    for failure in await replay(journal, None, info=tasklog.info,
                                steps=lambda s: undo_steps(s, say=tasklog.warn, state_dir=state_dir),
                                only=lambda e: e.id in leftovers and e.kind in _ACCESS_KINDS):
        tasklog.warn(failure)


#: What ``reach_qemu`` records and undoes itself (the next run: :func:`_start_left_stopped`).
_ACCESS_KINDS = frozenset({kinds.INSTANT_COPY.name, kinds.STOPPED_VM.name})


async def _final_unwind(journal: Journal, sessions: Sessions, tasklog: TaskLog, leftovers: set[int]) -> None:
    """Undo whatever is still recorded; runs shielded so a second signal cannot cut it short.

    This run's instant copies and shutdown are not undone here: the QEMU reading the copies (or
    the VM's own disks) still runs, and ``reach_qemu`` ends it before it drops them and starts the
    VM again. An earlier run's ``stopped-vm`` is only ever undone before QEMU is reached."""

    def ours_now(entry: Entry) -> bool:
        return entry.kind not in _ACCESS_KINDS or (entry.kind == kinds.INSTANT_COPY.name and entry.id in leftovers)

    if not any(ours_now(e) for e in journal.pending()):
        return
    task = asyncio.ensure_future(replay(journal, sessions, info=tasklog.info, say=tasklog.warn, only=ours_now))
    try:
        failures = await asyncio.shield(task)
    except asyncio.CancelledError:
        failures = await task
        for failure in failures:
            tasklog.warn(failure)
        raise
    for failure in failures:
        tasklog.warn(failure)
