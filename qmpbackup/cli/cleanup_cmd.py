"""``qmpbackup cleanup [VMID]``: remove what crashed or killed runs left behind.

Replays each VM's journal (the nodes, filters, exports and jobs in its QEMU; the device
back on its own node; fleecing images), then looks for leftovers by name (when the
journal is gone), deletes ``vm-<vmid>-fleece-*`` files on file storages, kills QEMUs we
spawned whose run died, and starts a VM that a killed stop-mode run left shut down. A live
restore whose copy did not finish is named with the command that finishes it
(``restore --live --resume``): it is not undone. Without VMID: every VM that
has a journal or a live restore state, then the host journals
(:mod:`qmpbackup.mount.host_journal`): ``export --daemon`` processes, and killed ``mount`` runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qmpbackup.cli.common import Context, add_output_format, print_json
from qmpbackup.errors import ConfigError, QmpBackupError
from qmpbackup.file_restore.client import stop_all
from qmpbackup.guest_config import check_vmid, guest_path, load_guest
from qmpbackup.jobs.lock import DEFAULT_RUN_DIR
from qmpbackup.jobs.storage_cfg import load_storage_cfg
from qmpbackup.mount.host_journal import HostCleanup, cleanup_host
from qmpbackup.recovery.cleanup import CleanupReport, cleanup_vm, kill_spawned_orphans
from qmpbackup.recovery.state import DEFAULT_STATE_DIR, journaled_vmids
from qmpbackup.restore.errors import RestoreRefusedError
from qmpbackup.restore.live_state import interrupted_live_restore, live_restore_vmids, resume_command
from qmpbackup.restore.phases import restore_lock


class CleanupIncomplete(QmpBackupError):
    """Some leftovers could not be removed (they stay recorded; run cleanup again)."""


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("cleanup", parents=[common],
                              help="remove nodes, filters, exports and fleecing images left by crashed runs")
    p.add_argument("vmid", nargs="?", metavar="VMID", help="only this VM (default: every VM with a journal)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"where journals and spawn records live (default {DEFAULT_STATE_DIR})")
    p.add_argument("--qmp", type=Path, metavar="SOCKET",
                   help="the VM's QMP socket (default: from its guest definition); needs VMID")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, metavar="DIR",
                   help=f"file-restore helpers left running there are ended too, and interrupted live restores "
                        f"named (default {DEFAULT_RUN_DIR})")
    add_output_format(p)
    p.set_defaults(run=run)


def _qmp_socket(ctx: Context, vmid: int, given: Path | None) -> Path | None:
    if given is not None:
        return given
    if not guest_path(ctx.config_dir, vmid).exists():
        return None
    return load_guest(ctx.config_dir, vmid).reach.qmp


def _interrupted_live_restore(ctx: Context, vmid: int, run_dir: Path) -> list[str]:
    """A live restore whose copy did not finish is not a leftover to undo (its VM runs on the new
    images, and only the copy makes them whole): cleanup names the command that finishes it."""
    if interrupted_live_restore(vmid, run_dir) is None:
        return []
    try:
        with restore_lock(ctx.config_dir, vmid):
            pass
    except RestoreRefusedError:
        return []  # its restore runs: that process finishes the copy
    return [f"its live restore is interrupted (its disks are not fully copied yet); finish it with: "
            f"{resume_command(vmid, run_dir)}"]


async def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.qmp is not None and args.vmid is None:
        raise ConfigError("--qmp needs a VMID")
    state_dir: Path = args.state_dir
    if args.vmid is not None:
        vmids = [check_vmid(args.vmid)]
    else:
        vmids = sorted(set(journaled_vmids(state_dir)) | set(live_restore_vmids(args.run_dir)))
    storages = load_storage_cfg(ctx.config_dir)
    reports: list[CleanupReport] = []
    for vmid in vmids:
        report = await cleanup_vm(vmid, state_dir, _qmp_socket(ctx, vmid, args.qmp), storages)
        report.failures += _interrupted_live_restore(ctx, vmid, args.run_dir)
        reports.append(report)
    killed = kill_spawned_orphans(state_dir)
    if args.vmid is None:
        killed += [f"ended file-restore helper {name}" for name in await stop_all(args.run_dir)]
    host = await cleanup_host(state_dir) if args.vmid is None else HostCleanup()
    if getattr(args, "output_format", "text") == "json":
        print_json({"vms": [r.as_json() for r in reports], "killed": killed,
                    "host": {"actions": host.actions, "failures": host.failures}})
    else:
        for r in reports:
            for line in r.actions:
                sys.stdout.write(f"VM {r.vmid}: {line}\n")
            for line in r.failures:
                sys.stdout.write(f"VM {r.vmid}: FAILED: {line}\n")
            if not r.actions and not r.failures:
                sys.stdout.write(f"VM {r.vmid}: nothing to clean up\n")
        for line in killed + host.actions:
            sys.stdout.write(f"{line}\n")
        for line in host.failures:
            sys.stdout.write(f"FAILED: {line}\n")
    failures = [f"VM {r.vmid}: {f}" for r in reports for f in r.failures] + host.failures
    if failures:
        raise CleanupIncomplete(f"cleanup incomplete: {failures[0]}" +
                                (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
    return 0
