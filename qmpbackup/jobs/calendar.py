"""Proxmox calendar events (``mon..fri 21:00``, ``*/15``, ``daily``) and their next trigger time.

Schedules in jobs.cfg must fire exactly when Proxmox's scheduler would fire them,
so the grammar and the search follow proxmox-time's ``CalendarEvent``: the same
accepted syntax, the same field-by-field search with a 1000-step cap, and the
same behaviour of libc ``mktime`` (``tm_isdst = -1``) around DST changes:
wall-clock times inside a spring-forward gap are pushed forward by the gap (so
they are skipped), and an ambiguous fall-back time keeps the UTC offset the
search is currently in.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Callable, TypeVar, Union

from qmpbackup.errors import UsageError

MAX_STEPS = 1000
T = TypeVar("T")


class CalendarEventError(UsageError):
    """A calendar event does not parse."""

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec
        super().__init__(f"unable to parse calendar event {spec!r}: {reason}")


@dataclass(frozen=True, slots=True)
class Single:
    value: int

    def contains(self, v: int) -> bool:
        return v == self.value

    def next_after(self, v: int) -> int | None:
        return self.value if self.value > v else None


@dataclass(frozen=True, slots=True)
class Range:
    start: int
    end: int

    def contains(self, v: int) -> bool:
        return self.start <= v <= self.end

    def next_after(self, v: int) -> int | None:
        if v < self.start:
            return self.start
        return v + 1 if self.start <= v + 1 <= self.end else None


@dataclass(frozen=True, slots=True)
class Repeated:
    """``start/step`` or ``start..end/step``; a step of 0 means just ``start``."""

    start: int
    step: int
    end: int | None = None

    def contains(self, v: int) -> bool:
        if v < self.start:
            return False
        if self.step == 0:
            return v == self.start
        return (v - self.start) % self.step == 0 and (self.end is None or v <= self.end)

    def next_after(self, v: int) -> int | None:
        if v < self.start:
            return self.start
        if self.step == 0:
            return None
        n = self.start + ((v - self.start + self.step) // self.step) * self.step
        # without an end this may pass the field's limit (minute 60): normalisation rolls it over
        return n if self.end is None or n <= self.end else None


Value = Union[Single, Range, Repeated]
# An empty tuple means "any value".
Field = tuple[Value, ...]


def _contains(values: Field, v: int) -> bool:
    return any(x.contains(v) for x in values)


def _next_after(values: Field, v: int) -> int | None:
    found = [n for x in values if (n := x.next_after(v)) is not None]
    return min(found) if found else None


ALL_DAYS = frozenset(range(7))
_WEEKDAYS = {
    "mon": 0, "monday": 0, "tue": 1, "tuesday": 1, "wed": 2, "wednesday": 2,
    "thu": 3, "thursday": 3, "fri": 4, "friday": 4, "sat": 5, "saturday": 5,
    "sun": 6, "sunday": 6,
}  # fmt: skip
_ZERO: Field = (Single(0),)


@dataclass(frozen=True, slots=True)
class CalendarEvent:
    """A parsed event. Weekdays are 0 = Monday … 6 = Sunday; empty means every day."""

    utc: bool = False
    weekdays: frozenset[int] = frozenset()
    years: Field = ()
    months: Field = ()
    days: Field = ()
    hours: Field = ()
    minutes: Field = ()
    seconds: Field = ()
    spec: str = field(default="", compare=False)


_KEYWORDS: dict[str, CalendarEvent] = {
    "minutely": CalendarEvent(seconds=_ZERO),
    "hourly": CalendarEvent(minutes=_ZERO, seconds=_ZERO),
    "daily": CalendarEvent(hours=_ZERO, minutes=_ZERO, seconds=_ZERO),
    "weekly": CalendarEvent(weekdays=frozenset({0}), hours=_ZERO, minutes=_ZERO, seconds=_ZERO),
    "monthly": CalendarEvent(days=(Single(1),), hours=_ZERO, minutes=_ZERO, seconds=_ZERO),
    "yearly": CalendarEvent(
        months=(Single(1),), days=(Single(1),), hours=_ZERO, minutes=_ZERO, seconds=_ZERO
    ),
    "quarterly": CalendarEvent(
        months=tuple(Single(m) for m in (1, 4, 7, 10)),
        days=(Single(1),), hours=_ZERO, minutes=_ZERO, seconds=_ZERO,
    ),
    "semiannually": CalendarEvent(
        months=(Single(1), Single(7)), days=(Single(1),), hours=_ZERO, minutes=_ZERO, seconds=_ZERO
    ),
}  # fmt: skip
_KEYWORDS["annually"] = _KEYWORDS["yearly"]
_KEYWORDS["semi-annually"] = _KEYWORDS["semiannually"]


class _Fail(Exception):
    """Internal: this alternative did not match (the caller may backtrack)."""


class _Parser:
    """A backtracking recursive-descent parser over one spec string."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def rest(self) -> str:
        return self.text[self.pos :]

    def take(self, token: str) -> bool:
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def number(self, limit: int) -> int:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "0123456789":
            self.pos += 1
        if self.pos == start:
            raise _Fail("expected a number")
        digits = self.text[start : self.pos]
        if len(digits) > 10 or int(digits) >= limit:
            raise _Fail(f"value {digits} is too large (must be below {limit})")
        return int(digits)

    def attempt(self, parse: Callable[..., T], *args: int) -> T | None:
        """Run ``parse``; on failure restore the position and return None."""
        saved = self.pos
        try:
            return parse(*args)
        except _Fail:
            self.pos = saved
            return None

    # -- value lists ------------------------------------------------------------------------
    def comp(self, limit: int) -> Value:
        value = self.number(limit)
        saved = self.pos
        if self.take(".."):
            try:
                end = self.number(limit)
            except _Fail:
                self.pos = saved
            else:
                if value > end:
                    raise _Fail(f"range start {value} is bigger than its end {end}")
                if self.take("/"):
                    return Repeated(value, self.number(limit), end)
                return Range(value, end)
        if self.take("/"):
            return Repeated(value, self.number(limit))
        return Single(value)

    def comp_list(self, start: int, limit: int) -> Field:
        if self.take("*"):
            saved = self.pos
            if self.take("/"):
                step = self.number(limit)
                if step > 0:
                    return (Repeated(start, step),)
                self.pos = saved
            return ()
        values = [self.comp(limit)]
        while True:
            saved = self.pos
            if not self.take(","):
                break
            item = self.attempt(self.comp, limit)
            if item is None:
                self.pos = saved
                break
            values.append(item)
        return tuple(values)

    # -- parts ------------------------------------------------------------------------------
    def weekday(self) -> int:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isascii() and self.text[self.pos].isalpha():
            self.pos += 1
        word = self.text[start : self.pos].lower()
        if word not in _WEEKDAYS:
            raise _Fail(f"unknown weekday {self.text[start:self.pos]!r}")
        return _WEEKDAYS[word]

    def weekday_range(self) -> set[int]:
        first = self.weekday()
        saved = self.pos
        if self.take(".."):
            try:
                last = self.weekday()
            except _Fail:
                self.pos = saved
                return {first}
            if first > last:  # fri..mon wraps around the week end
                return set(range(first, 7)) | set(range(0, last + 1))
            return set(range(first, last + 1))
        return {first}

    def weekday_list(self) -> frozenset[int]:
        days = self.weekday_range()
        while True:
            saved = self.pos
            if not self.take(","):
                break
            more = self.attempt(self.weekday_range)
            if more is None:
                self.pos = saved
                break
            days |= more
        return frozenset(days)

    def date_spec(self) -> tuple[Field, Field, Field]:
        saved = self.pos
        try:
            years = self.comp_list(0, 2200)
            if not self.take("-"):
                raise _Fail("expected '-'")
            months = self.comp_list(1, 13)
            if not self.take("-"):
                raise _Fail("expected '-'")
            return years, months, self.comp_list(1, 32)
        except _Fail:
            self.pos = saved
        months = self.comp_list(1, 13)
        if not self.take("-"):
            raise _Fail("expected '-'")
        return (), months, self.comp_list(1, 32)

    def time_spec(self) -> tuple[Field, Field, Field]:
        hours: Field = ()
        saved = self.pos
        try:
            hours = self.comp_list(0, 24)
            if not self.take(":"):
                raise _Fail("expected ':'")
        except _Fail:
            self.pos = saved
            hours = ()
        minutes = self.comp_list(0, 60)
        seconds: Field = _ZERO
        saved = self.pos
        if self.take(":"):
            try:
                seconds = self.comp_list(0, 60)
            except _Fail:
                self.pos = saved
                seconds = _ZERO
        return hours, minutes, seconds


