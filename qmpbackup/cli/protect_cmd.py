"""``qmpbackup protect|unprotect ARCHIVE``: keep a backup safe from prune and removal."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qmpbackup.cli.common import Context, integer_arg
from qmpbackup.errors import UsageError
from qmpbackup.jobs.target import storage_of_dir
from qmpbackup.store.names import parse_backup_name
from qmpbackup.store.protection import UNLIMITED, protect, unprotect


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("protect", parents=[common], help="protect a backup from prune and removal")
    p.add_argument("archive", metavar="ARCHIVE", type=Path, help="the backup archive file")
    p.add_argument(
        "--max-protected-backups",
        type=integer_arg(-1),
        metavar="N",
        help="most protected backups per VM in this directory (-1 = unlimited; default: the "
        "storage's max-protected-backups, else unlimited)",
    )
    p.set_defaults(run=run_protect)
    u = subparsers.add_parser("unprotect", parents=[common], help="remove a backup's protection")
    u.add_argument("archive", metavar="ARCHIVE", type=Path, help="the backup archive file")
    u.set_defaults(run=run_unprotect)


def _archive(path: Path) -> Path:
    if not path.is_file():
        raise UsageError(f"backup {path} does not exist")
    if parse_backup_name(path.name) is None:
        raise UsageError(f"{path.name} is not a vzdump backup name")
    return path


def run_protect(args: argparse.Namespace, ctx: Context) -> int:
    archive = _archive(args.archive)
    limit = args.max_protected_backups
    if limit is None:
        storage = storage_of_dir(ctx.config_dir, archive.parent)
        if storage is not None and storage.max_protected_backups is not None:
            limit = storage.max_protected_backups
    if limit is not None and limit < -1:
        raise UsageError("--max-protected-backups must be -1 or more")
    changed = protect(archive, UNLIMITED if limit is None else limit)
    print(f"{archive.name}: {'protected' if changed else 'already protected'}")
    return 0


def run_unprotect(args: argparse.Namespace, ctx: Context) -> int:
    archive = _archive(args.archive)
    changed = unprotect(archive)
    print(f"{archive.name}: {'unprotected' if changed else 'was not protected'}")
    return 0
