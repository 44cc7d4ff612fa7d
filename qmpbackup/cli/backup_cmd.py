"""``qmpbackup backup``: vzdump for QEMU VMs (options, names, units and defaults as vzdump's).

The command resolves the options (vzdump.conf < storage < job < command line),
takes the host lock, runs the job hooks and backs up the guests one at a time;
a failed guest makes the exit status 1 while the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from fleecing.storage import fleecing_storage
from qmpbackup.backup.guest_backup import GuestRequest, GuestResult, backup_guest
from qmpbackup.cli.common import (
    Context,
    add_output_format,
    add_target_arguments,
    print_json_line,
    quiet_stderr,
    target_options,
    vmid_arg,
)
from qmpbackup.errors import EXIT_FAILED, EXIT_OK, QmpBackupError, UsageError
from qmpbackup.guest_config import GuestDefinition, guest_path, load_guest
from qmpbackup.jobs.command_line import vzdump_command_line
from qmpbackup.jobs.hooks import HookRunner
from qmpbackup.jobs.jobs_cfg import find_job, load_jobs_cfg
from qmpbackup.jobs.lock import DEFAULT_RUN_DIR, HostLock, stop_running_job
from qmpbackup.jobs.notify import GuestResult as MailGuest
from qmpbackup.jobs.notify import JobReport, notify
from qmpbackup.jobs.storage_cfg import load_storage_cfg
from qmpbackup.jobs.target import Target, resolve_target
from qmpbackup.jobs.vzdump_conf import VzdumpOptions
from qmpbackup.recovery.state import DEFAULT_STATE_DIR
from qmpbackup.store.protection import count_protected

log = logging.getLogger(__name__)
task = logging.getLogger("qmpbackup.task")


# Command-line options that are vzdump options, passed on as text: (flag, vzdump key, help).
VZDUMP_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--mode", "mode", "snapshot | suspend | stop (default snapshot)"),
    ("--compress", "compress", "0 | 1 | gzip | lzo | zstd (default 0: none; 1 = lzo)"),
    ("--zstd", "zstd", "zstd threads; 0 = half the CPUs (default 1)"),
    ("--pigz", "pigz", "gzip through pigz with N threads; 1 = half the CPUs (default 0: gzip)"),
    ("--bwlimit", "bwlimit", "read limit in KiB/s; 0 = unlimited (default 0)"),
    ("--ionice", "ionice", "I/O priority 0..8, 8 = idle class (default 7)"),
    ("--performance", "performance", "max-workers=N (default 16; accepted for vzdump's sake)"),
    ("--fleecing", "fleecing", "enabled=0|1,storage=ID: guest writes go to a temporary image (default off)"),
    ("--dirty-bitmap", "dirty-bitmap", "0 | 1: read only what changed since the last archive (default 1)"),
    ("--notes-template", "notes-template",
     "text of <archive>.notes: {{cluster}} {{guestname}} {{node}} {{vmid}} (default none)"),
    ("--protected", "protected", "0 | 1: mark the backup protected (default 0)"),
    ("--script", "script", "hook script run at each phase (default none)"),
    ("--lockwait", "lockwait", "minutes to wait for the host lock (default 180)"),
    ("--stopwait", "stopwait", "minutes to wait for a clean shutdown in stop mode (default 10)"),
    ("--remove", "remove", "0 | 1: prune older backups afterwards (default 1)"),
    ("--prune-backups", "prune-backups",
     "keep-last=N,keep-hourly=N,…,keep-all=1 (default: the storage's, else keep-all=1)"),
    ("--maxfiles", "maxfiles", "deprecated: keep-last=N (use --prune-backups)"),
    ("--exclude", "exclude", "VMIDs to leave out; without VMIDs or --all it means all but these"),
    ("--pool", "pool", "not supported: guest definitions name no pool (refused)"),
    ("--node", "node", "run only on the host with this name; elsewhere do nothing (default: any)"),
    ("--quiet", "quiet", "0 | 1: only warnings and errors on stderr; the logs stay complete (default 0)"),
    ("--mailto", "mailto", "addresses for the status mail, comma-separated (default none)"),
    ("--mailnotification", "mailnotification", "always | failure (default always)"),
    ("--notification-mode", "notification-mode",
     "auto | legacy-sendmail | notification-system; only mail is sent (default auto)"),
    ("--tmpdir", "tmpdir", "accepted; unused (archives are written in place as .dat)"),
    ("--exclude-path", "exclude-path", "containers only: ignored for VMs"),
    ("--stdexcludes", "stdexcludes", "containers only: ignored for VMs"),
)


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "backup",
        parents=[common],
        help="back up VMs into VMA archives, as vzdump does",
        description="Back up QEMU VMs into Proxmox VMA archives (vzdump-qemu-<vmid>-<time>.vma[.zst|.gz|.lzo]). "
        "A running VM is reached by --qmp/--qga or its guest definition (<config-dir>/guests/<vmid>.conf); "
        "a stopped VM needs its definition.",
    )
    p.add_argument("vmids", nargs="*", type=vmid_arg, metavar="VMID", help="the VMs to back up")
    p.add_argument("--all", action="store_true",
                   help="every VM with a guest definition (no VMIDs with it; default off)")
    add_target_arguments(p)
    for flag, key, text in VZDUMP_FLAGS:
        p.add_argument(flag, dest=key.replace("-", "_"), metavar="VALUE", help=text)
    p.add_argument("--stdout", action="store_true", help="write the archive of one VM to standard output")
    p.add_argument("--qmp", type=Path, metavar="PATH", help="QMP socket of a running VM (one VMID)")
    p.add_argument("--qga", type=Path, metavar="PATH", help="guest agent socket of that VM")
    p.add_argument("--job-id", metavar="ID", help="run the options and guests of a jobs.cfg job")
    p.add_argument("--stop", action="store_true", help="stop the running backup job (its cleanup runs)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"journals and records of spawned QEMUs (default {DEFAULT_STATE_DIR})")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, metavar="DIR",
                   help=f"host lock and pid file (default {DEFAULT_RUN_DIR})")
    add_output_format(p)
    p.set_defaults(run=run)


def _cli_options(args: argparse.Namespace) -> dict[str, str]:
    options = target_options(args)
    for _flag, key, _text in VZDUMP_FLAGS:
        value = getattr(args, key.replace("-", "_"))
        if value is not None:
            options[key] = value
    if args.stdout:
        options["stdout"] = "1"
    return options


def _guests(args: argparse.Namespace, ctx: Context, job_vmids: tuple[int, ...], job_all: bool,
            exclude: tuple[int, ...]) -> list[int]:
    if args.vmids and (args.all or job_all):
        raise UsageError("give VMIDs or --all, not both")
    vmids = list(args.vmids) or list(job_vmids)
    if args.all or job_all or (exclude and not vmids):  # vzdump: --exclude alone means all but these
        folder = ctx.config_dir / "guests"
        found = sorted(int(p.stem) for p in folder.glob("*.conf") if p.stem.isdigit()) if folder.is_dir() else []
        vmids = sorted(set(vmids) | set(found))
    vmids = [v for v in sorted(dict.fromkeys(vmids)) if v not in exclude]
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


def _send_mail(opts: VzdumpOptions, results: list[GuestResult], definitions: dict[int, GuestDefinition | None],
               job_id: str | None, seconds: float, cmdline: str) -> None:
    """vzdump's status mail (``mailto``, ``mailnotification``); a failure to send only warns."""
    guests = []
    for r in results:
        lines: list[str] = []
        if r.log:
            with contextlib.suppress(OSError):
                lines = Path(r.log).read_text(errors="replace").splitlines()
        definition = definitions.get(r.vmid)
        guests.append(MailGuest(vmid=r.vmid, ok=r.status == "ok", duration_s=r.duration_s,
                                name=definition.name if definition else None, size=r.archive_size,
                                filename=r.archive, error=r.error, log_lines=lines))
    report = JobReport(hostname=os.uname().nodename, cmdline=cmdline,
                       guests=guests, total_time_s=seconds, job_id=job_id)
    try:
        notify(opts, report)
    except QmpBackupError as exc:
        task.warning("%s", exc)


