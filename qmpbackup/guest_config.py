"""Guest definitions: ``<config-dir>/guests/<vmid>.conf``, Proxmox ``qemu-server.conf`` syntax.

A definition says what the VM is (drives, agent, name — the part that goes into the
archive as ``qemu-server.conf``) and how this agent reaches and starts it (sockets,
start command — agent-only). The agent-only keys live in a ``[qmpbackup]`` section::

    # Web server (leading comment lines become the VM's notes in Proxmox)
    name: web1
    memory: 2048
    agent: 1,freeze-fs=0
    scsi0: /var/lib/vms/web1/root.qcow2,format=qcow2,size=32G
    virtio1: /var/lib/vms/web1/scratch.raw,format=raw,backup=0
    ide2: none,media=cdrom

    [qmpbackup]
    qmp: /run/qemu/web1.qmp
    qga: /run/qemu/web1.qga
    start: systemctl start qemu@web1
    qemu: /usr/bin/qemu-system-x86_64
    accel: tcg

Why a section and not ``#qmpbackup:`` comment lines: Proxmox turns comment lines into
the VM's description, so they would leak into the restored VM's notes. A ``[name]``
section is a snapshot to Proxmox's parser; :attr:`GuestDefinition.proxmox_text` holds
only the main part (before the first section), which is what goes into an archive.

A running VM needs no file: :func:`guest_from_running` builds a definition from
``--qmp``/``--qga`` and the disks discovered over QMP.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qmpbackup.config_text import INT64_MAX, parse_integer, read_config_text
from qmpbackup.errors import ConfigError

SECTION = "qmpbackup"
VMID_MIN, VMID_MAX = 100, 999_999_999
DRIVE_LIMITS = {"ide": 4, "sata": 6, "scsi": 31, "virtio": 16}
_DRIVE_RE = re.compile(r"(ide|sata|scsi|virtio)([0-9]{1,2})")
_LINE_RE = re.compile(r"([a-z][a-z0-9_-]*)\s*:\s*(.*?)\s*")
_SECTION_RE = re.compile(r"\[([^\]\s]+)\]\s*")
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([KMGT]?)")
_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_ACCELS = ("tcg", "kvm")
_FORMATS = ("raw", "qcow2", "vmdk", "qed", "vdi", "vpc", "vhdx")
_SECTION_KEYS = ("qmp", "qga", "start", "qemu", "accel")


@dataclass(frozen=True, slots=True)
class DriveConfig:
    """One drive line. ``volume`` is None for ``none`` (no medium)."""

    key: str
    volume: str | None
    format: str
    cdrom: bool
    backup: bool
    read_only: bool
    options: tuple[tuple[str, str], ...]
    line: int

    @property
    def bus(self) -> str:
        m = _DRIVE_RE.fullmatch(self.key)
        assert m is not None
        return m.group(1)

    @property
    def index(self) -> int:
        m = _DRIVE_RE.fullmatch(self.key)
        assert m is not None
        return int(m.group(2))

    def option(self, name: str) -> str | None:
        return dict(self.options).get(name)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """``agent: [enabled=]0|1[,freeze-fs=0|1]`` (``freeze-fs-on-backup`` is the old name)."""

    enabled: bool = False
    freeze_fs: bool = True


@dataclass(frozen=True, slots=True)
class Reach:
    """How this agent talks to and starts the VM (the ``[qmpbackup]`` section)."""

    qmp: Path | None = None
    qga: Path | None = None
    start: tuple[str, ...] | None = None
    qemu: str | None = None
    accel: str = "tcg"


@dataclass(frozen=True, slots=True)
class GuestDefinition:
    """A VM as this agent knows it. ``drives`` are sorted by key as strings."""

    vmid: int
    path: Path | None
    name: str | None
    memory_mib: int | None
    agent: AgentConfig
    drives: tuple[DriveConfig, ...]
    options: tuple[tuple[str, str], ...]  # every key of the main part, in file order
    reach: Reach
    proxmox_text: str  # the main part verbatim: what goes into an archive

    def drive(self, key: str) -> DriveConfig | None:
        return next((d for d in self.drives if d.key == key), None)

    @property
    def disks(self) -> tuple[DriveConfig, ...]:
        """Drives with a medium that are not CD-ROMs (backed up unless ``backup=0``)."""
        return tuple(d for d in self.drives if not d.cdrom and d.volume is not None)

    def option(self, name: str) -> str | None:
        return dict(self.options).get(name)


def guest_path(config_dir: Path, vmid: int) -> Path:
    return config_dir / "guests" / f"{vmid}.conf"


def check_vmid(vmid: int | str, path: str | None = None) -> int:
    """A Proxmox VM id (100 … 999999999, no leading zeros). :raise ConfigError: otherwise."""
    text = str(vmid).strip()
    try:
        value = parse_integer(text, VMID_MIN, VMID_MAX)
    except ValueError as exc:
        raise ConfigError(f"VM ID {exc}", path) from None
    if text != str(value):
        raise ConfigError(f"VM ID {text!r} has leading zeros", path)
    return value


def load_guest(config_dir: Path, vmid: int) -> GuestDefinition:
    """Read ``<config-dir>/guests/<vmid>.conf``.

    :raise ConfigError: the file is missing, unreadable or wrong (naming file and line).
    """
    path = guest_path(config_dir, vmid)
    try:
        text = read_config_text(path)
    except FileNotFoundError:
        raise ConfigError(f"VM {vmid} has no guest definition (and no --qmp was given)", str(path)) from None
    return parse_guest(text, vmid, path)


def _flag(value: str, what: str, where: str, line: int) -> bool:
    if value in ("1", "0"):
        return value == "1"
    raise ConfigError(f"{what} must be 0 or 1, not {value!r}", where, line)


def _property_string(value: str, default_key: str, where: str, line: int) -> list[tuple[str, str]]:
    """``a,b=c,d=e`` → [(default_key, a), (b, c), (d, e)] (the bare item only first)."""
    out: list[tuple[str, str]] = []
    for i, item in enumerate(value.split(",")):
        item = item.strip()
        if not item:
            raise ConfigError(f"empty item in {value!r}", where, line)
        if "=" in item:
            k, _, v = item.partition("=")
            out.append((k.strip(), v.strip()))
        elif i == 0:
            out.append((default_key, item))
        else:
            raise ConfigError(f"item {item!r} has no '=' in {value!r}", where, line)
    keys = [k for k, _ in out]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise ConfigError(f"option {dup!r} given twice in {value!r}", where, line)
    return out


def _parse_agent(value: str, where: str, line: int) -> AgentConfig:
    props = dict(_property_string(value, "enabled", where, line))
    enabled = _flag(props.pop("enabled", "0"), "agent enabled", where, line)
    freeze = props.pop("freeze-fs", props.pop("freeze-fs-on-backup", "1"))
    props.pop("fstrim_cloned_disks", None)
    props.pop("type", None)
    if props:
        raise ConfigError(f"unknown agent option {next(iter(props))!r}", where, line)
    return AgentConfig(enabled=enabled, freeze_fs=_flag(freeze, "agent freeze-fs", where, line))


def _guess_format(volume: str) -> str:
    suffix = volume.rsplit(".", 1)[-1].lower() if "." in volume.rsplit("/", 1)[-1] else ""
    return suffix if suffix in _FORMATS else "raw"


def _parse_drive(key: str, value: str, where: str, line: int) -> DriveConfig:
    m = _DRIVE_RE.fullmatch(key)
    assert m is not None
    if int(m.group(2)) >= DRIVE_LIMITS[m.group(1)]:
        raise ConfigError(
            f"{key}: {m.group(1)} drives go up to {m.group(1)}{DRIVE_LIMITS[m.group(1)] - 1}", where, line
        )
    props = _property_string(value, "file", where, line)
    opts = dict(props)
    volume = opts.get("file")
    if not volume:
        raise ConfigError(f"{key}: no volume (expected '{key}: /path/disk.qcow2,format=qcow2')", where, line)
    media = opts.get("media", "disk")
    if media not in ("disk", "cdrom"):
        raise ConfigError(f"{key}: media must be disk or cdrom, not {media!r}", where, line)
    fmt = opts.get("format") or _guess_format(volume)
    if fmt not in _FORMATS:
        raise ConfigError(f"{key}: unknown format {fmt!r} (one of {', '.join(_FORMATS)})", where, line)
    if "size" in opts and not _SIZE_RE.fullmatch(opts["size"]):
        raise ConfigError(f"{key}: bad size {opts['size']!r} (e.g. 32G)", where, line)
    return DriveConfig(
        key=key,
        volume=None if volume == "none" else volume,
        format=fmt,
        cdrom=media == "cdrom",
        backup=_flag(opts.get("backup", "1"), f"{key} backup", where, line),
        read_only=_flag(opts.get("ro", "0"), f"{key} ro", where, line),
        options=tuple((k, v) for k, v in props if k != "file"),
        line=line,
    )


def _parse_reach(entries: Sequence[tuple[str, str, int]], where: str) -> Reach:
    values: dict[str, str] = {}
    for key, value, line in entries:
        if key not in _SECTION_KEYS:
            raise ConfigError(f"unknown key {key!r} in [{SECTION}] (known: {', '.join(_SECTION_KEYS)})", where, line)
        relative = value.startswith(("~", ".")) if key == "qemu" else not value.startswith("/")
        if key in ("qmp", "qga", "qemu") and relative:
            raise ConfigError(f"{key} must be an absolute path, not {value!r}", where, line)
        if key == "accel" and value not in _ACCELS:
            raise ConfigError(f"accel must be one of {', '.join(_ACCELS)}, not {value!r}", where, line)
        if key == "start":
            try:
                if not shlex.split(value):
                    raise ValueError("empty command")
            except ValueError as e:
                raise ConfigError(f"start: cannot split {value!r} into words: {e}", where, line) from None
        values[key] = value
    return Reach(
        qmp=Path(values["qmp"]) if "qmp" in values else None,
        qga=Path(values["qga"]) if "qga" in values else None,
        start=tuple(shlex.split(values["start"])) if "start" in values else None,
        qemu=values.get("qemu"),
        accel=values.get("accel", "tcg"),
    )


def parse_guest(text: str, vmid: int, path: Path | None = None) -> GuestDefinition:
    """Parse a definition's text; ``path`` is only used in messages.

    :raise ConfigError: naming the file and the 1-based line of the first problem.
    """
    where = str(path) if path is not None else f"<guest {vmid}>"
    vmid = check_vmid(vmid, where)
    main: list[tuple[str, str, int]] = []
    ours: list[tuple[str, str, int]] = []
    main_lines: list[str] = []
    section: str | None = None
    seen_sections: set[str] = set()
    for n, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        sec = _SECTION_RE.fullmatch(stripped)
        if sec:
            section = sec.group(1)
            if section in seen_sections:
                raise ConfigError(f"section [{section}] appears twice", where, n)
            seen_sections.add(section)
            continue
        if section is None:
            main_lines.append(raw)
        if not stripped or stripped.startswith("#"):
            continue
        if section not in (None, SECTION):
            continue  # a snapshot or pending section: Proxmox's business, not ours
        m = _LINE_RE.fullmatch(stripped)
        if m is None:
            raise ConfigError(f"expected 'key: value', got {stripped!r}", where, n)
        (main if section is None else ours).append((m.group(1), m.group(2), n))

    seen: dict[str, int] = {}
    for key, _, n in [*main, *((f"[{SECTION}].{k}", v, n) for k, v, n in ours)]:
        if key in seen:
            raise ConfigError(f"{key} is set twice (first on line {seen[key]})", where, n)
        seen[key] = n

    name: str | None = None
    memory: int | None = None
    agent = AgentConfig()
    drives: list[DriveConfig] = []
    for key, value, n in main:
        if _DRIVE_RE.fullmatch(key):
            drives.append(_parse_drive(key, value, where, n))
        elif key == "name":
            if not _NAME_RE.fullmatch(value):
                raise ConfigError(f"name {value!r} is not a valid DNS name", where, n)
            name = value
        elif key == "memory":
            try:
                memory = parse_integer(value, 16, INT64_MAX >> 20)
            except ValueError as exc:
                raise ConfigError(f"memory must be a number of MiB (at least 16): {exc}", where, n) from None
        elif key == "agent":
            agent = _parse_agent(value, where, n)
        elif key in ("qmp", "qga", "start", "accel"):
            raise ConfigError(f"{key} belongs in the [{SECTION}] section, not in the VM's config", where, n)
    while main_lines and not main_lines[-1].strip():
        main_lines.pop()
    return GuestDefinition(
        vmid=vmid,
        path=path,
        name=name,
        memory_mib=memory,
        agent=agent,
        drives=tuple(sorted(drives, key=lambda d: d.key)),
        options=tuple((k, v) for k, v, _ in main),
        reach=_parse_reach(ours, where),
        proxmox_text="\n".join(main_lines) + "\n" if main_lines else "",
    )


class DiscoveredDisk(Protocol):
    """What :func:`guest_from_running` needs of a discovered disk."""

    @property
    def key(self) -> str: ...
    @property
    def filename(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def read_only(self) -> bool: ...


def format_size(size: int) -> str:
    """Bytes in Proxmox's size syntax, exact: ``32G``, ``1536M``, ``4100K`` or plain bytes."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def guest_from_running(
    vmid: int, qmp: Path, qga: Path | None, disks: Iterable[DiscoveredDisk], name: str | None = None
) -> GuestDefinition:
    """A minimal definition for a running VM reached by ``--qmp [--qga]``, from its disks."""
    vmid = check_vmid(vmid)
    lines: list[str] = []
    if name:
        lines.append(f"name: {name}")
    if qga is not None:
        lines.append("agent: 1")
    for d in sorted(disks, key=lambda d: d.key):
        ro = ",ro=1" if d.read_only else ""
        lines.append(f"{d.key}: {d.filename},format={d.format}{ro},size={format_size(d.size)}")
    text = "\n".join(lines) + "\n"
    parsed = parse_guest(text, vmid)
    return GuestDefinition(
        vmid=parsed.vmid,
        path=None,
        name=parsed.name,
        memory_mib=None,
        agent=parsed.agent,
        drives=parsed.drives,
        options=parsed.options,
        reach=Reach(qmp=qmp, qga=qga),
        proxmox_text=parsed.proxmox_text,
    )
