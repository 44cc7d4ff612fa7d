"""A live backup of a real QEMU by ``qmpbackup backup``, restored by ``qmpbackup restore``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qmpbackup.guest_config import load_guest
from tests.restore.helpers import cli
from tests.support.backup import BackupRun, images_equal, make_image, random_fill
from tests.support.qemu import DriveSpec, QemuBinaries, pytest_runtest_makereport, qemu, qemu_vm  # noqa: F401

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def test_backup_then_restore(qemu: QemuBinaries, qemu_vm, tmp_path: Path, isolated_config: Path) -> None:  # noqa: F811
    disks = tmp_path / "disks"
    disks.mkdir()
    size0 = 6 * MiB + 3584  # a multiple of 512, not of 64 KiB
    a = make_image(qemu.img, qemu.io, disks / "a.raw", "raw", size0, [(0x11, 5 * MiB, 512)])
    random_fill(a, 0, 2 * MiB + 512)
    b = make_image(qemu.img, qemu.io, disks / "b.qcow2", "qcow2", 20 * MiB,
                   [(0xAA, 0, MiB), (0x55, 17 * MiB + 4096, 65536)])
    vm = qemu_vm([
        DriveSpec(a, bus="scsi", fmt="raw", dev_id="scsi0", drive_id="drive-scsi0"),
        DriveSpec(b, bus="virtio", fmt="qcow2", dev_id="virtio1", drive_id="drive-virtio1"),
    ])
    run = BackupRun(tmp_path)
    r = run.run("150", "--qmp", str(vm.qmp_path), "--compress", "zstd")
    assert r.returncode == 0, r.stderr
    [archive] = run.archives()

    verify = cli("verify", str(archive))
    assert verify.returncode == 0, verify.stderr
    target = tmp_path / "restored"
    target.mkdir()
    restored = cli("restore", str(archive), "250", "--target-dir", str(target))
    assert restored.returncode == 0, restored.stderr
    # the map lines keep each disk's format
    assert images_equal(qemu.img, a, target / "vm-250-disk-0.raw", "raw")
    assert sorted(p.name for p in target.iterdir()) == ["vm-250-disk-0.raw", "vm-250-disk-1.qcow2"]
    guest = load_guest(isolated_config, 250)
    assert {d.key: d.volume for d in guest.drives} == {
        "scsi0": str(target / "vm-250-disk-0.raw"), "virtio1": str(target / "vm-250-disk-1.qcow2"),
    }
    compare = subprocess.run([str(qemu.img), "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(b),
                              str(target / "vm-250-disk-1.qcow2")], capture_output=True, text=True, timeout=60)
    assert compare.returncode == 0, compare.stdout + compare.stderr
