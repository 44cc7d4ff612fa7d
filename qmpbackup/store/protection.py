"""Protected backups: the empty ``<archive>.protected`` file Proxmox uses.

A protected backup is never pruned or removed. ``max-protected-backups`` caps how
many backups of one guest may be protected in one dump directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qmpbackup.errors import QmpBackupError
from qmpbackup.store.names import parse_archive_name, parse_backup_name, protected_name

log = logging.getLogger(__name__)

UNLIMITED = -1


class ProtectionError(QmpBackupError):
    """Protecting or unprotecting failed, or a protected backup was asked to be removed."""


def is_protected(archive: Path) -> bool:
    return protected_name(archive).exists()


def count_protected(dump_dir: Path, vmid: int, vmtype: str = "qemu") -> int:
    """How many backups of ``vmid`` in ``dump_dir`` are protected."""
    count = 0
    try:
        entries = list(os.scandir(dump_dir))
    except OSError as exc:
        raise ProtectionError(f"cannot list {dump_dir}: {exc.strerror}") from exc
    for entry in entries:
        parsed = parse_backup_name(entry.name)
        if parsed and parsed.vmid == vmid and parsed.vmtype == vmtype:
            if os.path.exists(os.path.join(dump_dir, entry.name + ".protected")):
                count += 1
    return count


def protect(archive: Path, max_protected: int = UNLIMITED) -> bool:
    """Protect ``archive``; returns False if it already was. Enforces ``max_protected`` (-1 = no limit)."""
    if not archive.is_file():
        raise ProtectionError(f"backup {archive} does not exist")
    sentinel = protected_name(archive)
    if sentinel.exists():
        return False
    parsed = parse_archive_name(archive.name) or parse_backup_name(archive.name)
    if parsed is not None and max_protected >= 0:
        already = count_protected(archive.parent, parsed.vmid, parsed.vmtype)
        if already >= max_protected:
            raise ProtectionError(
                f"cannot protect {archive.name}: VM {parsed.vmid} already has {already} protected "
                f"backup(s), the maximum (max-protected-backups) is {max_protected}"
            )
    try:
        fd = os.open(sentinel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
    except FileExistsError:
        return False
    except OSError as exc:
        raise ProtectionError(f"cannot protect {archive.name}: {exc.strerror}") from exc
    log.debug("protected %s", archive.name)  # the caller says it (task log or the command's output)
    return True


def unprotect(archive: Path) -> bool:
    """Remove the protection; returns False if the backup was not protected."""
    try:
        protected_name(archive).unlink()
    except FileNotFoundError:
        if not archive.exists():
            raise ProtectionError(f"backup {archive} does not exist") from None
        return False
    except OSError as exc:
        raise ProtectionError(f"cannot unprotect {archive.name}: {exc.strerror}") from exc
    log.debug("removed protection from %s", archive.name)
    return True
