"""The whole loop with the booted test guest: live backup (agent freeze) → restore → boot the copy → data verifies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.restore.helpers import cli
from tests.support.backup import BackupRun
from tests.support.guest import GuestFactory, GuestImage, GuestOptions, check_writer_image, guest_image  # noqa: F401

pytestmark = [pytest.mark.guest, pytest.mark.qemu, pytest.mark.timeout(240)]


@pytest.fixture
def guests(guest_image: GuestImage) -> Iterator[GuestFactory]:  # noqa: F811
    with GuestFactory(guest_image) as factory:
        yield factory


def test_restored_guest_boots_and_its_data_verifies(guests: GuestFactory, tmp_path: Path) -> None:
    guest = guests.start(GuestOptions(data_format="qcow2", data_size_mb=32))
    guest.wait_writer(above=3)
    run = BackupRun(tmp_path)
    r = run.run("100", "--qmp", str(guest.qmp_path), "--qga", str(guest.qga_path), "--compress", "zstd",
                timeout=150)
    assert r.returncode == 0, r.stderr
    guest.stop()
    [archive] = run.archives()

    target = tmp_path / "restored"
    target.mkdir()
    restored = cli("restore", str(archive), "300", "--target-dir", str(target), "--unique", timeout=120)
    assert restored.returncode == 0, restored.stderr
    image = target / "vm-300-disk-0.qcow2"  # the map line keeps the qcow2 format
    check = check_writer_image(image)
    assert check.ok, check

    copy = guests.start(GuestOptions(data_disk=image, writer=False, verify=True, label="restored"))
    deadline = time.monotonic() + 120  # TCG on a busy machine boots slowly
    while b"[guest] VERIFY " not in copy.console():
        assert time.monotonic() < deadline, copy.console()[-2000:]
        time.sleep(0.2)
    assert b"[guest] VERIFY OK" in copy.console(), copy.console()[-2000:]
