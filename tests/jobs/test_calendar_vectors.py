"""Every upstream calendar-event vector (the test suites of proxmox-time and pve-common)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from qmpbackup.jobs.calendar import CalendarEventError, next_event, parse_calendar_event

# A byte copy of the upstream vectors (see the file's "sources"); no vector is self-computed.
VECTORS = Path(__file__).with_name("data") / "calendar-vectors.json"
DATA: dict[str, Any] = json.loads(VECTORS.read_text())


def rows(name: str) -> list[Any]:
    found: list[Any] = DATA.get(name, [])
    return found


def test_all_next_event_rows() -> None:
    """All 400 rows in one test (one parametrised test each would be slow to collect)."""
    assert len(rows("next_event")) == 400
    failures = []
    for row in rows("next_event"):
        got = next_event(row["spec"] + " UTC", row["last"])
        if got != row["next"]:
            failures.append((row["spec"], row["last"], row["next"], got))
    assert not failures


@pytest.mark.parametrize("row", [r for r in rows("next_event") if not r.get("chained")][:120],
                         ids=lambda r: f"{r['spec']}@{r['last']}")
def test_next_event_in_utc_zoneinfo(row: dict[str, Any]) -> None:
    """Without the UTC suffix, evaluated through zoneinfo UTC: same answers."""
    assert next_event(row["spec"], row["last"], ZoneInfo("UTC")) == row["next"]


@pytest.mark.parametrize("row", rows("parse_ok"), ids=lambda r: r["spec"])
def test_parse_ok(row: dict[str, Any]) -> None:
    parse_calendar_event(row["spec"])


@pytest.mark.parametrize("row", rows("parse_error"), ids=lambda r: repr(r["spec"]))
def test_parse_error(row: dict[str, Any]) -> None:
    with pytest.raises(CalendarEventError):
        parse_calendar_event(row["spec"])


@pytest.mark.parametrize("row", rows("conflicts"), ids=lambda r: r["spec"])
def test_conflicts_follow_proxmox_time(row: dict[str, Any]) -> None:
    event = parse_calendar_event(row["spec"])
    assert event.weekdays == frozenset({4, 5, 6, 0})


@pytest.mark.parametrize("row", rows("local_time_zone"), ids=lambda r: f"{r['tz']}:{r['spec']}")
def test_local_time_zone(row: dict[str, Any]) -> None:
    assert next_event(row["spec"], row["last"], ZoneInfo(row["tz"])) == row["next"]
