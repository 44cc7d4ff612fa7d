"""Which backups of one guest to keep: Proxmox's ``prune-backups`` selection, exactly.

The selection must match Proxmox (PBS ``compute_prune_info``, PVE
``prune_mark_backup_group``) so that a user moving between the two sees the same
backups disappear. It is a pure function over records: no files, no clock.
Period boundaries are local time, taken from ``tz`` (or the process's ``TZ``).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, tzinfo
from typing import Hashable

from qmpbackup.config_text import INT64_MAX, parse_integer
from qmpbackup.errors import UsageError


class PruneSpecError(UsageError):
    """A ``prune-backups`` value is malformed."""


class Mark(enum.StrEnum):
    KEEP = "keep"
    REMOVE = "remove"
    PROTECTED = "protected"
    RENAMED = "renamed"  # not a standard vzdump name: never grouped, never pruned


# Option names in the fixed order they are applied (finest first).
KEEP_OPTIONS = ("keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly", "keep-yearly")


@dataclass(frozen=True, slots=True)
class PruneOptions:
    """A parsed ``prune-backups`` value. ``None`` means the option is not set."""

    keep_all: bool = False
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None

    def keeps_everything(self) -> bool:
        """The keep-all guard: ``keep-all=1``, or no option above zero."""
        return self.keep_all or not any((getattr(self, _attr(o)) or 0) > 0 for o in KEEP_OPTIONS)

    def render(self, separator: str = ",") -> str:
        """The property-string form (``keep-daily=7,keep-last=3``); vzdump's log uses ``", "``."""
        if self.keep_all:
            return "keep-all=1"
        parts = [f"{o}={getattr(self, _attr(o))}" for o in sorted(KEEP_OPTIONS) if getattr(self, _attr(o))]
        return separator.join(parts) if parts else "keep-all=1"


KEEP_ALL = PruneOptions(keep_all=True)


def _attr(option: str) -> str:
    return option.replace("-", "_")


def parse_prune_spec(value: str) -> PruneOptions:
    """Parse ``keep-last=3,keep-daily=7`` (or ``keep-all=1``); all zero means keep-all.

    Raises :class:`PruneSpecError` with a one-line message on a bad key or value.
    """
    if value.strip() and not value.replace(",", "").strip():
        raise PruneSpecError(f"{value!r} sets no option")
    settings: dict[str, int] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, raw = part.partition("=")
        key = key.strip()
        if key != "keep-all" and key not in KEEP_OPTIONS:
            raise PruneSpecError(f"unknown option {key!r}")
        if not eq:
            raise PruneSpecError(f"{key} needs a value")
        if key in settings:
            raise PruneSpecError(f"{key} given twice")
        try:
            settings[key] = parse_integer(raw, 0, 1 if key == "keep-all" else INT64_MAX)
        except ValueError as exc:
            raise PruneSpecError(f"{key}: {exc}") from None
    keep_all = settings.pop("keep-all", 0) == 1
    if keep_all and any(settings.values()):
        raise PruneSpecError("keep-all cannot be combined with other keep options")
    options = PruneOptions(keep_all=keep_all, **{_attr(k): v for k, v in settings.items()})
    return KEEP_ALL if options.keeps_everything() else options


def from_maxfiles(maxfiles: int) -> PruneOptions:
    """The deprecated ``maxfiles`` N is ``keep-last=N`` (0 meant unlimited)."""
    return KEEP_ALL if maxfiles <= 0 else PruneOptions(keep_last=maxfiles)


@dataclass(frozen=True, slots=True)
class BackupRecord:
    """One backup of a group: ``key`` identifies it (e.g. the file name), ``ctime`` is Unix seconds."""

    key: Hashable
    ctime: int
    protected: bool = False


PeriodFn = Callable[[int, BackupRecord], Hashable]


def _local(ctime: int, tz: tzinfo | None) -> datetime:
    if tz is None:
        return datetime(*time.localtime(ctime)[:6])
    return datetime.fromtimestamp(ctime, tz)


def _period_fns(tz: tzinfo | None) -> dict[str, PeriodFn]:
    def last(ctime: int, rec: BackupRecord) -> Hashable:
        return ("last", rec.key)

    def hourly(ctime: int, rec: BackupRecord) -> Hashable:
        t = _local(ctime, tz)
        return (t.year, t.month, t.day, t.hour)

    def daily(ctime: int, rec: BackupRecord) -> Hashable:
        t = _local(ctime, tz)
        return (t.year, t.month, t.day)

    def weekly(ctime: int, rec: BackupRecord) -> Hashable:
        iso = _local(ctime, tz).isocalendar()
        return (iso.year, iso.week)

    def monthly(ctime: int, rec: BackupRecord) -> Hashable:
        t = _local(ctime, tz)
        return (t.year, t.month)

    def yearly(ctime: int, rec: BackupRecord) -> Hashable:
        return _local(ctime, tz).year

    return {
        "keep-last": last,
        "keep-hourly": hourly,
        "keep-daily": daily,
        "keep-weekly": weekly,
        "keep-monthly": monthly,
        "keep-yearly": yearly,
    }


def compute_marks(
    records: Sequence[BackupRecord], options: PruneOptions, tz: tzinfo | None = None
) -> dict[Hashable, Mark]:
    """Mark each record of ONE group, without the keep-all guard (PBS ``compute_prune_info``).

    An option set to 0 keeps nothing, so ``keep-last=0`` alone removes everything;
    use :func:`mark_group` for the user-facing semantics.
    """
    newest_first = sorted(records, key=lambda r: r.ctime, reverse=True)
    marks: dict[Hashable, Mark] = {}
    for option, period_of in _period_fns(tz).items():
        quota = getattr(options, _attr(option))
        if quota is None:
            continue
        covered = {period_of(r.ctime, r) for r in newest_first if marks.get(r.key) is Mark.KEEP}
        included: set[Hashable] = set()
        for rec in newest_first:
            if rec.key in marks:
                continue
            if rec.protected:
                marks[rec.key] = Mark.PROTECTED
                continue
            period = period_of(rec.ctime, rec)
            if period in covered:
                continue
            if period in included:
                marks[rec.key] = Mark.REMOVE
            elif len(included) >= quota:
                break
            else:
                included.add(period)
                marks[rec.key] = Mark.KEEP
    return {
        r.key: Mark.PROTECTED if r.protected else marks.get(r.key, Mark.REMOVE) for r in newest_first
    }


def mark_group(
    records: Sequence[BackupRecord], options: PruneOptions, tz: tzinfo | None = None
) -> dict[Hashable, Mark]:
    """Mark each record of ONE group as Proxmox's prune does, with the keep-all guard."""
    if options.keeps_everything():
        return {r.key: Mark.PROTECTED if r.protected else Mark.KEEP for r in records}
    return compute_marks(records, options, tz)


def counts(marks: Mapping[Hashable, Mark] | Iterable[Mark]) -> dict[Mark, int]:
    """How many of each mark, for summary lines."""
    values = marks.values() if isinstance(marks, Mapping) else marks
    result = {m: 0 for m in Mark}
    for m in values:
        result[m] += 1
    return result


__all__ = [
    "KEEP_ALL",
    "KEEP_OPTIONS",
    "BackupRecord",
    "Mark",
    "PruneOptions",
    "PruneSpecError",
    "compute_marks",
    "counts",
    "from_maxfiles",
    "mark_group",
    "parse_prune_spec",
]

# keep the dataclass field list and KEEP_OPTIONS in step
assert {f.name for f in fields(PruneOptions)} == {"keep_all", *(_attr(o) for o in KEEP_OPTIONS)}