async def _quiet_job_abort(hooks: HookRunner) -> None:
    try:
        await hooks.job_phase("job-abort")
    except QmpBackupError as exc:
        log.warning("%s", exc)


def _definition(ctx: Context, vmid: int, qmp: Path | None) -> GuestDefinition | None:
    if guest_path(ctx.config_dir, vmid).exists():
        return load_guest(ctx.config_dir, vmid)
    if qmp is None:
        load_guest(ctx.config_dir, vmid)  # raises the clear "no guest definition" error
    return None


async def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.stop:
        pid = stop_running_job(args.run_dir)
        task.info("no backup job is running" if pid is None else f"stopped backup job (pid {pid})")
        return EXIT_OK
    job = find_job(load_jobs_cfg(ctx.config_dir), args.job_id) if args.job_id else None
    cli_options = _cli_options(args)
    target = resolve_target(ctx.config_dir, cli_options, job.options if job else None)
    opts = target.options
    if opts.quiet:
        quiet_stderr()
    if opts.pool is not None:
        raise UsageError("--pool: pools are not supported (guest definitions name no pool); give VMIDs or --all")
    here = os.uname().nodename
    if opts.node is not None and opts.node != here:
        task.info(f"skipping backup job: it is for node '{opts.node}', this is '{here}'")
        return EXIT_OK
    vmids = _guests(args, ctx, opts.vmid, opts.all, opts.exclude)
    if opts.protected:
        _check_protected_room(target, vmids)
    if (args.qmp or args.qga) and len(vmids) != 1:
        raise UsageError("--qmp/--qga name the sockets of one VM: give exactly one VMID")
    if opts.stdout and len(vmids) != 1:
        raise UsageError("--stdout writes one archive: give exactly one VMID")
    definitions = {vmid: _definition(ctx, vmid, args.qmp) for vmid in vmids}
    fleece_storage = None
    if opts.fleecing.enabled:
        if not opts.fleecing.storage:
            raise UsageError("fleecing enabled=1 needs storage=ID (a storage of storage.cfg)")
        fleece_storage = fleecing_storage(load_storage_cfg(ctx.config_dir), opts.fleecing.storage)
    hooks = HookRunner(opts.script, storeid=target.storage.storeid if target.storage else None,
                       dumpdir=target.dump_dir, on_output=task.info) if opts.script else None

    if hooks:
        await hooks.job_phase("job-init", explicit_dumpdir=opts.dumpdir is not None)
    written = {**(job.text if job else {}), **cli_options, **({"job-id": job.id} if job else {})}
    cmdline = vzdump_command_line(args.vmids or opts.vmid, bool(args.all or opts.all), written)
    lock = HostLock(args.run_dir)
    await lock.acquire_async(opts.lockwait_min * 60)
    results: list[GuestResult] = []
    started = time.monotonic()
    try:
        task.info(f"starting new backup job: {cmdline}")
        if hooks:
            try:
                await hooks.job_phase("job-start")
            except BaseException:
                await _quiet_job_abort(hooks)
                raise
        for vmid in vmids:
            request = GuestRequest(
                vmid=vmid,
                options=opts,
                dump_dir=target.dump_dir,
                storeid=target.storage.storeid if target.storage else None,
                definition=definitions[vmid],
                qmp=args.qmp,
                qga=args.qga,
                state_dir=args.state_dir,
                stdout=sys.stdout.buffer if opts.stdout else None,
                hooks=hooks,
                fleecing_storage=fleece_storage,
            )
            results.append(await backup_guest(request))
        failed = [r for r in results if r.status != "ok"]
        if hooks:
            await hooks.job_phase("job-abort" if failed else "job-end")
        task.info("Backup job finished with errors" if failed else "Backup job finished successfully")
    finally:
        lock.release()
    _send_mail(opts, results, definitions, args.job_id, time.monotonic() - started, cmdline)
    if args.output_format == "json" and not opts.stdout:
        for result in results:  # one object per guest, one per line
            print_json_line(result.as_json())
    return EXIT_FAILED if any(r.status != "ok" for r in results) else EXIT_OK
