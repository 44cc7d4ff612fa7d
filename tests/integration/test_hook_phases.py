"""Hook phases in vzdump's order, with vzdump's arguments, per mode and outcome (real QEMU, real CLI).

vzdump's ``exec_backup_task``: the restart phases of suspend and stop mode belong to its
clean-up step, so they come after ``backup-end``; a guest that fails runs ``backup-abort``
and the job still ends with ``job-end`` (``job-abort`` is for job-level errors only); a
stopped VM is backed up in mode ``stop`` and its hooks say so. (Stop mode of a running VM
is checked in tests/integration/test_backup_guest.py, which boots the test guest.)
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.backup import BackupRun, Monitor, make_image, monitor_args
from tests.support.qemu import DriveSpec, QemuBinaries

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _hook(tmp_path: Path) -> tuple[Path, Path]:
    record = tmp_path / "phases.txt"
    script = tmp_path / "hook.sh"
    script.write_text(f'#!/bin/sh\necho "$*" >> {record}\n')
    script.chmod(0o755)
    return script, record


def _phases(record: Path) -> list[str]:
    return record.read_text().splitlines()


GUEST = {
    "snapshot": ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end", "log-end"],
    "suspend": ["backup-start", "pre-stop", "backup-end", "pre-restart", "post-restart", "log-end"],
}


@pytest.fixture
def mon_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qbh-", dir="/tmp"))  # unix socket paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", ["snapshot", "suspend"])
def test_running_vm_phases(mode: str, qemu: QemuBinaries, qemu_vm, tmp_path: Path, mon_dir: Path) -> None:
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.raw", "raw", 2 * MiB, [(0x42, 0, MiB)])
    vm = qemu_vm([DriveSpec(disk, bus="scsi", fmt="raw", style="drive", dev_id="scsi0", drive_id="drive-scsi0",
                            node_name="drive-scsi0")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    try:
        mon.cmd("cont")  # a running guest (the fixture's QEMU starts paused)
    finally:
        mon.close()
    script, record = _hook(tmp_path)
    r = BackupRun(tmp_path).run("100", "--qmp", str(vm.qmp_path), "--mode", mode, "--script", str(script))
    assert r.returncode == 0, r.stderr
    assert _phases(record) == ["job-init", "job-start", *(f"{p} {mode} 100" for p in GUEST[mode]), "job-end"]


def _stopped_guest(config: Path, qemu: QemuBinaries, vmid: int, disk: Path) -> None:
    guests = config / "guests"
    guests.mkdir(exist_ok=True)
    (guests / f"{vmid}.conf").write_text(
        f"name: vm{vmid}\nmemory: 64\nscsi0: {disk},format=raw\n\n[qmpbackup]\nqemu: {qemu.system}\n"
        f"qmp: {config / f'nonexistent-{vmid}.qmp'}\n")


def test_stopped_vm_phases_say_stop_and_a_failed_guest_still_ends_with_job_end(
        qemu: QemuBinaries, tmp_path: Path, isolated_config: Path) -> None:
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.raw", "raw", 2 * MiB, [(0x42, 0, MiB)])
    _stopped_guest(isolated_config, qemu, 150, disk)
    _stopped_guest(isolated_config, qemu, 151, tmp_path / "missing.raw")  # cannot be backed up
    script, record = _hook(tmp_path)
    r = BackupRun(tmp_path).run("150", "151", "--script", str(script))  # mode snapshot asked, stop used
    assert r.returncode == 1, r.stderr
    assert "backup mode: stop" in r.stderr
    phases = _phases(record)
    assert phases[:2] == ["job-init", "job-start"] and phases[-1] == "job-end"
    assert phases[2:5] == ["backup-start stop 150", "backup-end stop 150", "log-end stop 150"]
    assert phases[5:-1] in (
        ["backup-start stop 151", "backup-abort stop 151", "log-end stop 151"],
        ["backup-abort stop 151", "log-end stop 151"],  # failed before its backup started
    )
