"""A stop-mode run killed while the VM is down for it: the VM is started again afterwards.

The test guest's data disk is on ext4 (no instant copy), so the VM stays down while the QEMU we
spawn reads its own disks; the run is held there (kill point ``stopped``) and SIGKILLed with its
process group. Then ``qmpbackup cleanup`` or the next ``backup`` must kill that QEMU (it holds the
disk's locks: a VM started beside it could not open its disk) and start the VM with the start
command of its definition; its QMP socket answers and it runs.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpbackup.qemu.session import QmpSession
from qmpbackup.qemu.start_command import qmp_accepts
from qmpbackup.recovery.spawned import read_records, same_process
from tests.support.backup import BackupRun, HeldRun, next_second
from tests.support.guest import GuestFactory, GuestImage, guest_image  # noqa: F401  (fixture)
from tests.support.qemu import QemuBinaries
from tests.support.stop_mode import end_restarted, stoppable_guest

pytestmark = [pytest.mark.guest, pytest.mark.qemu, pytest.mark.timeout(600)]


@pytest.fixture
def guests(guest_image: GuestImage) -> Iterator[GuestFactory]:  # noqa: F811 - the imported fixture
    with GuestFactory(guest_image) as factory:
        yield factory


async def _status(qmp: Path) -> str:
    async with QmpSession("100", qmp) as session:
        return str((await session.execute("query-status"))["status"])


@pytest.mark.spread_over_qemu("recovery")  # the recovery does not meet QEMU's version: one each
@pytest.mark.parametrize("recovery", ["cleanup", "next backup"])
def test_a_vm_left_stopped_by_a_killed_stop_mode_run_is_started_again(
        recovery: str, qemu: QemuBinaries, guests: GuestFactory, tmp_path: Path, isolated_config: Path) -> None:
    guest = stoppable_guest(guests, qemu, tmp_path, isolated_config)
    state = tmp_path / "state"
    journal = state / "journal" / "100.jsonl"
    run = BackupRun(tmp_path)
    try:
        held = HeldRun(run, "stopped=600", "100", "--mode", "stop", "--stopwait", "3", "--bwlimit", "1024")
        held.wait_point("stopped", timeout=400)  # a loaded machine's TCG guest shuts down slowly
        assert guest.proc is not None and guest.proc.poll() is not None, "the VM's QEMU shut down"
        held.kill()
        assert not qmp_accepts(guest.qmp_path) and "stopped-vm" in journal.read_text()
        [spawned] = read_records(state)
        assert same_process(spawned.pid, spawned.create_time), "the QEMU on the VM's disks outlived the run"

        next_second()
        if recovery == "cleanup":
            done = subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "cleanup", "100",
                                   "--state-dir", str(state)], capture_output=True, text=True, timeout=300,
                                  check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            said = done.stdout
        else:
            done = run.run("100", "--mode", "snapshot", timeout=300)
            assert done.returncode == 0, done.stderr
            said = done.stderr
            assert "backup mode: snapshot" in said, "the VM runs again before this backup reaches it"
            assert len(run.archives()) == 1
        assert f"killed orphaned QEMU pid {spawned.pid}" in said or "killing QEMU pid" in said, said
        assert "VM 100 was left stopped by a stop-mode backup that died - started it again" in said, said
        assert not same_process(spawned.pid, spawned.create_time)
        assert asyncio.run(_status(guest.qmp_path)) == "running"
        assert not journal.exists() and read_records(state) == []
    finally:
        end_restarted(tmp_path)
