"""Proxmox ``storage.cfg``: enough to turn ``--storage ID`` into a dump directory.

Reading the file Proxmox users already have means ``--storage local`` works the
way it does with vzdump: backups go to ``<path>/dump`` of a path-based storage,
and the storage's ``prune-backups`` and ``max-protected-backups`` apply.
Sections of other types are kept generically (type, id, raw options).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from qmpbackup.config_text import MAX_BWLIMIT_KIB, parse_integer
from qmpbackup.errors import UsageError
from qmpbackup.jobs.property_string import PropertyStringError, parse_property_string
from qmpbackup.jobs.section_config import (
    Section,
    load_section_config,
    parse_section_config,
)
from qmpbackup.store.prune import (
    PruneOptions,
    PruneSpecError,
    from_maxfiles,
    parse_prune_spec,
)

log = logging.getLogger(__name__)

STORAGE_CFG = "storage.cfg"

# Storage types whose volumes are files below `path` (backups go to <path>/dump).
PATH_TYPES = frozenset({"dir", "nfs", "cifs", "cephfs", "glusterfs", "btrfs"})
# Content types a section allows when it has no `content` line (Proxmox's per-type defaults).
DEFAULT_CONTENT: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "dir": frozenset({"images", "rootdir"}),
        "nfs": frozenset({"images"}),
        "cifs": frozenset({"images"}),
        "cephfs": frozenset({"vztmpl", "iso", "backup"}),
        "glusterfs": frozenset({"images"}),
        "btrfs": frozenset({"images", "rootdir"}),
        "lvmthin": frozenset({"images", "rootdir"}),
        "zfspool": frozenset({"images", "rootdir"}),
        "pbs": frozenset({"backup"}),
    }
)
# What Proxmox assumes when storage.cfg does not exist at all.
BUILTIN_DEFAULT = (
    "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup\n\n"
    "lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n"
)


class StorageError(UsageError):
    """A storage cannot be used as asked (unknown, disabled, no backups, not path based)."""


@dataclass(frozen=True, slots=True)
class Storage:
    """One storage.cfg section, with the properties we use typed."""

    type: str
    storeid: str
    content: frozenset[str]
    disable: bool = False
    shared: bool = False
    path: Path | None = None  # dir and other path-based types
    prune_backups: PruneOptions | None = None
    max_protected_backups: int | None = None  # -1 = unlimited; None = not set
    bwlimit_kib: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # category → KiB/s
    vgname: str | None = None  # lvmthin
    thinpool: str | None = None  # lvmthin
    pool: str | None = None  # zfspool
    mountpoint: Path | None = None  # zfspool
    sparse: bool = False  # zfspool
    blocksize: str | None = None  # zfspool
    origin: str = ""
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def dump_dir(self) -> Path:
        """``<path>/dump``: where vzdump puts backups on a path-based storage."""
        if self.path is None:
            raise StorageError(f"storage '{self.storeid}' ({self.type}) is not a file storage")
        return self.path / "dump"


def _flag(section: Section, key: str) -> bool:
    text = section.options.get(key)
    if text is None:
        return False
    if text in ("1", "0"):
        return text == "1"
    raise section.error(key, f"{key}: {text!r} is not 0 or 1")


def _storage_from(section: Section) -> Storage:
    opts = section.options
    stype = section.type
    content_text = opts.get("content")
    content = (
        frozenset(c.strip() for c in content_text.split(",") if c.strip())
        if content_text is not None
        else DEFAULT_CONTENT.get(stype, frozenset())
    )
    path: Path | None = None
    if stype in PATH_TYPES:
        if "path" not in opts:
            raise section.error(None, f"{stype} storage '{section.id}' has no 'path'")
        path = Path(opts["path"])
        if not path.is_absolute():
            raise section.error("path", f"path {opts['path']!r} is not absolute")
    prune: PruneOptions | None = None
    if "prune-backups" in opts:
        try:
            prune = parse_prune_spec(opts["prune-backups"])
        except PruneSpecError as exc:
            raise section.error("prune-backups", str(exc)) from None
        if "maxfiles" in opts:
            raise section.error("maxfiles", "'maxfiles' and 'prune-backups' are mutually exclusive")
    elif "maxfiles" in opts:
        try:
            maxfiles = parse_integer(opts["maxfiles"])
        except ValueError as exc:
            raise section.error("maxfiles", f"maxfiles: {exc}") from None
        log.warning("%s: storage '%s': 'maxfiles' is deprecated, use 'prune-backups'", section.path, section.id)
        prune = from_maxfiles(maxfiles)
    max_protected: int | None = None
    if "max-protected-backups" in opts:
        try:
            max_protected = parse_integer(opts["max-protected-backups"], -1)
        except ValueError as exc:
            raise section.error("max-protected-backups", f"max-protected-backups: {exc}") from None
    mountpoint = opts.get("mountpoint")
    bwlimit: dict[str, int] = {}
    if "bwlimit" in opts:
        try:
            for category, text in parse_property_string(opts["bwlimit"], BWLIMIT_CATEGORIES).items():
                whole, _dot, fraction = text.partition(".")  # a number: KiB/s, the fraction is dropped
                if fraction and not (fraction.isascii() and fraction.isdigit()):
                    raise ValueError(f"{text!r} is not a number")
                bwlimit[category] = parse_integer(whole, 0, MAX_BWLIMIT_KIB)
        except (PropertyStringError, ValueError) as exc:
            expected = "expected e.g. restore=10240,default=51200, KiB/s"
            raise section.error("bwlimit", f"bwlimit: {exc} ({expected})") from None
    return Storage(
        type=stype,
        storeid=section.id,
        content=content,
        disable=_flag(section, "disable"),
        shared=_flag(section, "shared"),
        path=path,
        prune_backups=prune,
        max_protected_backups=max_protected,
        bwlimit_kib=MappingProxyType(bwlimit),
        vgname=opts.get("vgname"),
        thinpool=opts.get("thinpool"),
        pool=opts.get("pool"),
        mountpoint=Path(mountpoint) if mountpoint else None,
        sparse=_flag(section, "sparse"),
        blocksize=opts.get("blocksize"),
        origin=f"{section.path}:{section.line}",
        options=MappingProxyType(dict(opts)),
    )


BWLIMIT_CATEGORIES = frozenset({"default", "restore", "clone", "migration", "move"})


def restore_bwlimit_kib(storages: Iterable[Storage]) -> int:
    """The storages' restore limit as Proxmox takes it: ``restore`` else ``default``, the lowest wins; 0 = none."""
    limits = []
    for storage in storages:
        limit = storage.bwlimit_kib.get("restore", storage.bwlimit_kib.get("default", 0))
        if limit > 0:
            limits.append(limit)
        ignored = sorted(storage.bwlimit_kib.keys() - {"restore", "default"})
        if ignored:
            log.info("storage '%s': bwlimit %s do(es) not apply to qmpbackup; ignored", storage.storeid,
                     "/".join(ignored))
    return min(limits, default=0)


