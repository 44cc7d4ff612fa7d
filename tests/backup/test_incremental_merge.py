"""The synthetic full: changed clusters from QEMU, the rest from the previous archive (real files)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import zstandard

from qmpbackup.backup.assembler import ClusterAssembler, PointInTimeError
from qmpbackup.backup.incremental import PreviousArchive, newest_archive
from qmpbackup.backup.synthetic import PreviousArchiveError, fill_from_previous
from qmpbackup.vma.format import CLUSTER_SIZE
from qmpbackup.vma.index import ArchiveIndex, embed_index, sidecar_path, write_sidecar
from qmpbackup.compress import Compression, open_compressor
from qmpbackup.vma import VmaReader, VmaWriter
from qmpbackup.vma.archive_io import open_archive

SIZE_A = 40 * CLUSTER_SIZE + 4096  # a short last cluster
SIZE_B = 8 * CLUSTER_SIZE


def _write_archive(path: Path, disks: dict[str, bytes], compression: Compression) -> VmaWriter:
    with path.open("wb") as f:
        comp = open_compressor(f, compression)
        writer = VmaWriter(comp)
        ids = {name: writer.add_device(name, len(data)) for name, data in disks.items()}
        for name, data in disks.items():
            dev = ids[name]
            for c in range(0, len(data), CLUSTER_SIZE):
                writer.write_cluster(dev, c // CLUSTER_SIZE, data[c:c + CLUSTER_SIZE])
        writer.close()
        assert writer.index is not None
        embedded = embed_index(writer.index, comp, writer.bytes_written)
        comp.close()
    sidecar_path(path).unlink(missing_ok=True)
    if not embedded:
        write_sidecar(writer.index, path, writer.bytes_written)
    writer.index.close()
    return writer


def _read_disks(path: Path) -> dict[str, bytes]:
    with open_archive(str(path)) as src:
        reader = VmaReader(src)
        out = {dev.name: bytearray(dev.size) for dev in reader.devices.values()}
        names = {i: d.name for i, d in reader.devices.items()}
        for cl in reader.clusters():
            if cl.data is not None:
                buf = out[names[cl.dev_id]]
                start = cl.cluster_num * CLUSTER_SIZE
                buf[start:start + CLUSTER_SIZE] = cl.data[:len(buf) - start]
    return {k: bytes(v) for k, v in out.items()}


def _disks() -> dict[str, bytes]:
    a = bytearray(os.urandom(SIZE_A))
    a[5 * CLUSTER_SIZE:9 * CLUSTER_SIZE] = bytes(4 * CLUSTER_SIZE)  # zero clusters too
    return {"drive-scsi0": bytes(a), "drive-virtio1": os.urandom(SIZE_B)}


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.ZSTD])
@pytest.mark.parametrize("new_compression", [Compression.NONE, Compression.ZSTD])
async def test_synthetic_full_equals_new_state(tmp_path: Path, compression: Compression,
                                               new_compression: Compression) -> None:
    old = _disks()
    prev_path = tmp_path / f"vzdump-qemu-100-2026_01_01-00_00_00.vma{compression.extension}"
    prev = _write_archive(prev_path, old, compression)
    found, reason = newest_archive(tmp_path, 100)
    assert reason is None and found is not None
    assert found.uuid == prev.uuid and found.sizes == {"drive-scsi0": SIZE_A, "drive-virtio1": SIZE_B}

    new_a = bytearray(old["drive-scsi0"])
    changed = {0: os.urandom(CLUSTER_SIZE), 7: bytes(CLUSTER_SIZE), 40: os.urandom(4096)}
    for c, data in changed.items():
        new_a[c * CLUSTER_SIZE:c * CLUSTER_SIZE + len(data)] = data
    out = tmp_path / f"new.vma{new_compression.extension}"
    with out.open("wb") as f, open_compressor(f, new_compression) as comp:
        writer = VmaWriter(comp)
        ida = writer.add_device("drive-scsi0", SIZE_A)
        idb = writer.add_device("drive-virtio1", SIZE_B)
        asm_a = ClusterAssembler(writer, ida, SIZE_A, name="drive-scsi0")
        asm_b = ClusterAssembler(writer, idb, SIZE_B, name="drive-virtio1")
        for c, data in changed.items():  # what QEMU sends: only the dirty clusters
            if any(data):
                asm_a.write_sync(c * CLUSTER_SIZE, data)
            else:
                asm_a.write_zeroes_sync(c * CLUSTER_SIZE, len(data))
        new_b = os.urandom(SIZE_B)  # a drive read in full (e.g. resized): not merged
        asm_b.write_sync(0, new_b)
        reused = await fill_from_previous(found, {"drive-scsi0": asm_a}, writer)
        asm_a.finish()
        asm_b.finish()
        writer.close()
    # Clusters 16-31 of drive-scsi0 did not change: one whole frame, copied when both are zstd.
    assert (writer.frames_reused > 0) == (compression is new_compression is Compression.ZSTD)
    assert reused == {"drive-scsi0": SIZE_A - 2 * CLUSTER_SIZE - 4096}
    assert asm_a.stats.bytes_reused == reused["drive-scsi0"]
    got = _read_disks(out)
    assert got["drive-scsi0"] == bytes(new_a)
    assert got["drive-virtio1"] == new_b


async def test_damaged_previous_archive_fails_clearly(tmp_path: Path) -> None:
    old = _disks()
    prev_path = tmp_path / "vzdump-qemu-100-2026_01_01-00_00_00.vma"
    _write_archive(prev_path, old, Compression.NONE)
    found, _ = newest_archive(tmp_path, 100)
    assert found is not None
    raw = bytearray(prev_path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # payload damage is caught by the missing/duplicate rules or the header MD5
    raw[-CLUSTER_SIZE * 3] ^= 0x01
    prev_path.write_bytes(bytes(raw[: len(raw) - 5000]))  # and truncated
    with (tmp_path / "new.vma").open("wb") as f:
        writer = VmaWriter(f)
        asm = ClusterAssembler(writer, writer.add_device("drive-scsi0", SIZE_A), SIZE_A, name="drive-scsi0")
        with pytest.raises(PreviousArchiveError, match="damaged or unreadable .*: reading the whole disk"):
            await fill_from_previous(found, {"drive-scsi0": asm}, writer)


async def test_replaced_previous_archive_is_refused(tmp_path: Path) -> None:
    old = _disks()
    prev_path = tmp_path / "vzdump-qemu-100-2026_01_01-00_00_00.vma"
    _write_archive(prev_path, old, Compression.NONE)
    found, _ = newest_archive(tmp_path, 100)
    assert found is not None
    _write_archive(prev_path, old, Compression.NONE)  # same name, new uuid
    with (tmp_path / "new.vma").open("wb") as f:
        writer = VmaWriter(f)
        asm = ClusterAssembler(writer, writer.add_device("drive-scsi0", SIZE_A), SIZE_A, name="drive-scsi0")
        with pytest.raises(PreviousArchiveError, match="uuid changed"):
            await fill_from_previous(PreviousArchive(found.path, found.uuid, found.sizes), {"drive-scsi0": asm},
                                     writer)


def test_newest_archive_reasons(tmp_path: Path) -> None:
    assert newest_archive(tmp_path / "none", 100) == (None, "no previous archive")
    (tmp_path / "vzdump-qemu-100-2026_01_01-00_00_00.vma").write_bytes(b"junk")
    found, reason = newest_archive(tmp_path, 100)
    assert found is None and reason is not None and "damaged or unreadable" in reason
    prev_path = tmp_path / "vzdump-qemu-100-2026_01_02-00_00_00.vma"
    _write_archive(prev_path, _disks(), Compression.NONE)
    sidecar = sidecar_path(prev_path)
    sidecar.write_bytes(sidecar.read_bytes()[:-10])
    found, reason = newest_archive(tmp_path, 100)
    assert found is None and reason == ("previous archive's index not usable: index in "
                                        f"{sidecar.name} truncated or damaged (no valid trailer)")
    sidecar.unlink()
    found, reason = newest_archive(tmp_path, 100)
    assert found is None and reason == f"previous archive {prev_path.name} has no index, so its data cannot be checked"


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.ZSTD])
async def test_flipped_byte_in_previous_archive_is_not_copied(tmp_path: Path, compression: Compression) -> None:
    """The issue's reproduction: 64 bytes overwritten inside a stored cluster pass every format rule;
    the digest in the previous archive's index catches them before the cluster is taken."""
    old = _disks()
    prev_path = tmp_path / f"vzdump-qemu-100-2026_01_01-00_00_00.vma{compression.extension}"
    _write_archive(prev_path, old, compression)
    found, _ = newest_archive(tmp_path, 100)
    assert found is not None
    with ArchiveIndex.open(prev_path) as index:
        dev = index.device("drive-scsi0")
        assert dev is not None
        record = index.record(dev, 20)
        assert record.mask == 0xFFFF
    if compression is Compression.NONE:
        with prev_path.open("r+b") as f:
            f.seek(record.data_offset + 5000)
            f.write(b"\x00" * 64)
    else:  # damage the plain data and compress it again frame by frame: every zstd check passes
        plain = bytearray(zstd_plain(prev_path))
        plain[record.data_offset + 5000:record.data_offset + 5064] = bytes(64)
        with ArchiveIndex.open(prev_path) as index:
            frames = [index.frame(n) for n in range(index.frame_count + 1)]
            tail = prev_path.read_bytes()[frames[-1][0]:]
        with prev_path.open("wb") as f:
            for (_, start), (_, end) in itertools.pairwise(frames):
                f.write(zstandard.ZstdCompressor(write_checksum=True).compress(bytes(plain[start:end])))
            f.write(tail)  # the index frame (its frame table is off now: the data check comes first)
    with (tmp_path / "new.vma").open("wb") as f:
        writer = VmaWriter(f)
        asm = ClusterAssembler(writer, writer.add_device("drive-scsi0", SIZE_A), SIZE_A, name="drive-scsi0")
        with pytest.raises(PreviousArchiveError,
                           match=f"previous archive {prev_path.name} damaged at drive-scsi0 cluster 20: "
                                 "reading the whole disk"):
            await fill_from_previous(found, {"drive-scsi0": asm}, writer)


def zstd_plain(path: Path) -> bytes:
    import subprocess
    return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout


def test_partly_sent_cluster_cannot_be_completed(tmp_path: Path) -> None:
    with (tmp_path / "new.vma").open("wb") as f:
        writer = VmaWriter(f)
        asm = ClusterAssembler(writer, writer.add_device("d", SIZE_B), SIZE_B, name="d")
        asm.write_sync(4096, b"\x01" * 4096)
        with pytest.raises(PointInTimeError):
            asm.adopt_reused(0, 0xFFFF)
        assert asm.adopt_reused(1, 0) == CLUSTER_SIZE
        assert asm.adopt_reused(1, 0) == 0
        assert asm.first_missing() == 0
