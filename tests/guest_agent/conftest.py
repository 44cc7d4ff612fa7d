"""Fixtures for the guest agent tests: a fake agent (fast) and the real test guest (marker guest)."""

from __future__ import annotations

import pytest

from tests.guest_agent.fake_agent import fake_agent, short_dir  # noqa: F401  (fixtures)
from tests.support.guest import (  # noqa: F401  (fixtures re-exported for this directory)
    ExtraDisk,
    GuestFactory,
    GuestOptions,
    TestGuest,
    guest_factory,
    guest_image,
    module_guest_factory,
)


def _qemu_versions() -> list[str]:
    try:
        from tests.support.qemu import selected_versions
    except ImportError:
        return ["system"]
    return selected_versions() or ["system"]


@pytest.fixture(scope="module", params=_qemu_versions(), ids=lambda v: f"qemu{v}")
def qemu_programs(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(qemu-system-x86_64, qemu-img) of the QEMU version under test (QMPBACKUP_QEMU_VERSIONS)."""
    if request.param == "system":
        return ("qemu-system-x86_64", "qemu-img")
    from tests.support.qemu import binaries_for

    found = binaries_for(str(request.param))
    return (str(found.system), str(found.img))


@pytest.fixture(scope="module")
def guest(request: pytest.FixtureRequest, qemu_programs: tuple[str, str]) -> TestGuest:
    """One booted guest with the writer loop per module and QEMU version (~4 s boot under TCG).

    Two extra disks (virtio raw, scsi qcow2) make sure the data disk stays /dev/vda.
    """
    factory: GuestFactory = request.getfixturevalue("module_guest_factory")
    return factory.start(GuestOptions(
        qemu=qemu_programs[0], qemu_img=qemu_programs[1], label="qga-test",
        extra_disks=(ExtraDisk(fmt="raw", bus="virtio", ext4=True), ExtraDisk(fmt="qcow2", bus="scsi"))))
