"""`qmpbackup jobs next-events|list` through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.retention_helpers import assert_usage_error, qmpbackup


def test_next_events_json() -> None:
    r = qmpbackup("jobs", "next-events", "mon..fri 21:00", "--after", "0", "--count", "3",
                  "--output-format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [75600, 162000, 421200]


def test_next_events_local_time_and_text() -> None:
    r = qmpbackup("jobs", "next-events", "mon..fri", "--after", "1540677600", "--count", "1",
                  "--output-format", "json", tz="Europe/Vienna")
    assert json.loads(r.stdout) == [1540767600]
    r = qmpbackup("jobs", "next-events", "daily", "--after", "0", "--count", "2")
    assert r.stdout.splitlines() == ["1970-01-02 00:00:00 UTC  (86400)", "1970-01-03 00:00:00 UTC  (172800)"]
    r = qmpbackup("jobs", "next-events", "02-30", "--output-format", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_next_events_errors() -> None:
    assert_usage_error(qmpbackup("jobs", "next-events", "mon..fry"), "mon..fry")
    assert_usage_error(qmpbackup("jobs", "next-events", "daily", "--count", "0"), "count")
    assert_usage_error(qmpbackup("jobs", "next-events", "daily", "--after", "x"), "after")
    assert_usage_error(qmpbackup("jobs"), "")


def test_jobs_list(isolated_config: Path, tmp_path: Path) -> None:
    state = ("--state-dir", str(tmp_path / "state"))
    r = qmpbackup("jobs", "list", *state)
    assert r.returncode == 0 and r.stdout == "no jobs\n"
    (isolated_config / "jobs.cfg").write_text(
        "vzdump: nightly\n\tschedule 21:00\n\tvmid 100,101\n\tstorage local\n\n"
        "vzdump: off\n\tschedule sat 3:00\n\tall 1\n\tenabled 0\n")
    r = qmpbackup("jobs", "list", "--output-format", "json", *state)
    assert r.returncode == 0, r.stderr
    jobs = json.loads(r.stdout)
    assert [(j["id"], j["enabled"], j["vmid"], j["storage"]) for j in jobs] == [
        ("nightly", True, [100, 101], "local"), ("off", False, [], None)]
    assert jobs[0]["next_run"] % 86400 == 21 * 3600 and jobs[1]["next_run"] is None
    r = qmpbackup("jobs", "list", *state)
    assert "nightly: schedule '21:00'" in r.stdout and "disabled" in r.stdout
    (isolated_config / "jobs.cfg").write_text("vzdump: j\n\tschedule 25:99\n\tall 1\n")
    assert_usage_error(qmpbackup("jobs", "list", *state), "jobs.cfg:2:")
    assert_usage_error(qmpbackup("jobs", "run", "nightly"), "jobs.cfg:2:")


def test_jobs_run_unknown(isolated_config: Path) -> None:
    (isolated_config / "jobs.cfg").write_text("vzdump: a\n\tschedule daily\n\tall 1\n")
    assert_usage_error(qmpbackup("jobs", "run", "nope"), "no job 'nope'")
