"""``qmpbackup prune``: apply a retention to each VM's backups in a dump directory (or one VM's)."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from qmpbackup.cli.common import (
    Context,
    add_output_format,
    add_target_arguments,
    print_json,
    target_options,
    vmid_arg,
)
from qmpbackup.jobs.target import resolve_target
from qmpbackup.store.dumpdir import apply_prune, list_backups, plan_prune
from qmpbackup.store.prune import Mark, counts

log = logging.getLogger(__name__)


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "prune",
        parents=[common],
        help="remove a VM's backups that the retention does not keep",
        description="Mark a VM's backups keep/remove/protected/renamed as Proxmox's prune does, "
        "and remove those marked remove (with their .log and .notes).",
    )
    p.add_argument("--vmid", type=vmid_arg,
                   help="only this VM's backups (default: every VM's, each group on its own)")
    add_target_arguments(p)
    p.add_argument("--prune-backups", metavar="SPEC", help="e.g. keep-last=3,keep-daily=7 (default: storage, "
                   "then vzdump.conf, then keep-all=1)")
    p.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    add_output_format(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    options = target_options(args)
    if args.prune_backups is not None:
        options["prune-backups"] = args.prune_backups
    target = resolve_target(ctx.config_dir, options)
    retention = target.options.effective_prune
    vmids = [args.vmid] if args.vmid is not None else sorted({b.name.vmid for b in list_backups(target.dump_dir)})
    planned = [(vmid, entry) for vmid in vmids for entry in plan_prune(target.dump_dir, vmid, retention)]
    entries = [entry for _vmid, entry in planned]
    if retention.keeps_everything():
        log.info("no prune selection - keeping all files")
    else:
        log.info("prune older backups with retention: %s", retention.render())
    if not args.dry_run:
        removed = apply_prune(entries)
        log.info("pruned %d backup(s) not covered by keep-retention policy", len(removed))
    if args.output_format == "json":
        print_json([dict(e.as_json(), vmid=vmid, type="qemu") for vmid, e in planned])
        return 0
    prefix = "would " if args.dry_run else ""
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.ctime))
        mark = f"{prefix}remove" if e.mark is Mark.REMOVE else str(e.mark)
        print(f"{mark:<13} {when:<19}  {e.path.name}")
    tally = counts(e.mark for e in entries)
    verb = "to remove" if args.dry_run else "removed"
    print(f"{tally[Mark.KEEP]} kept, {tally[Mark.REMOVE]} {verb}, "
          f"{tally[Mark.PROTECTED]} protected, {tally[Mark.RENAMED]} renamed")
    return 0
