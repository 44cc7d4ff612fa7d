"""Calendar events beyond the upstream vectors: DST, libc agreement, properties."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpbackup.jobs.calendar import (
    CalendarEventError,
    matches,
    next_event,
    next_events,
    parse_calendar_event,
)

VIENNA = ZoneInfo("Europe/Vienna")


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=VIENNA).timestamp())


def test_spring_forward_gap_is_skipped() -> None:
    # 2019-03-31 02:00-03:00 does not exist in Vienna
    assert next_event("2:30", local(2019, 3, 31, 0, 0), VIENNA) == local(2019, 4, 1, 2, 30)
    hourly = next_events("*:0", local(2019, 3, 31, 0, 30), 3, VIENNA)
    assert hourly == [local(2019, 3, 31, 1, 0), local(2019, 3, 31, 3, 0), local(2019, 3, 31, 4, 0)]


def test_fall_back_ambiguous_hour_stays_in_offset() -> None:
    # 2018-10-28 02:00-03:00 happens twice; from the first pass we stay in summer time
    first = datetime(2018, 10, 28, 2, 0, tzinfo=VIENNA, fold=0)
    events = next_events("*:0/30", int(first.timestamp()) - 60, 4, VIENNA)
    assert events == sorted(events)
    assert events[0] == int(first.timestamp())
    # from the second pass (winter time) we never go back to the first
    second = int(datetime(2018, 10, 28, 2, 10, tzinfo=VIENNA, fold=1).timestamp())
    nxt = next_event("*:0/30", second, VIENNA)
    assert nxt == int(datetime(2018, 10, 28, 2, 30, tzinfo=VIENNA, fold=1).timestamp())


@pytest.fixture
def vienna_process_tz(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Vienna")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("vienna_process_tz")
def test_zoneinfo_agrees_with_libc_mktime_around_dst() -> None:
    """tz=None goes through libc mktime(tm_isdst=-1), as proxmox-time does; zoneinfo must agree."""
    rng = random.Random(6)
    specs = ["*:0/30", "2:30", "*:*", "2:*", "*/15", "mon..fri 2:30", "daily", "1..3:0/20", "sun 2:15"]
    bases = [local(2018, 10, 28, 2, 0), local(2019, 3, 31, 2, 0), local(2020, 3, 29, 2, 0)]
    for base in bases:
        for spec in specs:
            for _ in range(15):
                last = base + rng.randint(-3 * 3600, 3 * 3600)
                for _ in range(4):
                    libc = next_event(spec, last, None)
                    assert libc == next_event(spec, last, VIENNA), (spec, last)
                    if libc is None:
                        break
                    last = libc


def test_never_and_errors() -> None:
    assert next_event("2021-02-29", 0, None) is None
    with pytest.raises(CalendarEventError) as err:
        parse_calendar_event("mon..fry")
    assert "mon..fry" in str(err.value)
    for bad in ["", "*/0", "mon,", "5..3", "Daily", "12:60", "2200-01-01"]:
        with pytest.raises(CalendarEventError):
            parse_calendar_event(bad)


def test_single_number_is_minutes() -> None:
    # proxmox-time quirk: "24:00" is minute 24, second 0 (hour 24 does not parse, so it backtracks)
    assert parse_calendar_event("24:00").minutes == parse_calendar_event("*:24").minutes
    event = parse_calendar_event("mon..fri 22")
    assert event.hours == () and len(event.minutes) == 1


SPECS = st.sampled_from(
    ["*", "*/10", "mon..fri 21:00", "sat 3:15", "0/5:0", "1,4,6", "*-*-01 2:30", "fri..mon 4..10/2:0",
     "quarterly", "weekly", "*:*:30", "22/1:0", "2,4:0,1,3..5", "02-29", "2030..2040-7-15 8:00",
     "wed,mon..tue,fri 12:05:07", "*/2:*", "monthly"]
)


@settings(max_examples=300, deadline=None)
@given(spec=SPECS, after=st.integers(min_value=0, max_value=4_000_000_000),
       zone=st.sampled_from(["UTC", "Europe/Vienna", "America/New_York", "Australia/Lord_Howe"]))
def test_next_event_is_later_and_matches(spec: str, after: int, zone: str) -> None:
    tz = ZoneInfo(zone)
    event = parse_calendar_event(spec)
    nxt = next_event(event, after, tz)
    if nxt is None:
        return
    assert nxt > after
    assert matches(event, nxt, tz)
