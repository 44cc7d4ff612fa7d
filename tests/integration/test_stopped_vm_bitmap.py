"""A stopped VM's qcow2 keeps exactly the one persistent bitmap incremental runs need, and none without them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.backup import BackupRun, make_image, next_second
from tests.support.qemu import QemuBinaries

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _bitmaps(qemu_img: Path, image: Path) -> list[str]:
    info = json.loads(subprocess.run([str(qemu_img), "info", "-U", "--output", "json", str(image)],
                                     capture_output=True, text=True, check=True).stdout)
    return [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]


def test_stopped_vm_qcow2_bitmaps(qemu: QemuBinaries, tmp_path: Path, isolated_config: Path) -> None:
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.qcow2", "qcow2", 4 * MiB, [(0x77, MiB, MiB)])
    guests = isolated_config / "guests"
    guests.mkdir()
    (guests / "150.conf").write_text(
        f"name: off\nmemory: 64\nscsi0: {disk},format=qcow2\n\n[qmpbackup]\nqemu: {qemu.system}\n"
        f"qmp: {tmp_path / 'nonexistent.qmp'}\n")
    run = BackupRun(tmp_path)
    r = run.run("150", "--dirty-bitmap", "0")
    assert r.returncode == 0, r.stderr
    assert _bitmaps(qemu.img, disk) == [], "no incremental runs: nothing stays in the image"
    next_second()
    assert run.run("150").returncode == 0
    [kept] = _bitmaps(qemu.img, disk)  # the one the next incremental run starts from
    assert kept.startswith("qmpbackup-")
    next_second()
    assert run.run("150").returncode == 0
    [newer] = _bitmaps(qemu.img, disk)
    assert newer != kept, "each run replaces it; they never pile up"
    next_second()
    assert run.run("150", "--dirty-bitmap", "0").returncode == 0
    assert _bitmaps(qemu.img, disk) == []
