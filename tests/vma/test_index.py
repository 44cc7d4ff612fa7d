"""The archive index (docs/format.md I): written by ``vma create``, found again, refused when damaged,
and read at random through :mod:`qmpbackup.vma.random_access`."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qmpbackup.vma import CLUSTER_SIZE
from qmpbackup.vma.create import DiskSpec, create_archive_file
from qmpbackup.vma.index import (
    ArchiveIndex,
    ArchiveIndexError,
    DataChecksumError,
    sidecar_path,
)
from qmpbackup.vma.random_access import ArchiveDevices, RandomAccessError
from tests.support.cli import run_main_text

PVE_VMA = os.environ.get("QMPBACKUP_PVE_VMA")


def qmpbackup(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``qmpbackup ARGS``, run in this process (:mod:`tests.support.cli`)."""
    return run_main_text(*args)


def _image(path: Path, size: int, seed: int) -> bytes:
    """Data clusters, partly zero blocks, a hole; an odd size."""
    rng = random.Random(seed)
    data = bytearray(size)
    for cluster in range(size // CLUSTER_SIZE + 1):
        kind = rng.randrange(4)
        start = cluster * CLUSTER_SIZE
        if kind == 0:
            continue  # zero cluster
        for block in range(16):
            if kind == 1 and block % 3:
                continue  # partly zero
            at = start + block * 4096
            piece = rng.randbytes(4096)
            data[at:at + 4096] = piece[:max(0, min(4096, size - at))]
    path.write_bytes(bytes(data[:size]))
    return bytes(data[:size])


@pytest.fixture
def disks(tmp_path: Path) -> list[tuple[DiskSpec, bytes]]:
    sizes = [(2 * 1024 * 1024 + 7 * 512), (3 * CLUSTER_SIZE), (40 * CLUSTER_SIZE + 4096)]
    result = []
    for n, size in enumerate(sizes):
        path = tmp_path / f"disk{n}.raw"
        result.append((DiskSpec("raw", f"drive-scsi{n}", path), _image(path, size, n)))
    return result


def _create(tmp_path: Path, name: str, compress: str, disks: list[tuple[DiskSpec, bytes]]) -> Path:
    conf = tmp_path / "qemu-server.conf"
    conf.write_bytes(b"memory: 512\n")
    archive = tmp_path / name
    create_archive_file(str(archive), [conf], [d for d, _ in disks], compress, zstd_threads=2)
    return archive


@pytest.mark.parametrize(("name", "compress"), [("a.vma", "none"), ("a.vma.zst", "zstd")])
def test_random_reads_equal_the_images(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]],
                                       name: str, compress: str) -> None:
    archive = _create(tmp_path, name, compress, disks)
    assert sidecar_path(archive).exists() == (compress == "none")
    rng = random.Random(1)
    with ArchiveDevices.open(archive) as devices:
        assert [d.name for d in devices.devices] == ["drive-scsi0", "drive-scsi1", "drive-scsi2"]
        for reader, (_spec, image) in zip(devices.devices, disks, strict=True):
            assert reader.size == len(image)
            assert reader.read(0, reader.size) == image
            for _ in range(50):
                offset = rng.randrange(reader.size)
                length = rng.randrange(min(300000, reader.size - offset) + 1)
                assert reader.read(offset, length) == image[offset:offset + length]
            runs = reader.allocation(0, reader.size)
            assert runs[0][0] == 0 and sum(r[1] for r in runs) == reader.size
            for start, length, zero in runs:
                if zero:
                    assert image[start:start + length] == bytes(length)
            with pytest.raises(RandomAccessError):
                reader.read(reader.size - 1, 2)


