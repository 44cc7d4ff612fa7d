"""Live backup of the booted test guest (TCG) with its agent: the freeze window, end to end."""

from __future__ import annotations

import asyncio

from collections.abc import Iterator
from pathlib import Path

import pytest


from qmpbackup.guest_agent import FreezeStatus, GuestAgentError
from tests.support.backup import BackupRun, extract, result_lines
from tests.support.guest import (  # noqa: F401  (fixtures)
    GuestFactory,
    GuestImage,
    GuestOptions,
    check_writer_image,
    guest_image,
)
from tests.support.qemu import QemuBinaries
from tests.support.stop_mode import end_restarted, stoppable_guest

pytestmark = [pytest.mark.guest, pytest.mark.qemu, pytest.mark.timeout(180)]


@pytest.fixture
def guests(guest_image: GuestImage) -> Iterator[GuestFactory]:  # noqa: F811 - the imported fixture
    with GuestFactory(guest_image) as factory:
        yield factory


@pytest.mark.parametrize("compress", ["zstd"])
def test_snapshot_mode_with_agent_freeze(qemu: QemuBinaries, guests: GuestFactory, tmp_path: Path,
                                         compress: str) -> None:
    guest = guests.start(GuestOptions(qemu=str(qemu.system), qemu_img=str(qemu.img), data_format="qcow2"))
    seq_before = guest.wait_writer(above=3)
    run = BackupRun(tmp_path)
    r = run.run("100", "--qmp", str(guest.qmp_path), "--qga", str(guest.qga_path), "--compress", compress,
                "--output-format", "json", timeout=150)
    assert r.returncode == 0, r.stderr
    assert "INFO: issuing guest-agent 'fs-freeze' command" in r.stderr
    assert "INFO: issuing guest-agent 'fs-thaw' command" in r.stderr
    assert "guest filesystems were frozen for" in r.stderr
    [result] = result_lines(r.stdout)
    assert result["freeze_window_s"] is not None and result["freeze_window_s"] < 30

    # The guest runs on, thawed.
    guest.wait_writer(above=guest.writer_seq())

    async def status() -> FreezeStatus:
        async with guest.agent() as agent:
            return await agent.fsfreeze_status()

    assert asyncio.run(status()) is FreezeStatus.THAWED

    [archive] = run.archives()
    disk = extract(archive, tmp_path / "x")["drive-virtio0"]
    check = check_writer_image(disk, str(qemu.img))
    assert check.fsck_rc == 0, "the archived filesystem is clean"
    assert check.ok and check.seq >= seq_before, check


def test_stop_mode_shuts_down_backs_up_and_starts_again(qemu: QemuBinaries, guests: GuestFactory, tmp_path: Path,
                                                        isolated_config: Path) -> None:
    import time

    guest = stoppable_guest(guests, qemu, tmp_path, isolated_config)
    run = BackupRun(tmp_path)
    try:
        r = run.run("100", "--mode", "stop", "--stopwait", "1", timeout=170)
        assert r.returncode == 0, r.stderr
        assert "INFO: stopping virtual guest" in r.stderr and "guest is online again after" in r.stderr
        assert not (tmp_path / "state" / "journal" / "100.jsonl").exists(), "stopped-vm resolved: the VM answers"
        assert guest.proc is not None and guest.proc.poll() is not None, "the original QEMU shut down"
        deadline = time.monotonic() + 60
        while not guest.qmp_path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        async def ping() -> None:  # the VM is running again: its agent answers
            async with asyncio.timeout(90):
                while True:
                    try:
                        async with guest.agent() as agent:
                            await agent.ping()
                            return
                    except GuestAgentError:
                        await asyncio.sleep(0.5)

        asyncio.run(ping())
        [archive] = run.archives()
        check = check_writer_image(extract(archive, tmp_path / "x")["drive-virtio0"], str(qemu.img))
        assert check.fsck_rc == 0 and check.ok, check
    finally:
        end_restarted(tmp_path)
