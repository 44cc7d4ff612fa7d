"""``qmpbackup mount`` and ``umount``: the whole sequence, journaled, undone on any failure.

The export daemon is ``qmpbackup export --daemon`` started as a child process (its journal
entry is this mount's, not one of its own: ``cleanup`` must not end a complete mount).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.errors import UsageError
from qmpbackup.host_command import HostCommandError, run_host_command
from qmpbackup.recovery.journal import Journal
from qmpbackup.mount.attach import (
    MountError,
    check_mountpoint,
    fuse_export,
    loop_device,
    mount_fs,
    pick_partition,
)
from qmpbackup.mount.host_journal import (
    KIND_EXPORT_DAEMON,
    KIND_MOUNT_DIR,
    KIND_MOUNTED,
    MOUNT_DIR_PREFIX,
    is_mountpoint,
    live_mount,
    mount_journal_path,
    mount_key,
    undo_all,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Mounted:
    device: str
    fstype: str


def make_rundir(journal: Journal, runtime_dir: Path, mountpoint: Path) -> Path:
    rundir = runtime_dir / f"{MOUNT_DIR_PREFIX}{mount_key(mountpoint)}"
    journal.record(KIND_MOUNT_DIR, path=str(rundir))
    rundir.mkdir(parents=True, mode=0o700, exist_ok=True)
    os.chmod(rundir, 0o700)
    return rundir


async def start_export(journal: Journal, archive: Path, rundir: Path) -> tuple[Path, dict[str, int]]:
    """``qmpbackup export --daemon`` of ``archive`` in ``rundir``; returns its socket and exports."""
    socket_path = rundir / "nbd.sock"
    pidfile = rundir / "export.pid"
    journal.record(KIND_EXPORT_DAEMON, socket=str(socket_path), pidfile=str(pidfile), pid=None, create_time=None)
    try:
        out = await run_host_command([sys.executable, "-m", "qmpbackup.cli.main", "export", str(archive.absolute()),
                                      "--socket", str(socket_path), "--pidfile", str(pidfile), "--daemon",
                                      "--no-journal"])
    except HostCommandError as err:
        raise MountError(f"cannot export {archive}: {err}") from err
    exports = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            exports[parts[0]] = int(parts[1])
    return socket_path, exports


async def attach(journal: Journal, socket_path: Path, drive: str, mountpoint: Path,
                 partition: int | None, rundir: Path) -> Mounted:
    """Export ``drive`` of the server at ``socket_path`` → FUSE file → loop device → mount."""
    fuse = await fuse_export(journal, socket_path, drive, rundir)
    part = await pick_partition(fuse, partition, drive)
    device = await loop_device(journal, fuse, part)
    fstype = await mount_fs(journal, device, mountpoint)
    return Mounted(device, fstype)


async def mount_archive(archive: Path, drive: str, mountpoint: Path, partition: int | None,
                        state_dir: Path, runtime_dir: Path) -> Mounted:
    if os.geteuid() != 0:
        raise UsageError("mount needs root: the guest's file system is mounted in the host kernel")
    if not archive.is_file():
        raise UsageError(f"{archive}: no such archive")
    mountpoint = mountpoint.absolute()
    check_mountpoint(mountpoint)
    with Journal.open(mount_journal_path(state_dir, mountpoint)) as journal:
        if journal.pending():
            if live_mount(journal) is not None:
                raise UsageError(f"{mountpoint}: mounted by qmpbackup already")
            log.info("undoing what an earlier mount at %s left behind", mountpoint)
            if failures := await undo_all(journal):
                raise MountError(f"cannot undo an earlier mount at {mountpoint}: {failures[0]}")
        try:
            rundir = make_rundir(journal, runtime_dir, mountpoint)
            socket_path, exports = await start_export(journal, archive, rundir)
            if drive not in exports:
                raise UsageError(f"{archive} has no device {drive!r} (it has {', '.join(sorted(exports))})")
            mounted = await attach(journal, socket_path, drive, mountpoint, partition, rundir)
            journal.record(KIND_MOUNTED, mountpoint=str(mountpoint), archive=str(archive.absolute()),
                           drive=drive, device=mounted.device)
        except BaseException:
            if failures := await undo_all(journal):
                log.error("could not undo everything (qmpbackup cleanup tries again): %s", failures[0])
            raise
    return mounted


async def umount(mountpoint: Path, state_dir: Path) -> None:
    """The file system first (busy: nothing else is touched), then everything under it."""
    mountpoint = mountpoint.absolute()
    path = mount_journal_path(state_dir, mountpoint)
    if not path.exists():
        raise UsageError(f"{mountpoint}: not mounted by qmpbackup mount")
    with Journal.open(path) as journal:
        if not journal.pending():
            raise UsageError(f"{mountpoint}: not mounted by qmpbackup mount")
        if is_mountpoint(mountpoint):
            try:
                await run_host_command(["umount", str(mountpoint)])
            except HostCommandError as err:
                raise MountError(f"cannot unmount {mountpoint}: {err}") from err
        if failures := await undo_all(journal):
            raise MountError(f"umount of {mountpoint} incomplete (qmpbackup cleanup tries again): "
                             f"{failures[0]}")


__all__ = ["KIND_MOUNTED", "Mounted", "attach", "mount_archive", "umount"]