def test_reads_from_several_threads(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]]) -> None:
    archive = _create(tmp_path, "a.vma.zst", "zstd", disks)
    failures: list[str] = []
    with ArchiveDevices.open(archive) as devices:
        reader, image = devices.devices[2], disks[2][1]

        def work(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(100):
                offset = rng.randrange(0, reader.size - 4096, 4096)
                if reader.read(offset, 4096) != image[offset:offset + 4096]:
                    failures.append(f"{offset}")

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures


def test_zstd_decoders_skip_the_index_frame(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]]) -> None:
    """``zstd -dc`` gives exactly the VMA stream (no index bytes), which Proxmox's vma extracts."""
    archive = _create(tmp_path, "a.vma.zst", "zstd", disks)
    plain = subprocess.run(["zstd", "-dc", str(archive)], capture_output=True, check=True).stdout
    with ArchiveIndex.open(archive) as index:
        assert len(plain) == index.plain_size
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "vma", "extract", "-", str(out)],
                          input=plain, capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for spec, image in disks:
        got = (out / f"disk-{spec.name}.raw").read_bytes()
        assert got[:len(image)] == image
    if PVE_VMA:
        pve_out = tmp_path / "pve"
        pve = subprocess.run(f"zstd -dc {archive} | {PVE_VMA} extract - {pve_out}", shell=True,
                             capture_output=True, timeout=120, check=False)
        assert pve.returncode == 0, pve.stderr
        for spec, image in disks:
            assert (pve_out / f"disk-{spec.name}.raw").read_bytes()[:len(image)] == image


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_index_is_refused(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]], damage: str) -> None:
    archive = _create(tmp_path, "a.vma", "none", disks)
    sidecar = sidecar_path(archive)
    data = bytearray(sidecar.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[-100:]
    else:
        data = bytearray()
    sidecar.write_bytes(data)
    with pytest.raises(ArchiveIndexError, match=r"index.*(damaged|truncated).*run: qmpbackup index"):
        ArchiveIndex.open(archive)
    with pytest.raises(RandomAccessError, match="qmpbackup index"):
        ArchiveDevices.open(archive)


def test_damaged_embedded_index_is_refused(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]]) -> None:
    archive = _create(tmp_path, "a.vma.zst", "zstd", disks)
    with open(archive, "r+b") as f:
        f.seek(-200, os.SEEK_END)
        byte = f.read(1)
        f.seek(-200, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ArchiveIndexError, match="damaged"):
        ArchiveIndex.open(archive)
    subprocess.run(["zstd", "-t", "-q", str(archive)], check=True)  # still a sound zstd stream


def test_index_of_another_archive_is_refused(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]]) -> None:
    a = _create(tmp_path, "a.vma", "none", disks)
    b = _create(tmp_path, "b.vma", "none", disks)
    shutil.copy(sidecar_path(a), sidecar_path(b))
    with pytest.raises(ArchiveIndexError, match="belongs to another archive"):
        ArchiveIndex.open(b)


def test_flipped_data_byte_is_caught_on_read(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]]) -> None:
    archive = _create(tmp_path, "a.vma", "none", disks)
    with ArchiveIndex.open(archive) as index:
        dev = index.devices[2]
        record = next(index.record(dev, c) for c in range(dev.clusters) if index.record(dev, c).mask)
        cluster = next(c for c in range(dev.clusters) if index.record(dev, c).mask)
    with open(archive, "r+b") as f:
        f.seek(record.data_offset + 100)
        f.write(b"\xff" * 64)
    with ArchiveDevices.open(archive) as devices:
        with pytest.raises(DataChecksumError, match=rf"drive-scsi2 cluster {cluster} \(byte offset"):
            devices.devices[2].read(cluster * CLUSTER_SIZE, 4096)
        assert devices.devices[0].read(0, 4096) == disks[0][1][:4096]


def test_flipped_byte_in_a_run_of_whole_clusters_is_caught(tmp_path: Path,
                                                           disks: list[tuple[DiskSpec, bytes]]) -> None:
    """A long read of a .vma reads runs of fully stored clusters with one preadv each: still checked."""
    archive = _create(tmp_path, "a.vma", "none", disks)
    with ArchiveIndex.open(archive) as index:
        dev = index.devices[0]
        full = [c for c in range(dev.clusters - 1) if index.record(dev, c).mask == 0xFFFF
                and index.record(dev, c + 1).mask == 0xFFFF]
        cluster = full[len(full) // 2] + 1
        record = index.record(dev, cluster)
    with open(archive, "r+b") as f:
        f.seek(record.data_offset + CLUSTER_SIZE - 1)
        byte = f.read(1)
        f.seek(record.data_offset + CLUSTER_SIZE - 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with ArchiveDevices.open(archive) as devices:
        reader, image = devices.devices[0], disks[0][1]
        with pytest.raises(DataChecksumError, match=rf"drive-scsi0 cluster {cluster} \(byte offset"):
            reader.read(0, reader.size)
        start = (cluster + 1) * CLUSTER_SIZE
        assert reader.read(start, reader.size - start) == image[start:]


def test_gzip_needs_recompression(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]]) -> None:
    archive = _create(tmp_path, "a.vma.gz", "gzip", disks)
    assert sidecar_path(archive).exists()
    with ArchiveIndex.open(archive):
        pass
    with pytest.raises(RandomAccessError, match="qmpbackup vma recompress"):
        ArchiveDevices.open(archive)


