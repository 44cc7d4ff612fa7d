"""``--bwlimit``: the archive is read at the given rate (a short real-time measurement)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from qmpbackup.restore import RestoreOptions, restore
from tests.restore.helpers import MiB, Disk, config_text, vma_create


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
    assert 9.0 <= rate <= 11.0, f"{rate:.2f} MiB/s"
