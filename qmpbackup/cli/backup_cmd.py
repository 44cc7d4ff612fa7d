"""``qmpbackup backup``: vzdump for QEMU VMs (options, names, units and defaults as vzdump's).

The command parses and prints; the backup job (:mod:`qmpbackup.jobs.backup_job`) resolves
the options (vzdump.conf < storage < job < command line), takes the host lock, runs the job
hooks and backs up the guests one at a time; a failed guest makes the exit status 1 while
the others still run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from qmpbackup.cli.common import (
    Context,
    add_output_format,
    add_target_arguments,
    print_json_line,
    quiet_stderr,
    target_options,
    vmid_arg,
)
from qmpbackup.errors import EXIT_FAILED, EXIT_OK
from qmpbackup.jobs.backup_job import JobRequest, plan_backup_job, run_backup_job
from qmpbackup.jobs.lock import DEFAULT_RUN_DIR, stop_running_job
from qmpbackup.recovery.state import DEFAULT_STATE_DIR

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


async def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.stop:
        pid = stop_running_job(args.run_dir)
        task.info("no backup job is running" if pid is None else f"stopped backup job (pid {pid})")
        return EXIT_OK
    plan = plan_backup_job(JobRequest(
        config_dir=ctx.config_dir, options=_cli_options(args), state_dir=args.state_dir, vmids=tuple(args.vmids),
        all_guests=args.all, job_id=args.job_id, qmp=args.qmp, qga=args.qga, run_dir=args.run_dir,
        stdout=sys.stdout.buffer))
    if plan.options.quiet:
        quiet_stderr()
    outcome = await run_backup_job(plan)
    if args.output_format == "json" and not plan.options.stdout:
        for result in outcome.results:  # one object per guest, one per line
            print_json_line(result.as_json())
    return EXIT_FAILED if outcome.failed else EXIT_OK
