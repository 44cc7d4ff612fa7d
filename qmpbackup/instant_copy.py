"""Point-in-time copies of a shut-down VM's disks that cost no time, so stop mode can restart it at once.

vzdump's stop mode keeps the guest down only until the backup has started. We read
the disks from files, so to give the VM back at once we need a copy of each disk as
it was at the clean shutdown that is made without copying data: a reflink clone
(``FICLONE``) on xfs/btrfs shares the file's extents, a thin snapshot on LVM-thin or
ZFS shares the volume's blocks. The VM is started again on its own disks and the
backup reads the copies, which are dropped afterwards. Where no such copy can be
made, :class:`NoInstantCopy` says why in one line and the caller keeps the VM down
for the whole backup, as before.

Copies are named after their disk with :data:`COPY_MARK` in the name, and each is
journaled (kind ``instant-copy``) before it is made: a run killed before dropping its
copies leaves entries that the next run or ``qmpbackup cleanup`` undoes with
:func:`drop_copy`, which drops only what carries the mark.
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
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Entry, Journal

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
    """``copy_path`` names the copy (it may ask the storage, it creates nothing), so that the
    copy is journaled before ``take`` makes it; ``drop`` removes what exists of it, and
    nothing when it is gone (it also undoes a ``take`` cut short)."""

    name: str

    def copy_path(self, source: Path, tag: str) -> Path: ...

    def take(self, source: Path, copy: Path) -> None: ...

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

    def copy_path(self, source: Path, tag: str) -> Path:
        return source.with_name(f".{source.name}.{COPY_MARK}-{tag}")

    def take(self, source: Path, copy: Path) -> None:
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

    def drop(self, copy: Path) -> None:
        copy.unlink(missing_ok=True)


class LvmThinSnapshot:
    """A thin snapshot of an LVM-thin volume, activated for reading (``lvcreate -s``)."""

    name = "lvm-thin snapshot"

    def __init__(self, run: Runner = run_command) -> None:
        self.run = run

    def copy_path(self, source: Path, tag: str) -> Path:
        vg, lv, segtype = self.run(["lvs", "--noheadings", "-o", "vg_name,lv_name,segtype", str(source)]).split()
        if segtype != "thin":
            raise NoInstantCopy(f"{source} is an LVM volume of type {segtype}, not thin: no instant snapshot")
        return Path("/dev", vg, f"{lv}-{COPY_MARK}-{tag}")

    def take(self, source: Path, copy: Path) -> None:
        origin = copy.name.rpartition(f"-{COPY_MARK}-")[0]
        self.run(["lvcreate", "-s", "-n", copy.name, "-ay", "-K", "-p", "r", f"{copy.parent.name}/{origin}"])

    def drop(self, copy: Path) -> None:
        vg = copy.parent.name
        if copy.name in self.run(["lvs", "--noheadings", "-o", "lv_name", vg]).split():
            self.run(["lvremove", "-f", f"{vg}/{copy.name}"])


class ZfsSnapshot:
    """A ZFS snapshot of a zvol, cloned so that it has a block device to read (``zfs clone``)."""

    name = "zfs snapshot"
    ZVOL_DIR = Path("/dev/zvol")

    def __init__(self, run: Runner = run_command) -> None:
        self.run = run

    def copy_path(self, source: Path, tag: str) -> Path:
        dataset = str(source.relative_to(self.ZVOL_DIR))
        return self.ZVOL_DIR / f"{dataset}-{COPY_MARK}-{tag}"

    @classmethod
    def _names(cls, copy: Path) -> tuple[str, str, str]:
        """``(dataset, snapshot, clone)`` of a copy."""
        clone = str(copy.relative_to(cls.ZVOL_DIR))
        dataset, _, tag = clone.rpartition(f"-{COPY_MARK}-")
        return dataset, f"{dataset}@{COPY_MARK}-{tag}", clone

    def take(self, source: Path, copy: Path) -> None:
        _dataset, snapshot, clone = self._names(copy)
        self.run(["zfs", "snapshot", snapshot])
        try:
            self.run(["zfs", "clone", "-o", "readonly=on", snapshot, clone])
            self.run(["udevadm", "settle"])
        except NoInstantCopy:
            with contextlib.suppress(NoInstantCopy):
                self.run(["zfs", "destroy", snapshot])
            raise

    def drop(self, copy: Path) -> None:
        dataset, snapshot, clone = self._names(copy)
        parent = dataset.rpartition("/")[0] or dataset
        there = set(self.run(["zfs", "list", "-H", "-o", "name", "-t", "volume,snapshot", "-r", parent]).split())
        for name in (clone, snapshot):  # the clone first: it depends on the snapshot
            if name in there:
                self.run(["zfs", "destroy", name])


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


def _method_named(name: str, run: Runner) -> CopyMethod:
    methods: dict[str, CopyMethod] = {m.name: m for m in (Reflink(), LvmThinSnapshot(run), ZfsSnapshot(run))}
    try:
        return methods[name]
    except KeyError:
        raise NoInstantCopy(f"unknown instant copy method {name!r}") from None


def drop_copy(method: str, copy: Path, run: Runner = run_command) -> None:
    """Drop a journaled copy (the undo step of ``instant-copy``); a path without
    :data:`COPY_MARK` in its name is never ours and is left alone."""
    if COPY_MARK in copy.name:
        _method_named(method, run).drop(copy)


@contextlib.contextmanager
def instant_copies(
    sources: Sequence[Path], tag: str, choose: Callable[[Path], CopyMethod] = method_for,
    journal: Journal | None = None,
) -> Iterator[list[DiskCopy]]:
    """A copy of every disk, or :class:`NoInstantCopy` (and none left) if one cannot be made.

    Each copy is recorded in ``journal`` before it is made and resolved once it is dropped.
    The copies are dropped when the block ends, whatever happened in it; one that cannot be
    dropped keeps its entry, for ``qmpbackup cleanup`` or the next run.
    """
    taken: list[tuple[CopyMethod, DiskCopy, Entry | None]] = []
    try:
        for source in sources:
            method = choose(source)
            path = method.copy_path(source, tag)
            entry = journal.record(kinds.INSTANT_COPY, method=method.name, path=str(path)) if journal else None
            taken.append((method, DiskCopy(source, path, method.name), entry))
            method.take(source, path)
        yield [copy for _method, copy, _entry in taken]
    finally:
        for method, copy, entry in reversed(taken):
            try:
                method.drop(copy.path)
            except (OSError, QmpBackupError) as exc:
                log.warning("cannot drop the copy %s of %s: %s", copy.path, copy.source, exc)
                continue
            if journal is not None and entry is not None:
                journal.resolve(entry)


__all__ = [
    "COPY_MARK",
    "CopyMethod",
    "DiskCopy",
    "LvmThinSnapshot",
    "NoInstantCopy",
    "Reflink",
    "ZfsSnapshot",
    "drop_copy",
    "file_system_of",
    "instant_copies",
    "method_for",
]
