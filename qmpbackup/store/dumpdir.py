"""The backups in a dump directory: listing them, and pruning one guest's backups.

This is the file side of :mod:`qmpbackup.store.prune`: it finds the archives,
reads their time from the name (local time, as Proxmox does), asks the pure
selection which to keep, and removes the others together with their sidecars.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path

from qmpbackup.errors import QmpBackupError, UsageError
from qmpbackup.store.names import ArchiveName, index_name, log_name, notes_name, parse_backup_name, protected_name
from qmpbackup.store.notes import first_line, read_notes
from qmpbackup.store.prune import BackupRecord, Mark, PruneOptions, mark_group

log = logging.getLogger(__name__)

SIDECAR_SUFFIXES = (".log", ".notes", ".protected", ".index", ".dat", ".tmp")
_COMPRESSION = {".zst": "zstd", ".gz": "gzip", ".lzo": "lzo", ".bz2": "bzip2", ".tgz": "gzip"}


class DumpDirError(QmpBackupError):
    """The dump directory cannot be read, or a backup cannot be removed."""


@dataclass(frozen=True, slots=True)
class BackupFile:
    """One backup archive found in a dump directory."""

    path: Path
    name: ArchiveName
    ctime: int  # the name's time as Unix seconds (local time)
    size: int
    protected: bool
    notes: str  # the first line of the notes, "" if none

    @property
    def compression(self) -> str:
        ext = self.name.ext
        for suffix, compression in _COMPRESSION.items():
            if ext.endswith(suffix):
                return compression
        return "none"


@dataclass(frozen=True, slots=True)
class PruneEntry:
    """One file considered by prune, as Proxmox's prune API reports it."""

    path: Path
    ctime: int  # from the name (local time); for a renamed file its modification time
    mark: Mark

    def as_json(self) -> dict[str, object]:
        return {"filename": self.path.name, "volid": str(self.path), "ctime": self.ctime, "mark": str(self.mark)}


def _entries(dump_dir: Path) -> list[os.DirEntry[str]]:
    try:
        return sorted(os.scandir(dump_dir), key=lambda e: e.name)
    except FileNotFoundError:
        raise UsageError(f"dump directory {dump_dir} does not exist") from None
    except OSError as exc:
        raise DumpDirError(f"cannot list {dump_dir}: {exc.strerror}") from exc


def list_backups(dump_dir: Path, vmid: int | None = None, tz: tzinfo | None = None) -> list[BackupFile]:
    """The QEMU backups in ``dump_dir`` (optionally of one VM), oldest first."""
    result = []
    for entry in _entries(dump_dir):
        parsed = parse_backup_name(entry.name)
        if parsed is None or parsed.vmtype != "qemu" or (vmid is not None and parsed.vmid != vmid):
            continue
        try:
            size = entry.stat().st_size
        except FileNotFoundError:  # removed meanwhile
            continue
        path = Path(dump_dir, entry.name)
        result.append(
            BackupFile(
                path=path,
                name=parsed,
                ctime=parsed.epoch(tz),
                size=size,
                protected=protected_name(path).exists(),
                notes=first_line(read_notes(path)),
            )
        )
    result.sort(key=lambda b: (b.ctime, b.path.name))
    return result


def _renamed(dump_dir: Path, vmid: int) -> list[Path]:
    """Files that look like this VM's backups but whose names do not parse: never touched."""
    prefix = re.compile(rf"^vzdump-qemu-{vmid}-")
    found = []
    for entry in _entries(dump_dir):
        name = entry.name
        if not prefix.match(name) or name.endswith(SIDECAR_SUFFIXES) or not entry.is_file():
            continue
        if ".vma" in name and parse_backup_name(name) is None:
            found.append(Path(dump_dir, name))
    return found


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def plan_prune(
    dump_dir: Path, vmid: int, options: PruneOptions, tz: tzinfo | None = None
) -> list[PruneEntry]:
    """Marks for every backup of ``vmid`` in ``dump_dir``, newest first (renamed files last)."""
    backups = list_backups(dump_dir, vmid, tz)
    records = [BackupRecord(b.path, b.ctime, b.protected) for b in backups]
    marks = mark_group(records, options, tz)
    entries = [PruneEntry(b.path, b.ctime, marks[b.path]) for b in reversed(backups)]
    entries += [PruneEntry(p, _mtime(p), Mark.RENAMED) for p in _renamed(dump_dir, vmid)]
    return entries


def remove_backup(archive: Path) -> None:
    """Delete an archive and its ``.log``, ``.notes`` and ``.index``; a protected backup is refused."""
    if protected_name(archive).exists():
        raise DumpDirError(f"backup {archive.name} is protected")
    try:
        archive.unlink()
    except OSError as exc:
        raise DumpDirError(f"cannot remove {archive}: {exc.strerror}") from exc
    for sidecar in (log_name(archive), notes_name(archive), index_name(archive)):
        try:
            sidecar.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", sidecar, exc.strerror)


def apply_prune(entries: list[PruneEntry]) -> list[Path]:
    """Remove every entry marked ``remove``, oldest first; returns the removed archives."""
    removed = []
    for entry in reversed(entries):
        if entry.mark is Mark.REMOVE:
            log.info("removing backup '%s'", entry.path)
            remove_backup(entry.path)
            removed.append(entry.path)
    return removed


def backup_limit(options: PruneOptions) -> int:
    """The most backups a retention allows (sum of the keep options); 0 = no limit (keep-all)."""
    if options.keeps_everything():
        return 0
    return sum(
        v or 0
        for v in (
            options.keep_last, options.keep_hourly, options.keep_daily,
            options.keep_weekly, options.keep_monthly, options.keep_yearly,
        )
    )  # fmt: skip


def check_backup_limit(dump_dir: Path, vmid: int, options: PruneOptions) -> None:
    """With ``remove=0`` a new backup must not exceed the retention: refuse it up front, as vzdump does.

    Protected backups do not count.
    """
    limit = backup_limit(options)
    if not limit:
        return
    count = sum(1 for b in list_backups(dump_dir, vmid) if not b.protected)
    if count >= limit:
        raise DumpDirError(
            f"there is a max backup limit of {limit} enforced by the target storage or the vzdump "
            f"parameters ({count} backups of VM {vmid}); either increase the limit or delete old backups"
        )


def prune_after_backup(
    dump_dir: Path,
    vmid: int,
    options: PruneOptions,
    info: Callable[[str], None],
    storeid: str | None = None,
    tz: tzinfo | None = None,
) -> list[Path]:
    """vzdump's prune step after a successful backup (``remove=1``), with its log lines.

    ``info`` receives the task-log lines (e.g. ``TaskLog.info``). Returns the removed archives.
    """
    if options.keeps_everything():
        return []
    info(f"prune older backups with retention: {options.render(', ')}")
    entries = plan_prune(dump_dir, vmid, options, tz)
    removed = []
    for entry in reversed(entries):
        if entry.mark is Mark.REMOVE:
            shown = f"{storeid}:backup/{entry.path.name}" if storeid else str(entry.path)
            info(f"removing backup '{shown}'")
            remove_backup(entry.path)
            removed.append(entry.path)
    info(f"pruned {len(removed)} backup(s) not covered by keep-retention policy")
    return removed
