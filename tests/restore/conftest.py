"""Shared fixtures: a set of odd-sized sparse disks and their archive."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.restore.helpers import Disk, config_text, make_image, vma_create

# Not multiples of 64 KiB (but of 512), one smaller than a cluster.
SIZES = {"scsi0": 3 * (1 << 20) + 512 * 7, "virtio1": 1 << 20, "sata0": 40 * 512}


@pytest.fixture(scope="session")
def source_disks(tmp_path_factory: pytest.TempPathFactory) -> list[Disk]:
    base = tmp_path_factory.mktemp("restore-src")
    return [make_image(base / f"{key}.raw", size, seed) and Disk(key, base / f"{key}.raw", size)
            for seed, (key, size) in enumerate(SIZES.items())]


@pytest.fixture(scope="session")
def archive(tmp_path_factory: pytest.TempPathFactory, source_disks: list[Disk]) -> Path:
    """An uncompressed archive of the three disks, with a NIC and a vmgenid in its config."""
    base = tmp_path_factory.mktemp("restore-archive")
    extra = "net0: virtio=BC:24:11:12:34:56,bridge=vmbr0\nvmgenid: 3bd2e2a4-7b4e-4c5a-9b5e-6a9a3f0e8d21\n" \
            "smbios1: uuid=7d6b1f36-1111-2222-3333-444444444444\nlock: backup\nunused0: /old/gone.raw\n" \
            "scsi5: /data/scratch.raw,backup=0\n"
    return vma_create(base / "vzdump-qemu-100-2024_01_02-03_04_05.vma", source_disks, config_text(source_disks, extra))