@pytest.mark.parametrize("compress", ["none", "zstd-one-stream", "gzip"])
def test_index_command_on_archive_without_index(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]],
                                                compress: str) -> None:
    """An archive another program wrote (zstd as one long stream, as ``zstd`` makes it) gets a sidecar."""
    archive = _create(tmp_path, "a.vma", "none", disks)
    sidecar_path(archive).unlink()
    if compress == "zstd-one-stream":
        subprocess.run(["zstd", "-q", "--rm", str(archive)], check=True)
        archive = tmp_path / "a.vma.zst"
    elif compress == "gzip":
        subprocess.run(["gzip", str(archive)], check=True)
        archive = tmp_path / "a.vma.gz"
    with pytest.raises(ArchiveIndexError, match=f"has no index .run: qmpbackup index {archive}"):
        ArchiveIndex.open(archive)
    proc = qmpbackup("index", archive)
    assert proc.returncode == 0, proc.stderr
    assert sidecar_path(archive).exists()
    if compress == "none":
        with ArchiveDevices.open(archive) as devices:
            assert devices.devices[1].read(0, devices.devices[1].size) == disks[1][1]
    else:
        assert "qmpbackup vma recompress" in proc.stderr
        with pytest.raises(RandomAccessError, match="recompress"):
            ArchiveDevices.open(archive)
    again = qmpbackup("index", archive)
    assert again.returncode == 0 and "already has a sound index" in again.stderr


def test_index_command_refuses_incomplete_archive(tmp_path: Path) -> None:
    from tests.vma.test_proxmox_sample import SAMPLE
    if not SAMPLE.exists():
        pytest.skip("proxmox-sample.vma.gz not available")
    archive = tmp_path / "sample.vma.gz"
    shutil.copy(SAMPLE, archive)
    proc = qmpbackup("index", archive)
    assert proc.returncode == 1
    assert "missing cluster 23" in proc.stderr and "Traceback" not in proc.stderr
    assert not sidecar_path(archive).exists()


@pytest.mark.skipif(not PVE_VMA, reason="QMPBACKUP_PVE_VMA (Proxmox's vma binary) not set")
def test_index_of_proxmox_made_archive(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]]) -> None:
    conf = tmp_path / "qemu-server.conf"
    conf.write_bytes(b"memory: 512\n")
    archive = tmp_path / "pve.vma"
    args = [str(PVE_VMA), "create", str(archive), "-c", str(conf)]
    for spec, _ in disks:
        args.append(f"{spec.name}={spec.path}")
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    assert qmpbackup("index", archive).returncode == 0
    with ArchiveDevices.open(archive) as devices:
        for reader, (_spec, image) in zip(devices.devices, disks, strict=True):
            assert reader.read(0, len(image)) == image


@pytest.mark.parametrize(("name", "compress"), [("a.vma", "none"), ("a.vma.zst", "zstd")])
def test_verify_checks_data_against_the_index(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]],
                                              name: str, compress: str) -> None:
    archive = _create(tmp_path, name, compress, disks)
    proc = qmpbackup("verify", archive)
    assert proc.returncode == 0, proc.stderr
    assert "matches the index" in proc.stderr


