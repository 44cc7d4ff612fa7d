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

from qmpbackup.backup.guest_backup import GuestRequest, GuestResult, backup_guest
from qmpbackup.cli.common import (
    Context,
    add_output_format,
    add_target_arguments,
    print_json_line,
    target_options,
    vmid_arg,
)
from qmpbackup.errors import EXIT_FAILED, EXIT_OK, QmpBackupError, UsageError
from qmpbackup.guest_config import GuestDefinition, guest_path, load_guest
from fleecing.storage import fleecing_storage
from qmpbackup.jobs.hooks import HookRunner
from qmpbackup.jobs.jobs_cfg import find_job, load_jobs_cfg
from qmpbackup.jobs.notify import GuestResult as MailGuest
from qmpbackup.jobs.notify import JobReport, notify
from qmpbackup.jobs.lock import DEFAULT_RUN_DIR, HostLock, stop_running_job
from qmpbackup.jobs.storage_cfg import load_storage_cfg
from qmpbackup.jobs.target import resolve_target
from qmpbackup.jobs.vzdump_conf import VzdumpOptions

log = logging.getLogger(__name__)
task = logging.getLogger("qmpbackup.task")

DEFAULT_STATE_DIR = Path("/var/lib/qmpbackup")

# Command-line options that are vzdump options, passed on as text: (flag, vzdump key).
VZDUMP_FLAGS: tuple[tuple[str, str], ...] = (
    ("--mode", "mode"),
    ("--compress", "compress"),
    ("--zstd", "zstd"),
    ("--pigz", "pigz"),
    ("--bwlimit", "bwlimit"),
    ("--ionice", "ionice"),
    ("--performance", "performance"),
    ("--fleecing", "fleecing"),
    ("--dirty-bitmap", "dirty-bitmap"),
    ("--notes-template", "notes-template"),
    ("--protected", "protected"),
    ("--script", "script"),
    ("--lockwait", "lockwait"),
    ("--stopwait", "stopwait"),
    ("--remove", "remove"),
    ("--prune-backups", "prune-backups"),
    ("--exclude", "exclude"),
    ("--mailto", "mailto"),
    ("--mailnotification", "mailnotification"),
    ("--tmpdir", "tmpdir"),
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
    p.add_argument("--all", action="store_true", help="every VM with a guest definition")
    add_target_arguments(p)
    for flag, key in VZDUMP_FLAGS:
        p.add_argument(flag, dest=key.replace("-", "_"), metavar="VALUE", help=f"vzdump's '{key}' option")
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
    for _flag, key in VZDUMP_FLAGS:
        value = getattr(args, key.replace("-", "_"))
        if value is not None:
            options[key] = value
    if args.stdout:
        options["stdout"] = "1"
    return options


def _guests(args: argparse.Namespace, ctx: Context, job_vmids: tuple[int, ...], job_all: bool,
            exclude: tuple[int, ...]) -> list[int]:
    vmids = list(args.vmids) or list(job_vmids)
    if args.all or job_all:
        folder = ctx.config_dir / "guests"
        found = sorted(int(p.stem) for p in folder.glob("*.conf") if p.stem.isdigit()) if folder.is_dir() else []
        vmids = sorted(set(vmids) | set(found))
    vmids = [v for v in sorted(dict.fromkeys(vmids)) if v not in exclude]
    if not vmids:
        raise UsageError("no VM to back up: give VMIDs, --all or --job-id")
    return vmids


def _send_mail(opts: VzdumpOptions, results: list[GuestResult], definitions: dict[int, GuestDefinition | None],
               job_id: str | None, seconds: float) -> None:
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
    report = JobReport(hostname=os.uname().nodename, cmdline=" ".join(["qmpbackup", *sys.argv[1:]]),
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
    target = resolve_target(ctx.config_dir, _cli_options(args), job.options if job else None)
    opts = target.options
    vmids = _guests(args, ctx, opts.vmid, opts.all, opts.exclude)
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
    lock = HostLock(args.run_dir)
    await lock.acquire_async(opts.lockwait_min * 60)
    results: list[GuestResult] = []
    started = time.monotonic()
    try:
        task.info(f"starting new backup job: qmpbackup backup {' '.join(sys.argv[2:])}".rstrip())
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
    _send_mail(opts, results, definitions, args.job_id, time.monotonic() - started)
    if args.output_format == "json" and not opts.stdout:
        for result in results:  # one object per guest, one per line
            print_json_line(result.as_json())
    return EXIT_FAILED if any(r.status != "ok" for r in results) else EXIT_OK