def parse_storage_cfg(text: str, path: str) -> dict[str, Storage]:
    return {s.id: _storage_from(s) for s in parse_section_config(text, path)}


def load_storage_cfg(config_dir: Path) -> dict[str, Storage]:
    """``<config-dir>/storage.cfg``, or Proxmox's built-in default when the file does not exist."""
    path = config_dir / STORAGE_CFG
    if not path.exists():
        log.debug("no %s; using the built-in default (local = /var/lib/vz)", path)
        return parse_storage_cfg(BUILTIN_DEFAULT, f"<built-in {STORAGE_CFG}>")
    return {s.id: _storage_from(s) for s in load_section_config(path)}


def backup_storage(storages: Mapping[str, Storage], storeid: str) -> Storage:
    """The storage ``storeid``, checked to be usable for backups to files."""
    storage = storages.get(storeid)
    if storage is None:
        raise StorageError(f"storage '{storeid}' does not exist")
    if storage.disable:
        raise StorageError(f"storage '{storeid}' is disabled")
    if "backup" not in storage.content:
        raise StorageError(f"storage '{storeid}' does not support backups (content has no 'backup')")
    if storage.path is None:
        raise StorageError(f"storage '{storeid}' ({storage.type}) is not a file storage")
    return storage


def storage_for_dir(storages: Mapping[str, Storage], dump_dir: Path) -> Storage | None:
    """The storage whose dump directory is ``dump_dir``, if any (for its protection limit)."""
    try:
        target = dump_dir.resolve()
    except OSError:
        target = dump_dir
    for storage in storages.values():
        if storage.path is not None and (storage.path / "dump").resolve() == target:
            return storage
    return None


__all__ = [
    "Storage",
    "StorageError",
    "backup_storage",
    "load_storage_cfg",
    "parse_storage_cfg",
    "restore_bwlimit_kib",
    "storage_for_dir",
]
