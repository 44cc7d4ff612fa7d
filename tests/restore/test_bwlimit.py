"""``--bwlimit``: the archive is read at the given rate (a short real-time measurement)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from qmpbackup.restore import RestoreOptions, restore
from tests.restore.helpers import Disk, MiB, cli, config_text, vma_create


def test_10_mib_per_second(tmp_path: Path, isolated_config: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(os.urandom(30 * MiB))
    disk = Disk("scsi0", image, 30 * MiB)
    archive = vma_create(tmp_path / "a.vma", [disk], config_text([disk]))
    target = tmp_path / "t"
    target.mkdir()
    started = time.monotonic()
    restore(RestoreOptions(str(archive), 200, isolated_config, target_dir=target, bwlimit_kib=10 * 1024))
    elapsed = time.monotonic() - started
    rate = archive.stat().st_size / elapsed / MiB
    # Never faster than the limit; the lower bound only catches a limit off by a factor (a loaded
    # machine, e.g. the suite's other workers, slows the read on its own).
    assert 6.0 <= rate <= 11.0, f"{rate:.2f} MiB/s"


def _timed_restore(*args: str) -> tuple[float, str]:
    started = time.monotonic()
    r = cli("restore", *args)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - started, r.stderr


def test_storage_restore_limit_and_the_command_line_wins(tmp_path: Path, isolated_config: Path) -> None:
    """storage.cfg ``bwlimit restore=…`` limits the read; ``--bwlimit`` replaces it; other categories are noted."""
    store = tmp_path / "s"
    (store / "dump").mkdir(parents=True)
    (isolated_config / "storage.cfg").write_text(
        f"dir: bk\n\tpath {store}\n\tcontent backup\n\tbwlimit restore=8192,default=1,clone=100\n")
    image = tmp_path / "d.raw"
    image.write_bytes(os.urandom(16 * MiB))
    disk = Disk("scsi0", image, 16 * MiB)
    archive = vma_create(store / "dump" / "vzdump-qemu-100-2024_01_01-10_00_00.vma", [disk], config_text([disk]))
    size = archive.stat().st_size / MiB
    target = tmp_path / "t1"
    target.mkdir()
    elapsed, stderr = _timed_restore(str(archive), "200", "--target-dir", str(target))
    assert size / elapsed <= 8.8, f"{size / elapsed:.2f} MiB/s with restore=8192"
    assert "bwlimit clone do(es) not apply to qmpbackup; ignored" in stderr
    target = tmp_path / "t2"
    target.mkdir()
    elapsed, _ = _timed_restore(str(archive), "201", "--target-dir", str(target), "--bwlimit", "4096")
    assert size / elapsed <= 4.4, f"{size / elapsed:.2f} MiB/s with --bwlimit 4096"


def test_default_category_applies_without_restore(tmp_path: Path, isolated_config: Path) -> None:
    from qmpbackup.jobs.storage_cfg import parse_storage_cfg, restore_bwlimit_kib

    text = "dir: a\n\tpath /a\n\tbwlimit default=300\n\ndir: b\n\tpath /b\n\tbwlimit restore=500\n"
    storages = parse_storage_cfg(text, "storage.cfg")
    assert restore_bwlimit_kib([storages["a"], storages["b"]]) == 300
    assert restore_bwlimit_kib([storages["b"]]) == 500
    assert restore_bwlimit_kib([]) == 0
