"""Shared helpers for the retention CLI tests (subprocess runs of the real CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def qmpbackup(*args: str, tz: str = "UTC") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TZ=tz)
    return subprocess.run(
        [sys.executable, "-m", "qmpbackup.cli.main", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def assert_usage_error(r: subprocess.CompletedProcess[str], words: str = "") -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("ERROR: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert words in r.stderr, r.stderr


def backup(d: Path, vmid: int, stamp: str, ext: str = ".vma.zst", data: bytes = b"data") -> Path:
    path = d / f"vzdump-qemu-{vmid}-{stamp}{ext}"
    path.write_bytes(data)
    return path
