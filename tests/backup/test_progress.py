from __future__ import annotations

from pathlib import Path

import pytest

from qmpbackup.backup.progress import Progress, closing_lines
from qmpbackup.backup.tasklog import TaskLog

GIB = 1 << 30


def test_progress_line_format_and_pacing() -> None:
    p = Progress(total_bytes=32 * GIB, started=100.0)
    first = p.line(103.0, read=GIB, zero=GIB // 8)
    assert first is not None
    assert first.startswith("  3% (1.0 GiB of 32.0 GiB) in 3s, read: 341.3 MiB/s, write: ")
    assert p.line(104.0, read=2 * GIB, zero=0) is None, "not due: too soon"
    assert p.line(110.0, read=GIB + 1, zero=0) is None, "not due: same percentage"
    assert p.line(212.0, read=32 * GIB, zero=GIB, force=True) == (
        "100% (32.0 GiB of 32.0 GiB) in 1m 52s, read: 291.2 MiB/s, write: 283.0 MiB/s"
    )


def test_closing_lines() -> None:
    assert closing_lines(32 * GIB, 20 * GIB, 112) == [
        "backup is sparse: 20.00 GiB (62%) total zero data",
        "transferred 32.00 GiB in 112 seconds (292.6 MiB/s)",
    ]
    assert closing_lines(GIB, 0, 0) == ["transferred 1.00 GiB in 0 seconds (0 B/s)"]


def test_tasklog_file_lines_and_warnings(tmp_path: Path) -> None:
    with TaskLog(tmp_path / "x.log") as log:
        log.info("status = running")
        log.warn("skipping guest filesystem freeze - agent configured but not running?")
        log.lines(20, "hook line 1\nhook line 2\n")
    lines = (tmp_path / "x.log").read_text().splitlines()
    assert lines[0].endswith(" INFO: status = running")
    assert " WARN: skipping guest filesystem freeze" in lines[1]
    assert len(lines) == 4 and len(lines[0].split(" ")[0]) == 10
    assert log.warnings == ["skipping guest filesystem freeze - agent configured but not running?"]


def test_incremental_progress_counts_what_the_previous_archive_gives_and_ends_at_100() -> None:
    """Only 1 GiB of 32 changed: the share counts the unchanged bytes too, rates never go negative."""
    p = Progress(total_bytes=32 * GIB, started=0.0)
    first = p.line(5.0, read=GIB // 2, zero=0, done=31 * GIB + GIB // 2)
    assert first is not None and first.startswith(" 98% (31.5 GiB of 32.0 GiB) in 5s, read: 102.4 MiB/s,")
    # The end: zero clusters filled in without being read make zero > read; no negative rate.
    last = p.final(10.0, read=GIB, zero=4 * GIB)
    assert last == "100% (32.0 GiB of 32.0 GiB) in 10s, read: 102.4 MiB/s, write: 0 B/s"
    assert "-" not in last
    assert p.final(11.0, read=GIB, zero=4 * GIB) is None  # printed once: no second, no empty line


def test_final_line_when_the_last_periodic_line_was_below_100() -> None:
    p = Progress(total_bytes=100 * GIB, started=0.0)
    assert p.line(3.0, read=5 * GIB, zero=0) is not None
    assert (p.final(4.0, read=5 * GIB, zero=0) or "").startswith("100% (100.0 GiB of 100.0 GiB) in 4s")


def test_file_only_lines_stay_out_of_stderr(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="qmpbackup.task"), TaskLog(tmp_path / "x.log") as log:
        log.file_only("Backup started at 2026-12-04 16:00:00")
        log.info("status = running")
    assert [r.getMessage() for r in caplog.records] == ["status = running"]
    assert (tmp_path / "x.log").read_text().splitlines()[0].endswith(" INFO: Backup started at 2026-12-04 16:00:00")