def parse_calendar_event(spec: str) -> CalendarEvent:
    """Parse a calendar event as proxmox-time does; :class:`CalendarEventError` if it does not parse."""
    text = spec
    utc = False
    if text.endswith("UTC"):
        utc = True
        text = text[: -len("UTC")].rstrip(" ")
    parser = _Parser(text)
    weekdays: frozenset[int] = frozenset()
    has_part = False
    try:
        if text[:1].isascii() and text[:1].isalpha():
            keyword = _KEYWORDS.get(text)
            if keyword is not None:
                return CalendarEvent(
                    utc, keyword.weekdays, keyword.years, keyword.months, keyword.days,
                    keyword.hours, keyword.minutes, keyword.seconds, spec,
                )  # fmt: skip
            weekdays = parser.weekday_list()
            has_part = True
            parser.spaces()
        years: Field = ()
        months: Field = ()
        days: Field = ()
        date = parser.attempt(parser.date_spec)
        if date is not None:
            years, months, days = date
            has_part = True
            parser.spaces()
        hours, minutes, seconds = _ZERO, _ZERO, _ZERO
        clock = parser.attempt(parser.time_spec)
        if clock is not None:
            hours, minutes, seconds = clock
            has_part = True
    except _Fail as exc:
        raise CalendarEventError(spec, str(exc)) from None
    if not has_part:
        raise CalendarEventError(spec, "event is empty" if not text else "expected a date or time")
    if parser.rest():
        raise CalendarEventError(spec, f"unexpected {parser.rest()!r}")
    return CalendarEvent(utc, weekdays, years, months, days, hours, minutes, seconds, spec)


