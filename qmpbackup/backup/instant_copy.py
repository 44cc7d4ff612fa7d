"""Point-in-time copies of a shut-down VM's disks that cost no time, so stop mode can restart it at once.

vzdump's stop mode keeps the guest down only until the backup has started. We read
the disks from files, so to give the VM back at once we need a copy of each disk as
it was at the clean shutdown that is made without copying data: a reflink clone
(``FICLONE``) on xfs/btrfs shares the file's extents, a thin snapshot on LVM-thin or
ZFS shares the volume's blocks. The VM is started again on its own disks and the
backup reads the copies, which are dropped afterwards. Where no such copy can be
made, :class:`NoInstantCopy` says why in one line and the caller keeps the VM down
for the whole backup, as before.

Copies are named after their disk with :data:`COPY_MARK` in the name, so a run
killed before dropping them leaves files that say what they are.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qmpbackup.errors import QmpBackupError
from qmpbackup.host_command import HostCommandError, run_host_command_sync

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # _IOW(0x94, 9, int): clone a whole file, sharing its extents
COPY_MARK = "qmpbackup-copy"
# errnos with which a file system says "I cannot share extents here".
_NO_REFLINK = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS})

Runner = Callable[[Sequence[str]], str]


class NoInstantCopy(QmpBackupError):
    """No instant copy of a disk is possible here; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class DiskCopy:
    source: Path
    path: Path  # what the backup reads instead of ``source``
    method: str  # "reflink", "lvm-thin snapshot", "zfs snapshot"


class CopyMethod(Protocol):
    name: str

    def take(self, source: Path, tag: str) -> Path: ...

    def drop(self, copy: Path) -> None: ...


def run_command(argv: Sequence[str]) -> str:
    """Run a storage tool; its failure becomes :class:`NoInstantCopy` with the tool's message."""
    try:
        return run_host_command_sync(argv)
    except HostCommandError as exc:
        raise NoInstantCopy(str(exc)) from exc


def file_system_of(path: Path) -> tuple[str, str]:
    """``(type, mount point)`` of the file system holding ``path`` (longest matching mount)."""
    target = os.path.realpath(path)
    best = ("unknown", "/")
    with contextlib.suppress(OSError), open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            mnt = fields[1].replace("\\040", " ")
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[1]):
                best = (fields[2], mnt)
    return best


class Reflink:
    """A file clone sharing every extent: instant and space-free on xfs (reflink=1) and btrfs."""

    name = "reflink"

    def take(self, source: Path, tag: str) -> Path:
        copy = source.with_name(f".{source.name}.{COPY_MARK}-{tag}")
        try:
            src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NoInstantCopy(f"cannot open {source}: {exc.strerror}") from exc
        try:
            try:
                dst = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise NoInstantCopy(f"cannot create {copy}: {exc.strerror}") from exc
            try:
                fcntl.ioctl(dst, FICLONE, src)
            except OSError as exc:
                os.close(dst)
                dst = -1
                copy.unlink(missing_ok=True)
                if exc.errno in _NO_REFLINK:
                    fstype, mnt = file_system_of(source)
                    raise NoInstantCopy(f"{fstype} at {mnt} cannot clone files (no reflink)") from exc
                raise NoInstantCopy(f"cannot clone {source}: {exc.strerror}") from exc
            finally:
                if dst >= 0:
                    os.close(dst)
        finally:
            os.close(src)
        return copy

    def drop(self, copy: Path) -> None:
        copy.unlink(missing_ok=True)


class LvmThinSnapshot:
    """A thin snapshot of an LVM-thin volume, activated for reading (``lvcreate -s``)."""

    name = "lvm-thin snapshot"

    def __init__(self, run: Runner = run_command) -> None:
        self.run = run

    def take(self, source: Path, tag: str) -> Path:
        vg, lv, segtype = self.run(["lvs", "--noheadings", "-o", "vg_name,lv_name,segtype", str(source)]).split()
        if segtype != "thin":
            raise NoInstantCopy(f"{source} is an LVM volume of type {segtype}, not thin: no instant snapshot")
        snap = f"{lv}-{COPY_MARK}-{tag}"
        self.run(["lvcreate", "-s", "-n", snap, "-ay", "-K", "-p", "r", f"{vg}/{lv}"])
        return Path("/dev", vg, snap)

    def drop(self, copy: Path) -> None:
        self.run(["lvremove", "-f", f"{copy.parent.name}/{copy.name}"])


class ZfsSnapshot:
    """A ZFS snapshot of a zvol, cloned so that it has a block device to read (``zfs clone``)."""

    name = "zfs snapshot"
    ZVOL_DIR = Path("/dev/zvol")

    def __init__(self, run: Runner = run_command) -> None:
        self.run = run

    def take(self, source: Path, tag: str) -> Path:
        dataset = str(source.relative_to(self.ZVOL_DIR))
        snapshot = f"{dataset}@{COPY_MARK}-{tag}"
        clone = f"{dataset}-{COPY_MARK}-{tag}"
        self.run(["zfs", "snapshot", snapshot])
        try:
            self.run(["zfs", "clone", "-o", "readonly=on", snapshot, clone])
            self.run(["udevadm", "settle"])
        except NoInstantCopy:
            with contextlib.suppress(NoInstantCopy):
                self.run(["zfs", "destroy", snapshot])
            raise
        return self.ZVOL_DIR / clone

    def drop(self, copy: Path) -> None:
        clone = str(copy.relative_to(self.ZVOL_DIR))
        dataset, _, tag = clone.rpartition(f"-{COPY_MARK}-")
        self.run(["zfs", "destroy", clone])
        self.run(["zfs", "destroy", f"{dataset}@{COPY_MARK}-{tag}"])


def method_for(source: Path, run: Runner = run_command) -> CopyMethod:
    """How ``source`` can be copied instantly: by its kind (file, zvol, LVM volume)."""
    try:
        mode = os.stat(source).st_mode
    except OSError as exc:
        raise NoInstantCopy(f"cannot stat {source}: {exc.strerror}") from exc
    if stat.S_ISREG(mode):
        return Reflink()
    if stat.S_ISBLK(mode):
        if source.is_relative_to(ZfsSnapshot.ZVOL_DIR):
            return ZfsSnapshot(run)
        return LvmThinSnapshot(run)
    raise NoInstantCopy(f"{source} is neither a file nor a block device")


@contextlib.contextmanager
def instant_copies(
    sources: Sequence[Path], tag: str, choose: Callable[[Path], CopyMethod] = method_for
) -> Iterator[list[DiskCopy]]:
    """A copy of every disk, or :class:`NoInstantCopy` (and none left) if one cannot be made.

    The copies are dropped when the block ends, whatever happened in it.
    """
    taken: list[tuple[CopyMethod, DiskCopy]] = []
    try:
        for source in sources:
            method = choose(source)
            taken.append((method, DiskCopy(source, method.take(source, tag), method.name)))
        yield [copy for _method, copy in taken]
    finally:
        for method, copy in reversed(taken):
            try:
                method.drop(copy.path)
            except (OSError, QmpBackupError) as exc:
                log.warning("cannot drop the copy %s of %s: %s", copy.path, copy.source, exc)


__all__ = [
    "COPY_MARK",
    "CopyMethod",
    "DiskCopy",
    "LvmThinSnapshot",
    "NoInstantCopy",
    "Reflink",
    "ZfsSnapshot",
    "file_system_of",
    "instant_copies",
    "method_for",
]
