"""An NBD export mounted read-only on the host, without /dev/nbd*: the steps of ``qmpbackup mount``.

export (unix socket) → ``qemu-storage-daemon`` FUSE export (a regular file) → ``losetup -r``
of the whole file or of one partition (``--offset``/``--sizelimit`` from ``partx``) →
``mount -o ro`` (ext3/ext4 with ``noload``, xfs with ``norecovery``: a backup of a running
guest has a dirty journal, and replaying it would write).
Every step is journaled before it happens (:mod:`qmpbackup.mount.host_journal`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qmpbackup.errors import QmpBackupError, UsageError
from qmpbackup.host_command import HostCommandError, run_host_command
from qmpbackup.recovery.journal import Journal
from qmpbackup.mount.host_journal import (
    KIND_FUSE_EXPORT,
    KIND_LOOP_DEVICE,
    KIND_MOUNT,
    is_mountpoint,
)

QSD: Final = "qemu-storage-daemon"
RO_OPTIONS: Final = {"ext3": "ro,noload", "ext4": "ro,noload", "xfs": "ro,norecovery"}
SECTOR: Final = 512  # partx's unit


class MountError(QmpBackupError):
    """A step of mounting failed; everything done so far was undone."""


async def fuse_export(journal: Journal, socket_path: Path, export: str, rundir: Path) -> Path:
    """The export as the regular file ``rundir/disk`` (read-only), served by qemu-storage-daemon."""
    qsd = shutil.which(QSD)
    if qsd is None:
        raise MountError(f"{QSD} not found (Debian package qemu-system-common)")
    fuse = rundir / "disk"
    pidfile = rundir / "qsd.pid"
    journal.record(KIND_FUSE_EXPORT, fuse=str(fuse), pidfile=str(pidfile))
    fuse.touch(mode=0o600)
    try:
        await run_host_command([
            qsd, "--blockdev",
            f"driver=nbd,node-name=archive,server.type=unix,server.path={_escape(socket_path)},"
            f"export={_escape(export)},read-only=on",
            "--export", f"type=fuse,id=fuse,node-name=archive,mountpoint={_escape(fuse)},writable=off",
            "--daemonize", "--pidfile", str(pidfile)])
    except HostCommandError as err:
        raise MountError(f"cannot present {export} as a file: {err}") from err
    return fuse


@dataclass(frozen=True, slots=True)
class Partition:
    number: int
    offset: int
    size: int


async def partition_table(fuse: Path) -> list[Partition]:
    """The MBR or GPT partitions of the device, read by ``partx`` from the FUSE file.

    Read here rather than by the kernel (``losetup -P``): that needs partition support in the
    host kernel and udev to settle; an offset and a size limit on the loop device need neither.
    """
    try:
        out = await run_host_command(["partx", "--show", "--noheadings", "--output", "NR,START,SECTORS",
                                      str(fuse)])
    except HostCommandError:
        return []  # no partition table
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            found.append(Partition(int(fields[0]), int(fields[1]) * SECTOR, int(fields[2]) * SECTOR))
    return found


async def pick_partition(fuse: Path, partition: int | None, drive: str) -> Partition | None:
    """The partition to mount; None for the whole device (it must have no partition table)."""
    found = await partition_table(fuse)
    numbers = ", ".join(str(p.number) for p in found)
    if partition is None:
        if found:
            raise UsageError(f"{drive} has partitions {numbers}: choose one with --partition N")
        return None
    for p in found:
        if p.number == partition:
            return p
    raise UsageError(f"{drive} has no partition {partition}"
                     + (f" (it has {numbers})" if found else " (no partition table)"))


async def loop_device(journal: Journal, fuse: Path, part: Partition | None) -> str:
    """A read-only loop device of the FUSE file, or of one partition of it."""
    journal.record(KIND_LOOP_DEVICE, backing=str(fuse))
    window = [] if part is None else ["--offset", str(part.offset), "--sizelimit", str(part.size)]
    try:
        return (await run_host_command(["losetup", "--read-only", "--find", "--show", *window, str(fuse)])).strip()
    except HostCommandError as err:
        raise MountError(f"cannot attach a loop device: {err}") from err


async def mount_fs(journal: Journal, device: str, mountpoint: Path) -> str:
    """Mounts ``device`` read-only at ``mountpoint``; returns the file system type."""
    try:
        fstype = (await run_host_command(["blkid", "--probe", "--match-tag", "TYPE", "--output", "value",
                                          device])).strip()
    except HostCommandError:
        fstype = ""
    if not fstype:
        raise MountError(f"no file system found on {device}")
    journal.record(KIND_MOUNT, mountpoint=str(mountpoint))
    try:
        await run_host_command(["mount", "-t", fstype, "-o", RO_OPTIONS.get(fstype, "ro"), device,
                                str(mountpoint)])
    except HostCommandError as err:
        raise MountError(f"cannot mount the {fstype} file system: {err}") from err
    return fstype


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise UsageError(f"{mountpoint}: not a folder")
    if is_mountpoint(mountpoint):
        raise UsageError(f"{mountpoint}: something is mounted there already")


def _escape(value: object) -> str:
    """QEMU's option syntax: a comma in a value is written twice."""
    return str(value).replace(",", ",,")
