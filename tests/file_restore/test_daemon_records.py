"""Leftover file-restore helpers are found by their folders and ended (``cleanup``, ``--stop``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from qmpbackup.cli.main import main
from qmpbackup.file_restore.client import daemon_folder, stop_all


def test_cleanup_ends_a_leftover_helper(tmp_path: Path) -> None:
    archive = tmp_path / "a.vma"
    archive.write_bytes(b"x")
    folder = daemon_folder(tmp_path / "run", archive)
    folder.mkdir(parents=True)
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (folder / "pid").write_text(f"{daemon.pid}\n")
    (folder / "qemu.pid").write_text(f"{qemu.pid}\n")
    assert main(["cleanup", "--state-dir", str(tmp_path / "state"), "--run-dir", str(tmp_path / "run")]) == 0
    assert daemon.wait(10) is not None and qemu.wait(10) is not None
    assert not folder.exists()
    assert asyncio.run(stop_all(tmp_path / "run")) == []


def test_the_folder_follows_the_archive(tmp_path: Path) -> None:
    archive = tmp_path / "a.vma"
    archive.write_bytes(b"x")
    first = daemon_folder(tmp_path, archive)
    archive.write_bytes(b"yy")  # a new backup under the same name gets a new helper
    assert daemon_folder(tmp_path, archive) != first
