"""The guest definition a restore writes, and the VM it may replace or start.

An archive carries only the VM's Proxmox config; how this host reaches and
starts the VM (the ``[qmpbackup]`` section: sockets, ``start:``) is host
knowledge. So a restore over an existing definition (``--force``) keeps that
section, and ``--start`` works only when the definition has a ``start:``
command.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.errors import ConfigError
from qmpbackup.guest_config import SECTION, GuestDefinition, guest_path, parse_guest
from qmpbackup.qemu.start_command import qmp_accepts, run_start_command
from qmpbackup.restore.errors import RestoreError, RestoreRefusedError

log = logging.getLogger(__name__)

_SECTION_RE = re.compile(r"\[([^\]\s]+)\]\s*")


@dataclass(frozen=True, slots=True)
class ExistingGuest:
    """What is on disk now: the file's text, its parsed form (None if it does not parse), our section."""

    path: Path
    text: str
    definition: GuestDefinition | None
    section_text: str  # the [qmpbackup] section verbatim, "" if none


def agent_section(text: str) -> str:
    """The ``[qmpbackup]`` section of a definition's text, verbatim (header included)."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        m = _SECTION_RE.fullmatch(line.strip())
        if m:
            inside = m.group(1) == SECTION
        if inside:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out) + "\n" if out else ""


def read_existing(config_dir: Path, vmid: int) -> ExistingGuest | None:
    path = guest_path(config_dir, vmid)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RestoreError(f"cannot read the existing guest definition {path}: {exc.strerror or exc}") from exc
    definition: GuestDefinition | None
    try:
        definition = parse_guest(text, vmid, path)
    except ConfigError as exc:
        log.warning("the existing guest definition does not parse (%s); it will be replaced as a whole", exc)
        definition = None
    return ExistingGuest(path, text, definition, agent_section(text))


def refuse_if_running(existing: ExistingGuest, vmid: int) -> None:
    """Proxmox refuses to restore over a running VM; so do we, when we can tell."""
    definition = existing.definition
    if definition is not None and definition.reach.qmp is not None and qmp_accepts(definition.reach.qmp):
        raise RestoreRefusedError(
            f"VM {vmid} is running (its QMP socket {definition.reach.qmp} accepts connections); stop it first"
        )


def definition_text(proxmox_text: str, existing: ExistingGuest | None) -> str:
    """The new definition: the rewritten config, then the kept ``[qmpbackup]`` section."""
    section = existing.section_text if existing is not None else ""
    return proxmox_text + ("\n" + section if section else "")


async def start_guest(definition: GuestDefinition) -> None:
    """Run the definition's ``start:`` command, as stop mode does (:func:`run_start_command`)."""
    command = definition.reach.start
    if command is None:
        raise RestoreError(f"VM {definition.vmid} has no start command ('start:' in [{SECTION}])")
    log.info("starting VM %d: %s", definition.vmid, " ".join(command))
    for line in (await run_start_command(definition.vmid, command)).splitlines():
        log.info("%s", line)
