"""Shared helpers for the retention CLI tests (runs of the real CLI's main)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.cli import run_main_text


def qmpbackup(*args: str, tz: str = "UTC") -> subprocess.CompletedProcess[str]:
    """``qmpbackup ARGS`` with ``TZ=tz``, run in this process (:mod:`tests.support.cli`)."""
    return run_main_text(*args, env=dict(os.environ, TZ=tz))


def assert_usage_error(r: subprocess.CompletedProcess[str], words: str = "") -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("ERROR: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert words in r.stderr, r.stderr


def backup(d: Path, vmid: int, stamp: str, ext: str = ".vma.zst", data: bytes = b"data") -> Path:
    path = d / f"vzdump-qemu-{vmid}-{stamp}{ext}"
    path.write_bytes(data)
    return path
