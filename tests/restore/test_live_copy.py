"""The export's record of failed reads, which a failed live copy names (QEMU itself reports only EIO)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpbackup.errors import QmpBackupError
from qmpbackup.restore.live_copy import ReadFailures
from qmpbackup.vma.index import ArchiveIndex, DataChecksumError
from qmpbackup.vma.random_access import ArchiveDevices
from tests.restore.helpers import Disk, config_text, make_image, vma_create


def _damaged(tmp_path: Path, compress: str) -> tuple[Path, int, int]:
    """An archive of one random disk with one byte flipped in a full cluster; (archive, cluster, data offset)."""
    disk = Disk("scsi0", make_image(tmp_path / "scsi0.raw", 4 << 20, 7), 4 << 20)
    archive = vma_create(tmp_path / ("a.vma" + (".zst" if compress == "zstd" else "")), [disk],
                         config_text([disk]), compress)
    with ArchiveIndex.open(archive) as index:
        dev = index.devices[0]
        cluster = next(c for c in range(dev.clusters - 1, 0, -1) if index.record(dev, c).mask == 0xFFFF)
        offset = index.record(dev, cluster).data_offset
        at = offset + 1000 if compress == "none" else index.frame(index.frame_at(offset))[0] + 100
    with open(archive, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    return archive, cluster, offset


def test_a_digest_failure_is_named_as_verify_names_it(tmp_path: Path) -> None:
    archive, cluster, offset = _damaged(tmp_path, "none")
    failures = ReadFailures()
    with ArchiveDevices.open(archive) as devices:
        source = failures.watch(devices.devices[0])
        source.read(0, 65536)  # good reads leave no record
        assert failures.of("drive-scsi0") is None
        with pytest.raises(DataChecksumError):
            source.read((cluster - 2) << 16, 3 << 16)
    assert failures.of("drive-scsi0") == (f"data checksum mismatch in drive-scsi0 cluster {cluster} "
                                          f"(byte offset {offset})")


def test_a_damaged_zstd_frame_is_named_by_its_first_bad_cluster(tmp_path: Path) -> None:
    archive, cluster, _ = _damaged(tmp_path, "zstd")
    failures = ReadFailures()
    with ArchiveDevices.open(archive) as devices, pytest.raises(QmpBackupError):
        failures.watch(devices.devices[0]).read(cluster << 16, 1 << 16)
    named = failures.of("drive-scsi0")
    assert named is not None and "in drive-scsi0 cluster " in named, named
