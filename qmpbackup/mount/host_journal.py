"""The journals of host resources that belong to no VM: export daemons and mounts.

Each ``qmpbackup export --daemon`` and each ``qmpbackup mount`` has its own journal in
``<state-dir>/host/`` (format of :mod:`qmpbackup.journal`), so that ``qmpbackup cleanup``
can end what a killed command left behind, and ``qmpbackup umount`` finds what to tear down.

Kinds (each undo step checks first, so it is safe to run twice and after any crash):

* ``export-daemon`` ``{socket, pidfile}`` and, when the daemon recorded itself, ``{pid,
  create_time}``: our export server process; undo: SIGTERM (SIGKILL after 10 s) if that pid is
  still the same process (without a pid: the one in ``pidfile`` if it serves ``socket``), then
  remove its socket and pid file.
* ``mount-dir`` ``{path}``: the private folder of a mount (socket, pid files, FUSE file); undo:
  remove it.
* ``fuse-export`` ``{fuse, pidfile}``: ``qemu-storage-daemon`` presenting the device as the
  file ``fuse``; undo: unmount ``fuse`` if mounted, end the daemons serving it.
* ``loop-device`` ``{backing}``: ``losetup -r`` of the FUSE file (or of a partition in it);
  undo: detach every loop device whose backing file is ``backing``.
* ``mount`` ``{mountpoint}``: the file system mount; undo: ``umount`` if mounted there.
* ``mounted`` ``{mountpoint, archive, drive, device}``: the mount is complete. ``cleanup``
  leaves a journal with this entry alone while the file system is still mounted (that is the
  user's mount, ended by ``umount``); ``umount`` resolves it and undoes the rest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import psutil

from qmpbackup.host_command import run_host_command
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Entry, Journal, JournalError, Undo
from qmpbackup.recovery.replay import replay
from qmpbackup.recovery.spawned import stop_process

log = logging.getLogger(__name__)

KIND_EXPORT_DAEMON: Final = kinds.EXPORT_DAEMON
KIND_MOUNT_DIR: Final = kinds.MOUNT_DIR
KIND_FUSE_EXPORT: Final = kinds.FUSE_EXPORT
KIND_LOOP_DEVICE: Final = kinds.LOOP_DEVICE
KIND_MOUNT: Final = kinds.MOUNT
KIND_MOUNTED: Final = kinds.MOUNTED

MOUNT_DIR_PREFIX: Final = "mount-"


def host_dir(state_dir: Path) -> Path:
    return state_dir / "host"


def export_journal_path(state_dir: Path, pid: int) -> Path:
    return host_dir(state_dir) / f"export-{pid}.jsonl"


def mount_key(mountpoint: Path) -> str:
    """A file-name-safe key of a mount point (its absolute path, hashed)."""
    return hashlib.sha256(str(mountpoint.resolve()).encode()).hexdigest()[:16]


def mount_journal_path(state_dir: Path, mountpoint: Path) -> Path:
    return host_dir(state_dir) / f"mount-{mount_key(mountpoint)}.jsonl"


def is_mountpoint(path: Path) -> bool:
    """Whether something is mounted at ``path`` (a file or a folder), from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    return True
    except OSError:
        return False
    return False


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _pid_from_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# -- undo steps ----------------------------------------------------------------------------

async def undo_export_daemon(entry: Entry) -> None:
    socket_path = str(entry.data["socket"])
    pidfile = Path(str(entry.data["pidfile"]))
    if entry.data.get("pid") is not None and entry.data.get("create_time") is not None:
        await stop_process(int(entry.data["pid"]), float(entry.data["create_time"]))
    elif (pid := _pid_from_file(pidfile)) is not None and _serves_socket(pid, socket_path):
        await stop_process(pid, None)
    Path(socket_path).unlink(missing_ok=True)
    pidfile.unlink(missing_ok=True)


def _serves_socket(pid: int, socket_path: str) -> bool:
    """Whether ``pid`` is a ``qmpbackup export`` of ``socket_path`` (a pid file may be stale)."""
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "export" in cmdline and socket_path in cmdline


