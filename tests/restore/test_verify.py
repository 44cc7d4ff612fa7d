"""``qmpbackup verify``: exit codes, and checksums equal to ``sha256sum`` of the source images."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from qmpbackup.restore.checksums import DeviceHasher
from qmpbackup.vma import format as fmt
from qmpbackup.vma.header import DeviceInfo
from tests.restore.helpers import Disk, cli, config_text, sha256_file, vma_create
from tests.vma.archive_builder import disk_image, write_archive


def test_checksums_match_sha256sum(archive: Path, source_disks: list[Disk]) -> None:
    proc = cli("verify", str(archive), "--checksums")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{sha256_file(d.path)}  {d.devname}" for d in source_disks]
    assert "archive OK: 3 devices" in proc.stderr


def test_verify_without_checksums_prints_nothing_on_stdout(archive: Path) -> None:
    proc = cli("verify", str(archive))
    assert (proc.returncode, proc.stdout) == (0, "")


def test_compressed_from_stdin(source_disks: list[Disk], tmp_path: Path) -> None:
    archive = vma_create(tmp_path / "a.vma.zst", source_disks[:1], config_text(source_disks[:1]), "zstd")
    proc = cli("verify", "-", "--checksums", input_path=archive)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{sha256_file(source_disks[0].path)}  drive-scsi0\n"


def test_out_of_order_archive(tmp_path: Path) -> None:
    """Clusters shuffled across two devices (as a live backup with copy-before-write writes them)."""
    sizes = [13 * fmt.CLUSTER_SIZE + 512 * 3, 5 * fmt.CLUSTER_SIZE]
    disks = [("drive-scsi0", disk_image(sizes[0], [2, 0, 0, 1, 3], seed=1)),
             ("drive-scsi1", disk_image(sizes[1], [0, 0, 2], seed=2))]
    order = [(d, c) for d, (_n, data) in enumerate(disks) for c in range(fmt.cluster_count(len(data)))]
    random.Random(7).shuffle(order)
    archive = tmp_path / "shuffled.vma"
    archive.write_bytes(write_archive(disks, order=order))
    proc = cli("verify", str(archive), "--checksums")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{hashlib.sha256(data).hexdigest()}  {name}" for name, data in disks]


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
def test_hasher_any_order_bounded(tmp_path: Path, order: str) -> None:
    size = 40 * fmt.CLUSTER_SIZE + 1024
    data = disk_image(size, [2, 0, 1, 0, 0, 3], seed=5)
    clusters = list(range(fmt.cluster_count(size)))
    if order == "reverse":
        clusters.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(clusters)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    hasher = DeviceHasher(DeviceInfo(1, "d", size), temp_dir=spill_dir)
    try:
        for c in clusters:
            chunk = data[c * fmt.CLUSTER_SIZE : (c + 1) * fmt.CLUSTER_SIZE]
            full = chunk + bytes(fmt.CLUSTER_SIZE - len(chunk))
            hasher.add(c, None if not any(full) else full)
        assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
        assert (hasher.spilled_bytes == 0) == (order == "forward")
        assert list(spill_dir.iterdir()) == []  # the spill file has no name
    finally:
        hasher.close()


def test_incomplete_device_has_no_digest() -> None:
    hasher = DeviceHasher(DeviceInfo(1, "d", 2 * fmt.CLUSTER_SIZE))
    hasher.add(1, None)
    with pytest.raises(ValueError, match="cluster 0 was never added"):
        hasher.hexdigest()
    hasher.close()
