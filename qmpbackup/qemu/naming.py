"""Every name we create inside QEMU: block node names, job ids, export names, bitmap names.

All of them have the form ``qmpbackup-<vmid>-<drive key>-<role>[-<tag>]`` so that a later
run (journal replay, ``cleanup``) recognises leftovers with :func:`parse_name` even when
the journal is gone. Nothing else in the code base builds such strings.

QEMU limits node names to 31 characters, starting with a letter, made of
``[A-Za-z0-9_.-]`` (it refuses longer ones at blockdev-add). When the full form of a node name is
longer, the VM id is left out (``qmpbackup-<key>-<role>``): a node name only has to be
unique inside the VM's own QEMU process, so the id adds nothing there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "qmpbackup"
NODE_NAME_MAX = 31

# Roles of block nodes (at most 11 characters, so the short form always fits).
ROLE_CBW = "cbw"  # copy-before-write filter above the disk
ROLE_FLEECE = "fleece"  # format node of the fleecing image
ROLE_FLEECE_FILE = "flfile"  # protocol node of the fleecing image
ROLE_SNAPSHOT = "snap"  # snapshot-access node the backup reads
ROLE_SNAPSHOT_TRIM = "snaptrim"  # second snapshot-access node, only for discards
ROLE_TARGET = "target"  # qcow2 node the backup job writes into (metadata only, data on ROLE_TARGET_DATA)
ROLE_TARGET_META = "tmeta"  # protocol node of the target's qcow2 metadata image (in the run folder)
ROLE_TARGET_DATA = "tdata"  # NBD client node on our export: the target's raw external data file
# Roles of jobs, exports and bitmaps (no length limit beyond QEMU's id syntax).
ROLE_BACKUP = "backup"
ROLE_CREATE = "create"
ROLE_EXPORT = "export"
ROLE_BITMAP = "bitmap"

_KEY_RE = re.compile(r"(?:ide|sata|scsi|virtio|efidisk|tpmstate|unused)\d{1,2}")
_ROLE_RE = re.compile(r"[a-z][a-z0-9]*")
_TAG_RE = re.compile(r"[A-Za-z0-9_.]+")
_PARSE_RE = re.compile(
    rf"{PREFIX}-(?:(?P<vmid>\d+)-)?(?P<key>{_KEY_RE.pattern})-(?P<role>[a-z][a-z0-9]*)"
    r"(?:-(?P<tag>[A-Za-z0-9_.]+))?"
)
_ROLE_MAX = NODE_NAME_MAX - len(PREFIX) - 2 - 9  # 9 = longest key ("tpmstate0")


@dataclass(frozen=True, slots=True)
class ParsedName:
    """The parts of one of our names; ``vmid`` is None for a shortened node name."""

    vmid: int | None
    key: str
    role: str
    tag: str | None


def _check(vmid: int, key: str, role: str, tag: str | None) -> None:
    if not isinstance(vmid, int) or vmid < 0:
        raise ValueError(f"bad VM id {vmid!r}")
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"bad drive key {key!r}")
    if not _ROLE_RE.fullmatch(role) or len(role) > _ROLE_MAX:
        raise ValueError(f"bad role {role!r} (lower-case letters and digits, at most {_ROLE_MAX})")
    if tag is not None and not _TAG_RE.fullmatch(tag):
        raise ValueError(f"bad tag {tag!r}")


def _name(vmid: int, key: str, role: str, tag: str | None) -> str:
    _check(vmid, key, role, tag)
    return f"{PREFIX}-{vmid}-{key}-{role}" + (f"-{tag}" if tag else "")


def node_name(vmid: int, key: str, role: str) -> str:
    """A block node name (at most 31 characters, see the module docstring)."""
    full = _name(vmid, key, role, None)
    if len(full) <= NODE_NAME_MAX:
        return full
    return f"{PREFIX}-{key}-{role}"


def job_id(vmid: int, key: str, role: str = ROLE_BACKUP, tag: str | None = None) -> str:
    """A block job id (``blockdev-backup``, ``blockdev-create`` …)."""
    return _name(vmid, key, role, tag)


def export_name(vmid: int, key: str, role: str = ROLE_EXPORT, tag: str | None = None) -> str:
    """An NBD export name and ``block-export-add`` id."""
    return _name(vmid, key, role, tag)


def bitmap_name(vmid: int, key: str, role: str = ROLE_BITMAP, tag: str | None = None) -> str:
    """A dirty bitmap name on the VM's disk node."""
    return _name(vmid, key, role, tag)


def parse_name(name: str) -> ParsedName | None:
    """The parts of a name this module built, or None for any other name."""
    m = _PARSE_RE.fullmatch(name)
    if m is None:
        return None
    vmid = m.group("vmid")
    return ParsedName(
        vmid=int(vmid) if vmid is not None else None,
        key=m.group("key"),
        role=m.group("role"),
        tag=m.group("tag"),
    )


def is_ours(name: str, vmid: int | None = None) -> bool:
    """True if ``name`` is one of our names (and, if ``vmid`` is given, may belong to it:
    shortened node names carry no id and match any VM)."""
    parsed = parse_name(name)
    if parsed is None:
        return False
    return vmid is None or parsed.vmid is None or parsed.vmid == vmid
