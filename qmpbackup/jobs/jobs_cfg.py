"""Scheduled backup jobs from ``jobs.cfg`` (Proxmox's ``vzdump: <id>`` sections).

The file has the same format as ``/etc/pve/jobs.cfg`` so Proxmox jobs can be
copied over. Each section holds the job's own keys (``schedule``, ``enabled``,
``repeat-missed``, ``comment``) and any vzdump option, which becomes the job's
option layer (see :mod:`qmpbackup.jobs.vzdump_conf`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from qmpbackup.errors import ConfigError
from qmpbackup.jobs.calendar import (
    CalendarEvent,
    CalendarEventError,
    parse_calendar_event,
)
from qmpbackup.jobs.section_config import (
    Section,
    load_section_config,
    parse_section_config,
)
from qmpbackup.jobs.vzdump_conf import (
    OptionLayer,
    VzdumpOptions,
    layer_from_items,
    merge,
)

log = logging.getLogger(__name__)

JOBS_CFG = "jobs.cfg"
JOB_KEYS = frozenset({"schedule", "enabled", "repeat-missed", "comment", "type"})


@dataclass(frozen=True, slots=True)
class BackupJob:
    """One ``vzdump: <id>`` section."""

    id: str
    schedule: CalendarEvent
    schedule_text: str
    enabled: bool
    repeat_missed: bool
    comment: str | None
    options: OptionLayer  # the vzdump options the job sets (its layer in the precedence)
    origin: str
    text: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # those options as written

    @property
    def settings(self) -> VzdumpOptions:
        """The job's options alone (without vzdump.conf or storage)."""
        return merge(self.options)


def _flag(section: Section, key: str, default: bool) -> bool:
    text = section.options.get(key)
    if text is None:
        return default
    if text not in ("0", "1"):
        raise section.error(key, f"{key}: {text!r} is not 0 or 1")
    return text == "1"


def _job_from(section: Section) -> BackupJob:
    schedule_text = section.options.get("schedule")
    if schedule_text is None:
        raise section.error(None, f"job '{section.id}' has no 'schedule'")
    try:
        schedule = parse_calendar_event(schedule_text)
    except CalendarEventError as exc:
        raise section.error("schedule", str(exc)) from None
    items = [
        (key, value, section.lines.get(key))
        for key, value in section.options.items()
        if key not in JOB_KEYS
    ]
    layer = layer_from_items(items, origin=f"job {section.id}", path=section.path)
    values = layer.values
    if not (values.get("all") or values.get("vmid") or values.get("pool")):
        raise section.error(None, f"job '{section.id}' selects no guests (set vmid, all or pool)")
    return BackupJob(
        id=section.id,
        schedule=schedule,
        schedule_text=schedule_text,
        enabled=_flag(section, "enabled", True),
        repeat_missed=_flag(section, "repeat-missed", False),
        comment=section.options.get("comment"),
        options=layer,
        origin=f"{section.path}:{section.line}",
        text=MappingProxyType({key: value for key, value, _line in items}),
    )


def _jobs_from(sections: list[Section]) -> list[BackupJob]:
    jobs = []
    for section in sections:
        if section.type != "vzdump":
            log.debug("%s:%d: skipping '%s' section", section.path, section.line, section.type)
            continue
        jobs.append(_job_from(section))
    return jobs


def parse_jobs_cfg(text: str, path: str) -> list[BackupJob]:
    return _jobs_from(parse_section_config(text, path))


def load_jobs_cfg(config_dir: Path) -> list[BackupJob]:
    """``<config-dir>/jobs.cfg``; a missing file means no jobs."""
    path = config_dir / JOBS_CFG
    if not path.exists():
        return []
    return _jobs_from(load_section_config(path))


def find_job(jobs: list[BackupJob], job_id: str) -> BackupJob:
    for job in jobs:
        if job.id == job_id:
            return job
    raise ConfigError(f"no job '{job_id}' in {JOBS_CFG}")
