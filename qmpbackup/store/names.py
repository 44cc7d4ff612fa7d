"""vzdump's file names: the archive, its in-progress ``.dat`` file and its sidecars.

Proxmox recognises a backup only by its name, and prune reads the backup time
from the name (local time), so these rules must match vzdump's byte for byte.
This module is pure vocabulary: it imports nothing else from the project.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import overload

# The pattern Proxmox uses to recognise a vzdump backup (qemu, lxc, openvz; vma, tar, tgz).
_BACKUP_RE = re.compile(
    r"^vzdump-(qemu|lxc|openvz)-([1-9][0-9]{2,8})-"
    r"(\d{4})_(\d{2})_(\d{2})-(\d{2})_(\d{2})_(\d{2})"
    r"(\.tgz|\.(?:vma|tar)(?:\.(?:gz|lzo|zst|bz2))?)$"
)
# Everything before the archive extension: what the .log sidecar is named after.
_BASE_RE = re.compile(r"^(.*?)(?:\.tgz|\.(?:vma|tar)(?:\.[A-Za-z0-9]+)?)$")

VMA_EXTENSIONS = (".vma", ".vma.zst", ".vma.gz", ".vma.lzo")
TIME_FORMAT = "%Y_%m_%d-%H_%M_%S"

@dataclass(frozen=True, slots=True)
class ArchiveName:
    """A parsed vzdump archive name.

    ``time`` is the naive local wall-clock time written in the name; ``ext`` is the
    archive extension including the dot (``.vma.zst``).
    """

    vmid: int
    time: datetime
    ext: str
    vmtype: str = "qemu"

    @property
    def name(self) -> str:
        return f"vzdump-{self.vmtype}-{self.vmid}-{self.time.strftime(TIME_FORMAT)}{self.ext}"

    @property
    def is_vma(self) -> bool:
        return self.vmtype == "qemu" and self.ext in VMA_EXTENSIONS

    def epoch(self, tz: tzinfo | None = None) -> int:
        """The name's time as Unix seconds, reading it as local time (``tz``, or the process's TZ)."""
        return local_to_epoch(self.time, tz)


def local_to_epoch(wall: datetime, tz: tzinfo | None = None) -> int:
    """Unix seconds of a naive local wall-clock time, like Perl's ``timelocal`` / ``mktime``."""
    if tz is None:
        return int(time.mktime(wall.timetuple()[:8] + (-1,)))
    return int(wall.replace(tzinfo=tz).timestamp())


def archive_name(vmid: int, when: datetime, compression_ext: str) -> str:
    """``vzdump-qemu-<vmid>-YYYY_MM_DD-HH_MM_SS.vma[.zst]``; ``when`` is local wall-clock time.

    ``compression_ext`` is ``""``, ``".zst"``, ``".gz"`` or ``".lzo"``.
    """
    if compression_ext not in ("", ".zst", ".gz", ".lzo"):
        raise ValueError(f"unknown compression extension {compression_ext!r}")
    return f"vzdump-qemu-{vmid}-{when.strftime(TIME_FORMAT)}.vma{compression_ext}"


def parse_backup_name(name: str) -> ArchiveName | None:
    """Any vzdump backup name Proxmox recognises (qemu, lxc, openvz), or None.

    A name whose digits do not form a real date and time is not recognised either.
    """
    m = _BACKUP_RE.match(os.path.basename(name))
    if m is None:
        return None
    vmtype, vmid, year, month, day, hour, minute, second, ext = m.groups()
    try:
        when = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError:
        return None
    return ArchiveName(vmid=int(vmid), time=when, ext=ext, vmtype=vmtype)


def parse_archive_name(name: str) -> ArchiveName | None:
    """A QEMU VMA archive name (``vzdump-qemu-…​.vma[.zst|.gz|.lzo]``), or None for anything else."""
    parsed = parse_backup_name(name)
    if parsed is None or not parsed.is_vma:
        return None
    return parsed


def _sibling(archive: str | Path, name: str) -> str | Path:
    if isinstance(archive, Path):
        return archive.with_name(name)
    head, _ = os.path.split(archive)
    return os.path.join(head, name) if head else name


def _basename(archive: str | Path) -> str:
    return os.path.basename(os.fspath(archive))


@overload
def temp_name(archive: str) -> str: ...
@overload
def temp_name(archive: Path) -> Path: ...
def temp_name(archive: str | Path) -> str | Path:
    """vzdump's in-progress name: the last extension replaced by ``.dat``.

    ``….vma.zst`` → ``….vma.dat``; an uncompressed ``….vma`` → ``…-HH_MM_SS.dat``.
    """
    base = _basename(archive)
    stem, dot, _ = base.rpartition(".")
    if not dot:
        raise ValueError(f"archive name without an extension: {base!r}")
    return _sibling(archive, f"{stem}.dat")


def _log_base(base: str) -> str:
    m = _BASE_RE.match(base)
    if m is None:
        raise ValueError(f"not an archive name: {base!r}")
    return m.group(1)


@overload
def log_name(archive: str) -> str: ...
@overload
def log_name(archive: Path) -> Path: ...
def log_name(archive: str | Path) -> str | Path:
    """``<base>.log``: the archive name without its archive extension, plus ``.log``."""
    return _sibling(archive, _log_base(_basename(archive)) + ".log")


@overload
def notes_name(archive: str) -> str: ...
@overload
def notes_name(archive: Path) -> Path: ...
def notes_name(archive: str | Path) -> str | Path:
    """``<archive>.notes``: the backup's notes (UTF-8 text)."""
    return _sibling(archive, _basename(archive) + ".notes")


@overload
def protected_name(archive: str) -> str: ...
@overload
def protected_name(archive: Path) -> Path: ...
def protected_name(archive: str | Path) -> str | Path:
    """``<archive>.protected``: an empty file whose presence protects the backup."""
    return _sibling(archive, _basename(archive) + ".protected")


@overload
def index_name(archive: str) -> str: ...
@overload
def index_name(archive: Path) -> Path: ...
def index_name(archive: str | Path) -> str | Path:
    """``<archive>.index``: the sidecar index of an archive that cannot carry one inside (docs/format.md I)."""
    return _sibling(archive, _basename(archive) + ".index")
