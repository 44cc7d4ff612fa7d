"""Pins the exit-code table of qmpbackup.errors, through a real subprocess."""

from __future__ import annotations

import subprocess
import sys


def qmpbackup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmpbackup.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_no_command_is_usage_error() -> None:
    r = qmpbackup()
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_option_is_one_line_usage_error() -> None:
    r = qmpbackup("--no-such-option")
    assert r.returncode == 2
    assert r.stderr.startswith("ERROR: ")
    assert r.stderr.count("\n") == 1, r.stderr


def test_help_exits_zero() -> None:
    r = qmpbackup("--help")
    assert r.returncode == 0
    assert "usage:" in r.stdout
