"""The restored VM's config: the archive's ``qemu-server.conf`` rewritten for its new disks.

The rules follow Proxmox's restore: archive bookkeeping (``#qmdump#``,
``#vzdump#``), ``lock``, ``parent`` and ``unusedN`` lines go; drive lines of
restored devices point at the new images (``format=`` dropped, the image
name's suffix says it); drives excluded from the backup (``backup=0``) are
commented out because their data is not in the archive; a ``vmgenid`` other
than ``0`` is replaced so the guest knows it was restored. ``unique`` also
gives every NIC with a MAC a new one and the SMBIOS a new uuid, for a copy
that runs beside the original. Snapshot sections never come from an archive
and are dropped.
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_DROPPED = re.compile(r"(#qmdump#|#vzdump#|(lock|parent|unused\d+)\s*:)")
_DRIVE_LINE = re.compile(r"((?:ide|scsi|virtio|sata|efidisk|tpmstate)\d+)\s*:\s*(\S+)\s*")
_NET_LINE = re.compile(r"(net\d+)\s*:\s*(\S+)\s*")
_VMGENID_LINE = re.compile(r"vmgenid\s*:\s*(\S*)\s*")
_SMBIOS_LINE = re.compile(r"smbios1\s*:\s*(\S*)\s*")
_SECTION = re.compile(r"\[[^\]]*\]\s*")
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")


def random_mac() -> str:
    """A random unicast, locally administered MAC (no vendor prefix is ours to use)."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02X}" for b in octets)


def new_uuid() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class Generators:
    """Where new identities come from (tests pass fixed ones)."""

    mac: Callable[[], str] = random_mac
    uuid: Callable[[], str] = new_uuid


@dataclass(slots=True)
class RewriteResult:
    text: str
    commented: list[str] = field(default_factory=list)  # drive keys commented out (backup=0)
    kept_unmapped: list[str] = field(default_factory=list)  # disk drives left pointing at their old volume


def _items(value: str) -> list[tuple[str | None, str]]:
    """``a,b=c`` → [(None, "a"), ("b", "c")]: a property string, order kept."""
    out: list[tuple[str | None, str]] = []
    for item in value.split(","):
        key, sep, val = item.partition("=")
        out.append((key, val) if sep else (None, item))
    return out


def _join(items: list[tuple[str | None, str]]) -> str:
    return ",".join(val if key is None else f"{key}={val}" for key, val in items)


def _drive_file(items: list[tuple[str | None, str]]) -> str | None:
    for key, val in items:
        if key in (None, "file"):
            return val
    return None


def _repoint(items: list[tuple[str | None, str]], new_file: str) -> str:
    rest = [(k, v) for k, v in items if k not in (None, "file", "format")]
    return _join([(None, new_file), *rest])


def _is_cdrom(items: list[tuple[str | None, str]]) -> bool:
    return ("media", "cdrom") in items or _drive_file(items) in ("none", "cdrom")


def rewrite_config(
    text: str,
    new_files: Mapping[str, str],
    *,
    unique: bool = False,
    generators: Generators = Generators(),
) -> RewriteResult:
    """Rewrite ``text`` so drive ``key`` uses ``new_files[key]``; see the module doc for the rules."""
    result = RewriteResult(text="")
    out: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if _SECTION.fullmatch(line):
            log.debug("dropping config sections from %r on (snapshots are not restored)", line)
            break
        if _DROPPED.match(line):
            continue
        if m := _DRIVE_LINE.fullmatch(line):
            key, value = m.group(1), m.group(2)
            items = _items(value)
            if key in new_files:
                out.append(f"{key}: {_repoint(items, new_files[key])}")
            elif ("backup", "0") in items and not _is_cdrom(items):
                out.append(f"#{line}")
                result.commented.append(key)
            else:
                if not _is_cdrom(items):
                    result.kept_unmapped.append(key)
                out.append(raw)
            continue
        if m := _VMGENID_LINE.fullmatch(line):
            value = m.group(1)
            out.append(f"vmgenid: {value if value in ('', '0') else generators.uuid()}")
            continue
        if unique and (m := _NET_LINE.fullmatch(line)):
            items = _items(m.group(2))
            fresh = [
                (k, generators.mac()) if k is not None and (k == "macaddr" or i == 0) and _MAC.fullmatch(v) else (k, v)
                for i, (k, v) in enumerate(items)
            ]
            out.append(f"{m.group(1)}: {_join(fresh)}")
            continue
        if unique and (m := _SMBIOS_LINE.fullmatch(line)):
            items = _items(m.group(1)) if m.group(1) else []
            if any(k == "uuid" for k, _ in items):
                items = [(k, generators.uuid() if k == "uuid" else v) for k, v in items]
            else:
                items.insert(0, ("uuid", generators.uuid()))
            out.append(f"smbios1: {_join(items)}")
            continue
        out.append(raw)
    while out and not out[-1].strip():
        out.pop()
    present = {m.group(1) for kept in out if (m := _DRIVE_LINE.fullmatch(kept.strip()))}
    missing = sorted(set(new_files) - present)
    for key in missing:
        # A map line without its drive line: the image would be orphaned, so add the drive.
        log.warning("qemu-server.conf has no '%s:' line for a restored disk; adding one", key)
        out.append(f"{key}: {new_files[key]}")
    result.text = "\n".join(out) + "\n" if out else ""
    return result