def test_verify_fails_on_64_overwritten_bytes(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]]) -> None:
    """The issue's reproduction: 64 bytes overwritten inside a cluster of an uncompressed archive."""
    archive = _create(tmp_path, "a.vma", "none", disks)
    with ArchiveIndex.open(archive) as index:
        dev = index.devices[0]
        cluster = next(c for c in range(dev.clusters) if index.record(dev, c).mask == 0xFFFF)
        offset = index.record(dev, cluster).data_offset
    with open(archive, "r+b") as f:
        f.seek(offset + 1000)
        f.write(b"\x00" * 64)
    proc = qmpbackup("verify", archive)
    assert proc.returncode == 1
    assert f"ERROR: data checksum mismatch in drive-scsi0 cluster {cluster} (byte offset {offset})" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_verify_without_or_with_damaged_index_checks_structure_only(
        tmp_path: Path, disks: list[tuple[DiskSpec, bytes]]) -> None:
    archive = _create(tmp_path, "a.vma", "none", disks)
    sidecar = sidecar_path(archive)
    data = sidecar.read_bytes()
    sidecar.write_bytes(data[: len(data) // 2])
    proc = qmpbackup("verify", archive)
    assert proc.returncode == 0, proc.stderr
    assert "WARN: ignoring the index" in proc.stderr and "truncated" in proc.stderr
    assert "(structure only: the index is damaged)" in proc.stderr
    sidecar.unlink()
    proc = qmpbackup("verify", archive)
    assert proc.returncode == 0 and "(structure only: no index, qmpbackup index" in proc.stderr


@pytest.mark.parametrize("compress", ["gzip", "zstd-one-stream"])
def test_recompress_gives_random_access(tmp_path: Path, disks: list[tuple[DiskSpec, bytes]], compress: str) -> None:
    archive = _create(tmp_path, "a.vma", "none", disks)
    sidecar_path(archive).unlink()
    tool = ["gzip"] if compress == "gzip" else ["zstd", "-q", "--rm"]
    subprocess.run([*tool, str(archive)], check=True)
    archive = tmp_path / ("a.vma.gz" if compress == "gzip" else "a.vma.zst")
    dest = tmp_path / "r.vma.zst"
    proc = qmpbackup("vma", "recompress", archive, dest)
    assert proc.returncode == 0, proc.stderr
    with ArchiveDevices.open(dest) as devices:
        for reader, (_spec, image) in zip(devices.devices, disks, strict=True):
            assert reader.read(0, reader.size) == image
    with ArchiveIndex.open(dest) as index:
        assert index.framed
    assert qmpbackup("verify", dest).returncode == 0
    again = qmpbackup("vma", "recompress", archive, dest)
    assert again.returncode == 2 and "already exists" in again.stderr
    if PVE_VMA:
        out = tmp_path / "pve"
        pve = subprocess.run(f"zstd -dc {dest} | {PVE_VMA} extract - {out}", shell=True,
                             capture_output=True, timeout=120, check=False)
        assert pve.returncode == 0, pve.stderr
        for spec, image in disks:
            assert (out / f"disk-{spec.name}.raw").read_bytes()[:len(image)] == image


def test_allocation_shows_stored_zero_clusters_as_zero(tmp_path: Path) -> None:
    """Another writer may store zero blocks (format.md: SHOULD be left out). A stored cluster whose
    digest is the all-zero one reads as zeros; a stored zero block beside data shows as data (telling
    it apart would mean reading the cluster). ``max_runs`` cuts the answer short."""
    from tests.vma.archive_builder import RawExtent, raw_archive
    from qmpbackup.vma import format as fmt

    zero_block, data_block = bytes(4096), b"\x07" * 4096
    extent = RawExtent(
        slots=[fmt.blockinfo(fmt.FULL_MASK, 1, 0), fmt.blockinfo(0b1, 1, 1), fmt.blockinfo(0b11, 1, 2),
               fmt.blockinfo(0, 1, 3)],
        payload=zero_block * 16 + zero_block + data_block + zero_block)
    archive = tmp_path / "foreign.vma"
    archive.write_bytes(raw_archive([("drive-scsi0", 4 * CLUSTER_SIZE)], [extent, RawExtent()]))
    assert qmpbackup("index", archive).returncode == 0
    with ArchiveDevices.open(archive) as devices:
        reader = devices.devices[0]
        image = bytes(2 * CLUSTER_SIZE) + data_block + bytes(CLUSTER_SIZE + 15 * 4096)
        assert len(image) == reader.size
        assert reader.read(0, reader.size) == image
        assert reader.read(4096, 4096) == zero_block and reader.read(2 * CLUSTER_SIZE, 4096) == data_block
        c2 = 2 * CLUSTER_SIZE
        assert reader.allocation(0, reader.size) == [(0, c2, True), (c2, 8192, False),
                                                      (c2 + 8192, reader.size - c2 - 8192, True)]
        assert reader.allocation(0, reader.size, 1) == [(0, c2, True)]
        assert reader.allocation(c2 + 4096, 100, 1) == [(c2 + 4096, 100, False)]
