"""Prune selection: spec parsing, the keep-all guard, and properties."""

from __future__ import annotations

from datetime import timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpbackup.store.prune import (
    KEEP_ALL,
    BackupRecord,
    Mark,
    PruneOptions,
    PruneSpecError,
    from_maxfiles,
    mark_group,
    parse_prune_spec,
)

UTC = timezone.utc
DAY = 86400


def test_parse_spec() -> None:
    assert parse_prune_spec("keep-last=3,keep-daily=7") == PruneOptions(keep_last=3, keep_daily=7)
    assert parse_prune_spec("keep-all=1") == KEEP_ALL
    assert parse_prune_spec("keep-last=0,keep-daily=0") == KEEP_ALL
    assert parse_prune_spec("") == KEEP_ALL
    assert PruneOptions(keep_last=3, keep_daily=7).render() == "keep-daily=7,keep-last=3"


@pytest.mark.parametrize(
    "spec", ["keep-lastt=3", "keep-last", "keep-last=x", "keep-last=-1", "keep-all=1,keep-last=2",
             "keep-last=1,keep-last=2", "keep-all=2"]
)
def test_bad_spec(spec: str) -> None:
    with pytest.raises(PruneSpecError):
        parse_prune_spec(spec)


def test_maxfiles_is_keep_last() -> None:
    assert from_maxfiles(4) == PruneOptions(keep_last=4)
    assert from_maxfiles(0) == KEEP_ALL


def test_keep_all_guard_keeps_everything_but_protected_stay_protected() -> None:
    records = [BackupRecord(i, i * DAY, protected=i == 2) for i in range(5)]
    marks = mark_group(records, PruneOptions(keep_last=0), UTC)
    assert marks == {0: Mark.KEEP, 1: Mark.KEEP, 2: Mark.PROTECTED, 3: Mark.KEEP, 4: Mark.KEEP}


def test_periods_are_local_time() -> None:
    # 23:30 UTC and 00:30 UTC the next day are the same day in New York
    records = [BackupRecord("a", 10 * DAY - 1800), BackupRecord("b", 10 * DAY + 1800)]
    ny = mark_group(records, PruneOptions(keep_daily=2), ZoneInfo("America/New_York"))
    assert ny == {"b": Mark.KEEP, "a": Mark.REMOVE}
    utc = mark_group(records, PruneOptions(keep_daily=2), UTC)
    assert utc == {"b": Mark.KEEP, "a": Mark.KEEP}


OPTIONS = st.builds(
    PruneOptions,
    keep_last=st.none() | st.integers(0, 4),
    keep_hourly=st.none() | st.integers(0, 4),
    keep_daily=st.none() | st.integers(0, 4),
    keep_weekly=st.none() | st.integers(0, 3),
    keep_monthly=st.none() | st.integers(0, 3),
    keep_yearly=st.none() | st.integers(0, 2),
)
RECORDS = st.lists(
    st.tuples(st.integers(0, 3 * 365 * DAY), st.booleans()), min_size=0, max_size=25, unique_by=lambda t: t[0]
).map(lambda items: [BackupRecord(f"b{i}", t, p) for i, (t, p) in enumerate(items)])


@settings(max_examples=300, deadline=None)
@given(records=RECORDS, options=OPTIONS)
def test_properties(records: list[BackupRecord], options: PruneOptions) -> None:
    marks = mark_group(records, options, UTC)
    assert set(marks) == {r.key for r in records}
    for r in records:
        if r.protected:
            assert marks[r.key] is Mark.PROTECTED  # never pruned, never counted
        else:
            assert marks[r.key] in (Mark.KEEP, Mark.REMOVE)
    # the newest unprotected backup is always kept
    unprotected = [r for r in records if not r.protected]
    if unprotected:
        newest = max(unprotected, key=lambda r: r.ctime)
        assert marks[newest.key] is Mark.KEEP
    # idempotent: pruning what was kept removes nothing more
    survivors = [r for r in records if marks[r.key] is not Mark.REMOVE]
    again = mark_group(survivors, options, UTC)
    assert all(m is not Mark.REMOVE for m in again.values())
    # protected backups do not change the fate of the others
    without = mark_group(unprotected, options, UTC)
    assert all(without[r.key] == marks[r.key] for r in unprotected)
