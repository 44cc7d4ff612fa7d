"""``qmpbackup restore ARCHIVE|- VMID``: Proxmox's ``qmrestore`` for this agent's guests."""

from __future__ import annotations

import argparse
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from qmpbackup.cli.common import Context, option_arg
from qmpbackup.errors import UsageError
from qmpbackup.guest_config import check_vmid
from qmpbackup.jobs.storage_cfg import (
    load_storage_cfg,
    restore_bwlimit_kib,
    storage_for_dir,
)
from qmpbackup.jobs.lock import DEFAULT_RUN_DIR
from qmpbackup.restore import RestoreOptions, restore
from qmpbackup.restore.live import live_restore, resume_live_restore
from qmpbackup.restore.malloc_tuning import keep_large_buffers


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "restore", parents=[common],
        help="restore a VMA archive as VM images plus a guest definition (like qmrestore)",
        description="Restore a VMA archive (any compression, or - for an uncompressed one on stdin) as the "
        "guest VMID: one image per disk, then <config-dir>/guests/VMID.conf. Nothing is replaced "
        "without --force, and a failed restore leaves nothing behind.",
    )
    p.add_argument("archive", metavar="ARCHIVE", help="archive file, or - to read from stdin")
    p.add_argument("vmid", metavar="VMID", nargs="?",
                   help="the VM id to restore as (100-999999999); with --live --resume the only argument")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target-dir", metavar="DIR", type=Path, help="write the images into this existing directory")
    where.add_argument("--storage", metavar="ID",
                       help="write the images to <path>/images/VMID of this storage.cfg storage "
                       "(default: the storage each disk's map line names, else 'local')")
    p.add_argument("--format", dest="image_format", choices=("raw", "qcow2"),
                   help="image format (default: the archive's, raw when unknown)")
    p.add_argument("--bwlimit", type=option_arg("bwlimit"), metavar="KiB/s",
                   help="read the archive at most this fast, 0 = no limit (default: the 'restore' (else "
                   "'default') bwlimit of the archive's and the target storage in storage.cfg, the lower; "
                   "else no limit)")
    p.add_argument("--force", action="store_true", help="replace an existing guest definition and images")
    p.add_argument("--unique", action="store_true", help="give the copy new MAC addresses and a new SMBIOS uuid")
    p.add_argument("--start", action="store_true",
                   help="start the VM afterwards with the 'start:' command of its definition")
    p.add_argument("--live", action="store_true",
                   help="start the VM at once on empty qcow2 images backed by the archive, and copy the disks "
                   "while it runs (needs an archive with an index: .vma or our .vma.zst)")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, metavar="DIR",
                   help=f"--live: where the archive's export socket and the VM's sockets live "
                   f"(default {DEFAULT_RUN_DIR})")
    p.add_argument("--resume", action="store_true",
                   help="--live: serve the archive again for VMID's live restore whose qmpbackup died, and finish "
                   "its copy (within 60 s the guest sees a delay, not an I/O error)")
    p.set_defaults(run=run)


def _bwlimit_kib(args: argparse.Namespace, ctx: Context) -> int:
    """The command line wins; else storage.cfg's restore limit of the storages this restore touches."""
    if args.bwlimit is not None:
        return int(args.bwlimit)
    storages = load_storage_cfg(ctx.config_dir)
    involved = [storages[args.storage]] if args.storage in storages else []
    if args.archive != "-":
        source = storage_for_dir(storages, Path(args.archive).parent)
        if source is not None:
            involved.append(source)
    return restore_bwlimit_kib(involved)


def run(args: argparse.Namespace, ctx: Context) -> int | Coroutine[Any, Any, int]:
    if args.resume:
        if not args.live or args.vmid is not None:
            raise UsageError("--resume goes with --live and one VMID: qmpbackup restore --live --resume VMID "
                             "(see 'qmpbackup restore --help')")
        return _resume(check_vmid(args.archive), ctx.config_dir, args.run_dir)
    if args.vmid is None:
        raise UsageError("restore needs ARCHIVE and VMID (see 'qmpbackup restore --help')")
    opts = RestoreOptions(
        archive=args.archive,
        vmid=check_vmid(args.vmid),
        config_dir=ctx.config_dir,
        target_dir=args.target_dir,
        storage=args.storage,
        image_format=args.image_format,
        bwlimit_kib=_bwlimit_kib(args, ctx),
        force=args.force,
        unique=args.unique,
        start=args.start,
    )
    if args.live:
        return _live(opts, args.run_dir)
    keep_large_buffers()
    restore(opts)
    return 0


async def _resume(vmid: int, config_dir: Path, run_dir: Path) -> int:
    await resume_live_restore(vmid, config_dir, run_dir)
    return 0


async def _live(opts: RestoreOptions, run_dir: Path) -> int:
    await live_restore(opts, run_dir)
    return 0