# -- next-event search ------------------------------------------------------------------------

_UTC = timezone.utc


def _mktime_epoch(dt: datetime) -> int:
    return int(time.mktime((dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second, 0, 0, -1)))


class _Clock:
    """A broken-down time that is renormalised after every edit, like proxmox-time's TmEditor."""

    def __init__(self, epoch: int, tz: tzinfo | None) -> None:
        self.tz = tz
        self.epoch = epoch
        self.offset = 0
        self.wall = self._to_wall(epoch)

    def _to_wall(self, epoch: int) -> datetime:
        if self.tz is None:
            t = time.localtime(epoch)
            # glibc's mktime starts from the offset of its previous call, which decides an
            # ambiguous (fall-back) time: seed it with ours so the answer is repeatable
            time.mktime(t)
            self.offset = t.tm_gmtoff
            return datetime(t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
        aware = datetime.fromtimestamp(epoch, self.tz)
        off = aware.utcoffset()
        self.offset = int(off.total_seconds()) if off is not None else 0
        return aware.replace(tzinfo=None)

    def _resolve(self, wall: datetime) -> int:
        """Unix seconds for a local wall time, as ``mktime`` with ``tm_isdst = -1`` picks them."""
        if self.tz is None:
            return _mktime_epoch(wall)
        candidates = []
        for fold in (0, 1):
            aware = wall.replace(tzinfo=self.tz, fold=fold)
            off = aware.utcoffset()
            secs = int(off.total_seconds()) if off is not None else 0
            candidates.append((calendar.timegm(wall.timetuple()) - secs, secs))
        (e0, o0), (e1, o1) = candidates
        if o0 == o1:
            return e0
        valid = [
            (e, o) for e, o in candidates if datetime.fromtimestamp(e, self.tz).replace(tzinfo=None) == wall
        ]
        if not valid:  # inside a gap: the offset from before the change (fold=0), moving forward
            return e0
        # ambiguous: glibc keeps the offset of its previous mktime call, which within one
        # search is the offset we are in; this never steps back before `last`
        for e, o in valid:
            if o == self.offset:
                return e
        return valid[0][0]

    def set(
        self, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
    ) -> None:
        """Set (possibly out-of-range) fields and renormalise, as ``mktime`` does."""
        year += (month - 1) // 12
        month = (month - 1) % 12 + 1
        wall = datetime(year, month, 1) + timedelta(
            days=day - 1, hours=hour, minutes=minute, seconds=second
        )
        if self.tz is _UTC:
            epoch = calendar.timegm(wall.timetuple())
        else:
            epoch = self._resolve(wall)
        self.epoch = epoch
        self.wall = self._to_wall(epoch)

    # the editing steps of the search; each resets every smaller field
    def add_years(self, n: int) -> None:
        if n:
            self.set(self.wall.year + n, 1, 1)

    def add_months(self, n: int) -> None:
        if n:
            self.set(self.wall.year, self.wall.month + n, 1)

    def add_days(self, n: int) -> None:
        w = self.wall
        if n:
            self.set(w.year, w.month, w.day + n)

    def set_time(self, hour: int, minute: int, second: int) -> None:
        w = self.wall
        self.set(w.year, w.month, w.day, hour, minute, second)

    def set_min_sec(self, minute: int, second: int) -> None:
        w = self.wall
        self.set(w.year, w.month, w.day, w.hour, minute, second)

    def set_sec(self, second: int) -> None:
        w = self.wall
        self.set(w.year, w.month, w.day, w.hour, w.minute, second)


def _search(event: CalendarEvent, last: int, tz: tzinfo | None) -> int | None:
    t = _Clock(last + 1, _UTC if event.utc else tz)
    all_days = not event.weekdays or event.weekdays == ALL_DAYS
    for _ in range(MAX_STEPS + 1):
        w = t.wall
        if event.years and not _contains(event.years, w.year):
            n = _next_after(event.years, w.year)
            if n is None:
                return None
            t.add_years(n - w.year)
            continue
        if event.months and not _contains(event.months, w.month):
            n = _next_after(event.months, w.month)
            if n is None:
                t.add_years(1)
            else:
                t.add_months(n - w.month)
            continue
        if event.days and not _contains(event.days, w.day):
            n = _next_after(event.days, w.day)
            if n is None:
                t.add_months(1)
            else:
                t.add_days(n - w.day)
            continue
        if not all_days:
            wd = w.weekday()
            if wd not in event.weekdays:
                later = [d for d in range(wd + 1, 7) if d in event.weekdays]
                t.add_days((later[0] if later else 7) - wd)
                continue
        if event.hours and not _contains(event.hours, w.hour):
            n = _next_after(event.hours, w.hour)
            if n is None:
                t.add_days(1)
            else:
                t.set_time(n, 0, 0)
            continue
        if event.minutes and not _contains(event.minutes, w.minute):
            n = _next_after(event.minutes, w.minute)
            if n is None:
                t.set_time(w.hour + 1, 0, 0)
            else:
                t.set_min_sec(n, 0)
            continue
        if event.seconds and not _contains(event.seconds, w.second):
            n = _next_after(event.seconds, w.second)
            if n is None:
                t.set_min_sec(w.minute + 1, 0)
            else:
                t.set_sec(n)
            continue
        return t.epoch
    return None


def next_event(spec: str | CalendarEvent, after_epoch: int, tz: tzinfo | None = None) -> int | None:
    """The first time strictly after ``after_epoch`` that the event fires, or None if it never does.

    ``tz`` is the local time zone (a ``zoneinfo.ZoneInfo``); None uses the process's ``TZ``.
    A spec ending in ``UTC`` is always computed in UTC.
    """
    event = spec if isinstance(spec, CalendarEvent) else parse_calendar_event(spec)
    try:
        return _search(event, after_epoch, tz)
    except (OverflowError, ValueError):  # beyond datetime's range (year 9999): never
        return None


def next_events(
    spec: str | CalendarEvent, after_epoch: int, count: int, tz: tzinfo | None = None
) -> list[int]:
    """The next ``count`` trigger times after ``after_epoch`` (fewer if the event stops firing)."""
    event = spec if isinstance(spec, CalendarEvent) else parse_calendar_event(spec)
    result: list[int] = []
    last = after_epoch
    for _ in range(count):
        nxt = next_event(event, last, tz)
        if nxt is None:
            break
        result.append(nxt)
        last = nxt
    return result


def matches(event: CalendarEvent, epoch: int, tz: tzinfo | None = None) -> bool:
    """Whether the event fires at exactly ``epoch`` (for tests and the scheduler's sanity checks)."""
    w = _Clock(epoch, _UTC if event.utc else tz).wall
    fields: Sequence[tuple[Field, int]] = (
        (event.years, w.year), (event.months, w.month), (event.days, w.day),
        (event.hours, w.hour), (event.minutes, w.minute), (event.seconds, w.second),
    )  # fmt: skip
    if any(values and not _contains(values, v) for values, v in fields):
        return False
    return not event.weekdays or w.weekday() in event.weekdays