async def undo_mount_dir(entry: Entry) -> None:
    path = Path(str(entry.data["path"]))
    if path.name.startswith(MOUNT_DIR_PREFIX) and path.is_dir():
        if is_mountpoint(path / "disk"):
            raise OSError(f"{path / 'disk'} is still mounted")
        shutil.rmtree(path, ignore_errors=True)


async def undo_fuse_export(entry: Entry) -> None:
    fuse = str(entry.data["fuse"])
    if is_mountpoint(Path(fuse)):
        await run_host_command(["umount", fuse])
    for pid in _fuse_daemons(fuse):
        await stop_process(pid, None)


def _fuse_daemons(fuse: str) -> list[int]:
    """qemu-storage-daemon processes exporting to ``fuse`` (found by their command line: a
    daemon that failed to write its pid file, or a stale pid file, must not mislead us)."""
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if str(proc.info["name"] or "").startswith("qemu-storage-da") and any(
                f"mountpoint={fuse}," in arg or arg.endswith(f"mountpoint={fuse}") for arg in cmdline):
            found.append(int(proc.info["pid"]))
    return found


async def undo_loop_device(entry: Entry) -> None:
    backing = str(entry.data["backing"])
    out = await run_host_command(["losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list"])
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        if back.strip().removesuffix(" (deleted)") == backing:
            await run_host_command(["losetup", "--detach", name])


async def undo_mount(entry: Entry) -> None:
    mountpoint = Path(str(entry.data["mountpoint"]))
    if is_mountpoint(mountpoint):
        await run_host_command(["umount", str(mountpoint)])


async def undo_mounted(entry: Entry) -> None:
    """Only the marker: the pieces have entries of their own."""


UNDO_STEPS: Final[dict[str, Undo]] = {
    KIND_EXPORT_DAEMON.name: undo_export_daemon,
    KIND_MOUNT_DIR.name: undo_mount_dir,
    KIND_FUSE_EXPORT.name: undo_fuse_export,
    KIND_LOOP_DEVICE.name: undo_loop_device,
    KIND_MOUNT.name: undo_mount,
    KIND_MOUNTED.name: undo_mounted,
}


# -- cleanup -------------------------------------------------------------------------------

@dataclass(slots=True)
class HostCleanup:
    actions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def live_mount(journal: Journal) -> Path | None:
    """The mount point of a complete mount that is still mounted, or None."""
    for entry in journal.pending():
        if entry.kind == KIND_MOUNTED.name:
            mountpoint = Path(str(entry.data["mountpoint"]))
            if is_mountpoint(mountpoint):
                return mountpoint
    return None


async def undo_all(journal: Journal, say: Callable[[str], None] | None = None) -> list[str]:
    """Undo every pending entry of one host journal, newest first; returns the failures."""

    def undone(entry: Entry) -> None:
        if say is not None and entry.kind != KIND_MOUNTED.name:
            say(f"undid {entry.kind} {_describe(entry)}")

    return await replay(journal, None, steps=lambda _session: UNDO_STEPS, undone=undone)


def _describe(entry: Entry) -> str:
    for key in ("mountpoint", "backing", "fuse", "socket", "path"):
        if key in entry.data:
            return str(entry.data[key])
    return ""


async def cleanup_host(state_dir: Path) -> HostCleanup:
    """End export daemons and undo killed mounts; complete mounts still mounted stay."""
    report = HostCleanup()
    folder = host_dir(state_dir)
    if not folder.is_dir():
        return report
    for path in sorted(folder.glob("*.jsonl")):
        try:
            journal = Journal.open(path)
        except JournalError as exc:
            report.failures.append(f"{exc} (is that command still running?)")
            continue
        with journal:
            mountpoint = live_mount(journal)
            if mountpoint is not None:
                report.actions.append(f"{mountpoint} is mounted by qmpbackup mount; "
                                      f"left alone (end it with qmpbackup umount {mountpoint})")
                continue
            report.failures += await undo_all(journal, report.actions.append)
    return report


def runtime_dir() -> Path:
    """Where export sockets and mount run folders live: /run/qmpbackup for root, else the user's runtime dir."""
    if os.geteuid() == 0:
        return Path("/run/qmpbackup")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/qmpbackup-{os.geteuid()}"
    return Path(base) / "qmpbackup"
