"""``qmpbackup mount ARCHIVE DRIVE MOUNTPOINT`` and ``qmpbackup umount MOUNTPOINT``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qmpbackup.recovery.state import DEFAULT_STATE_DIR
from qmpbackup.cli.common import Context
from qmpbackup.mount.mount_archive import mount_archive, umount
from qmpbackup.mount.host_journal import runtime_dir

KERNEL_NOTE = ("This parses the guest's file system in the host kernel: mount only archives you "
               "trust. Needs root.")


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "mount", parents=[common], help="mount a device of an archive read-only on the host",
        description="Mount DRIVE (e.g. drive-scsi0) of ARCHIVE read-only at MOUNTPOINT: qmpbackup "
                    "export -> qemu-storage-daemon FUSE export -> read-only loop device -> mount -o ro "
                    "(ext3/ext4 with noload, xfs with norecovery). No /dev/nbd* needed. "
                    + KERNEL_NOTE + " End it with 'qmpbackup umount MOUNTPOINT'.")
    p.add_argument("archive", type=Path, metavar="ARCHIVE")
    p.add_argument("drive", metavar="DRIVE")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--partition", type=int, metavar="N",
                   help="mount partition N (MBR or GPT); needed when the drive has partitions")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"where the mount's journal lives (default {DEFAULT_STATE_DIR})")
    p.set_defaults(run=run_mount)

    u = subparsers.add_parser(
        "umount", parents=[common], help="undo qmpbackup mount",
        description="Unmount MOUNTPOINT and remove the loop device, the FUSE export and the export "
                    "process that 'qmpbackup mount' set up.")
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    u.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"where the mount's journal lives (default {DEFAULT_STATE_DIR})")
    u.set_defaults(run=run_umount)


async def run_mount(args: argparse.Namespace, ctx: Context) -> int:
    mounted = await mount_archive(args.archive, args.drive, args.mountpoint, args.partition,
                                  args.state_dir, runtime_dir())
    sys.stdout.write(f"{args.drive}: {mounted.fstype} on {mounted.device} mounted read-only at "
                     f"{args.mountpoint.absolute()}\n")
    return 0


async def run_umount(args: argparse.Namespace, ctx: Context) -> int:
    await umount(args.mountpoint, args.state_dir)
    return 0
