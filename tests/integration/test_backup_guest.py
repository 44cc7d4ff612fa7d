"""Live backup of the booted test guest (TCG) with its agent: the freeze window, end to end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpbackup.guest_agent import FreezeStatus
from tests.support.backup import BackupRun, extract, result_lines
from tests.support.guest import (  # noqa: F401  (fixtures)
    GuestFactory,
    GuestImage,
    GuestOptions,
    check_writer_image,
    guest_image,
)
from tests.support.qemu import QemuBinaries

pytestmark = [pytest.mark.guest, pytest.mark.qemu, pytest.mark.timeout(180)]


@pytest.fixture
def guests(guest_image: GuestImage) -> Iterator[GuestFactory]:
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
    import asyncio

    async def status() -> FreezeStatus:
        async with guest.agent() as agent:
            return await agent.fsfreeze_status()

    assert asyncio.run(status()) is FreezeStatus.THAWED

    [archive] = run.archives()
    disk = extract(archive, tmp_path / "x")["drive-virtio0"]
    check = check_writer_image(disk, str(qemu.img))
    assert check.fsck_rc == 0, "the archived filesystem is clean"
    assert check.ok and check.seq >= seq_before, check
