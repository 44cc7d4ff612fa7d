"""The ``qemu-server.conf`` that goes into an archive, assembled as vzdump assembles it.

Proxmox's restore needs the VM config plus one ``#qmdump#map:`` line per
archived disk; everything a restore must not see (snapshot sections, pending
changes, locks, parents, unused volumes, older map lines) is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DROPPED_LINE = re.compile(r"^(#vzdump#|#qmdump#|unused\d+:|lock:|parent:)")
_SECTION = re.compile(r"^\[.*\]\s*$")


@dataclass(frozen=True, slots=True)
class DiskMap:
    """One ``#qmdump#map:<key>:<devname>:<storeid>:<format>:`` line."""

    key: str
    devname: str
    storeid: str = ""
    format: str = ""

    def line(self) -> str:
        for part in (self.key, self.devname, self.storeid, self.format):
            if any(c.isspace() or c == ":" for c in part):
                raise ValueError(f"disk map field {part!r} must not contain spaces or ':'")
        return f"#qmdump#map:{self.key}:{self.devname}:{self.storeid}:{self.format}:"


def assemble(config_text: str, disks: list[DiskMap]) -> bytes:
    """The archive's ``qemu-server.conf``: the main section, cleaned, plus the map lines."""
    kept: list[str] = []
    for line in config_text.splitlines():
        if _SECTION.match(line):
            break
        if _DROPPED_LINE.match(line):
            continue
        kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    kept.extend(d.line() for d in disks)
    return ("\n".join(kept) + "\n").encode()


def vma_device_name(key: str) -> str:
    """The VMA device name Proxmox gives a drive: ``drive-<key>`` (TPM state has its own)."""
    if key.startswith("tpmstate"):
        return f"drive-{key}-backup"
    return f"drive-{key}"
