"""Proxmox's section-config file format, shared by storage.cfg and jobs.cfg.

::

    dir: local
    	path /var/lib/vz
    	content iso,vztmpl,backup

A header ``type: id`` starts a section; indented ``key value`` lines (a bare
``key`` means ``1``) belong to it until a blank line. ``#`` starts a comment line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qmpbackup.config_text import read_config_text
from qmpbackup.errors import ConfigError

_HEADER = re.compile(r"^(\S+):\s*(\S+)\s*$")
_PROPERTY = re.compile(r"^\s+(\S+)(?:\s+(.*\S))?\s*$")


@dataclass(frozen=True, slots=True)
class Section:
    """One section as text, with the line of the header and of each property for error messages."""

    type: str
    id: str
    path: str
    line: int
    options: Mapping[str, str] = field(default_factory=dict)
    lines: Mapping[str, int] = field(default_factory=dict)

    def error(self, key: str | None, message: str) -> ConfigError:
        """A ConfigError pointing at ``key``'s line (or the header)."""
        line = self.lines.get(key, self.line) if key is not None else self.line
        return ConfigError(message, self.path, line)


def parse_section_config(text: str, path: str) -> list[Section]:
    """All sections of a file, in file order; a malformed line is a ConfigError naming its line."""
    sections: list[Section] = []
    current: tuple[str, str, int, dict[str, str], dict[str, int]] | None = None

    def finish() -> None:
        nonlocal current
        if current is not None:
            stype, sid, line, options, lines = current
            sections.append(Section(stype, sid, path, line, options, lines))
        current = None

    seen: set[tuple[str, str]] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            finish()
            continue
        if raw.lstrip().startswith("#"):
            continue
        if current is None or not raw[:1].isspace():
            finish()
            header = _HEADER.match(raw)
            if header is None:
                raise ConfigError(f"expected a section header 'type: id', got {raw.strip()!r}", path, number)
            key = (header.group(1), header.group(2))
            if key in seen:
                raise ConfigError(f"duplicate section '{key[0]}: {key[1]}'", path, number)
            seen.add(key)
            current = (header.group(1), header.group(2), number, {}, {})
            continue
        prop = _PROPERTY.match(raw)
        if prop is None:  # pragma: no cover - the regex accepts every indented non-blank line
            raise ConfigError(f"malformed property line {raw.strip()!r}", path, number)
        name, value = prop.group(1), prop.group(2)
        options, lines = current[3], current[4]
        if name in options:
            raise ConfigError(f"duplicate property {name!r} in section '{current[1]}'", path, number)
        options[name] = "1" if value is None else value
        lines[name] = number
    finish()
    return sections


def load_section_config(path: Path) -> list[Section]:
    """Read and parse ``path``; a missing or unreadable file is a ConfigError."""
    try:
        text = read_config_text(path)
    except FileNotFoundError:
        raise ConfigError("file not found", str(path)) from None
    return parse_section_config(text, str(path))
