"""Stop mode keeps the VM down only for the clean shutdown plus an instant copy of its disks.

The test guest's data disk lives on a loop-mounted xfs or btrfs (reflink clones); the
backup reads the copy at ``--bwlimit`` so that it takes several seconds, while the VM is
already running again. Times are taken as the CLI's lines arrive.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qmpbackup.instant_copy import COPY_MARK
from tests.support.backup import BackupRun, HeldRun
from tests.support.guest import (  # noqa: F401  (fixtures)
    GuestFactory,
    GuestImage,
    TestGuest,
    _make_ext4,
    guest_image,
)
from tests.support.loopfs import LoopFs, loopfs  # noqa: F401
from tests.support.qemu import QemuBinaries
from tests.support.stop_mode import end_restarted, stoppable_guest

pytestmark = [pytest.mark.guest, pytest.mark.qemu, pytest.mark.timeout(300)]

DATA_MB = 48
BWLIMIT_KIB = 8192  # 48 MiB at 8 MiB/s: the copy takes about 6 s


@pytest.fixture
def guests(guest_image: GuestImage) -> Iterator[GuestFactory]:  # noqa: F811 - the imported fixture
    with GuestFactory(guest_image) as factory:
        yield factory


def _stoppable_guest(fs: LoopFs, data_mb: int, qemu: QemuBinaries, guests: GuestFactory, tmp_path: Path,
                     config: Path, started_file: Path | None = None) -> TestGuest:
    """:func:`stoppable_guest` with its data disk on ``fs``."""
    data = fs.mountpoint / "vm-100-disk-1.raw"
    _make_ext4(data, data_mb, ())
    return stoppable_guest(guests, qemu, tmp_path, config, data, started_file)


@pytest.mark.spread_over_qemu("fstype")  # the fstype does not meet QEMU: one version each
@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_downtime_is_the_shutdown_plus_an_instant_copy(fstype: str, qemu: QemuBinaries, guests: GuestFactory,
                                                       loopfs: Callable[[str, int], LoopFs],  # noqa: F811
                                                       tmp_path: Path, isolated_config: Path) -> None:
    fs = loopfs(fstype, 400 << 20)
    started_file = tmp_path / "started-at"
    guest = _stoppable_guest(fs, DATA_MB, qemu, guests, tmp_path, isolated_config, started_file)
    run = BackupRun(tmp_path)
    seen: dict[str, float] = {}
    proc = run.start("100", "--mode", "stop", "--stopwait", "1", "--bwlimit", str(BWLIMIT_KIB))

    def watch_exit() -> None:
        assert guest.proc is not None
        guest.proc.wait()
        seen["qemu exited"] = time.time()

    watcher = threading.Thread(target=watch_exit, daemon=True)
    watcher.start()
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "stopping virtual guest" in line:
                seen.setdefault("stopping", time.time())
        proc.wait(timeout=240)
        seen["done"] = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
        end_restarted(tmp_path)
    text = "".join(lines)
    assert proc.returncode == 0, text
    watcher.join(timeout=5)
    restarted = float(started_file.read_text())
    shutdown = seen["qemu exited"] - seen["stopping"]
    downtime = restarted - seen["stopping"]
    assert downtime <= shutdown + 3.0, f"down {downtime:.1f} s, of which the shutdown {shutdown:.1f} s\n{text}"
    assert seen["done"] - restarted >= 4.0, "the backup read the copy after the VM was running again"
    assert "reflink" in text
    assert not [p for p in fs.mountpoint.iterdir() if COPY_MARK in p.name], "the copy is dropped"
    assert not (tmp_path / "state" / "journal" / "100.jsonl").exists(), "copies and stopped-vm resolved"


@pytest.mark.timeout(900)
def test_a_copy_left_by_a_killed_stop_mode_run_is_removed(qemu: QemuBinaries, guests: GuestFactory,
                                                         loopfs: Callable[[str, int], LoopFs],  # noqa: F811
                                                         tmp_path: Path, isolated_config: Path) -> None:
    """SIGKILL of a stop-mode run while its instant copy exists (the VM already runs again):
    the copy is journaled, so ``qmpbackup cleanup`` (QEMU 7.2) or the next backup (10.0) removes it."""
    fs = loopfs("xfs", 300 << 20)
    _stoppable_guest(fs, 16, qemu, guests, tmp_path, isolated_config)
    run = BackupRun(tmp_path)
    journal = tmp_path / "state" / "journal" / "100.jsonl"

    def copies() -> list[str]:
        return sorted(p.name for p in fs.mountpoint.iterdir() if COPY_MARK in p.name)

    try:
        held = HeldRun(run, "copied=600", "100", "--mode", "stop", "--stopwait", "3")
        held.wait_point("copied", timeout=400)  # a loaded machine's TCG guest shuts down slowly
        assert len(copies()) == 1
        held.kill()
        assert len(copies()) == 1 and "instant-copy" in journal.read_text()
        time.sleep(1.1)  # archives are named by the second
        if qemu.version == "7.2":
            done = subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "cleanup", "100",
                                   "--state-dir", str(tmp_path / "state")],
                                  capture_output=True, text=True, timeout=180, check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "undid instant-copy" in done.stdout
        else:
            done = run.run("100", "--mode", "snapshot", timeout=240)
            assert done.returncode == 0, done.stderr
            assert "cleaning up what an earlier run of this VM left behind" in done.stderr
        assert copies() == []
        assert not journal.exists()
    finally:
        end_restarted(tmp_path)
