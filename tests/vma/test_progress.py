"""``vma create -v`` and ``vma extract -v``: Proxmox's line formats, counters as the C tool defines them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from qmpbackup.vma import format as fmt
from qmpbackup.vma.header import DeviceInfo
from qmpbackup.vma.progress import CreateProgress, ExtractProgress, zero_bytes
from tests.vma.test_cli import CONFIG, qmpbackup

CLUSTER = fmt.CLUSTER_SIZE
BLOCK = fmt.BLOCK_SIZE
CREATE_PROGRESS = re.compile(r"^progress (\d+)% (\d+)/(\d+) (\d+)$")
EXTRACT_PROGRESS = re.compile(r"^progress (\d+)% \(read (\d+) bytes, duration (\d+) sec\)$")


def expected_zero_bytes(image: bytes, size: int) -> int:
    """The C writer's count: each 4 KiB block of every cluster that is zero or lies past the device end."""
    zero = 0
    for offset in range(0, fmt.cluster_count(size) * CLUSTER, BLOCK):
        block = image[offset : offset + BLOCK] if offset < size else b""
        if not block.strip(b"\0"):
            zero += BLOCK
    return zero


@pytest.mark.parametrize(
    ("data", "valid", "expected"),
    [
        (None, CLUSTER, CLUSTER),
        (bytes(CLUSTER), CLUSTER, CLUSTER),
        (b"\1" * CLUSTER, CLUSTER, 0),
        (bytes(BLOCK) + b"\1" * (CLUSTER - BLOCK), CLUSTER, BLOCK),
        (b"\1" + bytes(CLUSTER - 1), CLUSTER, CLUSTER - BLOCK),  # only the first block holds data
        (bytes(BLOCK - 1) + b"\1" + bytes(CLUSTER - BLOCK), CLUSTER, CLUSTER - BLOCK),  # last byte of a block
        (b"\1" * 1024, 1024, CLUSTER - BLOCK),  # a 1 KiB device: 15 blocks past its end
        (bytes(1024), 1024, CLUSTER),
    ],
)
def test_zero_bytes(data: bytes | None, valid: int, expected: int) -> None:
    assert zero_bytes(data, valid) == expected


def test_create_progress_lines_change_only_with_the_percentage() -> None:
    lines: list[str] = []
    progress = CreateProgress(lines.append)
    progress.add_device(1, "drive-scsi0", 300 * CLUSTER)
    progress.add_device(2, "drive-efidisk0", 1024)
    for cluster in range(300):
        progress.cluster(1, cluster, None if cluster % 2 else b"\1" * CLUSTER)
    progress.cluster(2, 0, b"\2" * 1024)
    progress.finish()
    numbers = [tuple(map(int, m.groups())) for m in map(CREATE_PROGRESS.match, lines[:-2]) if m]
    assert len(numbers) == len(lines) - 2  # every line before the summary is a progress line
    assert [n[0] for n in numbers] == sorted({n[0] for n in numbers})  # one line per percentage
    assert numbers[-1] == (100, 300 * CLUSTER + 1024, 300 * CLUSTER + 1024, 150 * CLUSTER + CLUSTER - BLOCK)
    assert lines[-2:] == [
        f"image drive-scsi0: size={300 * CLUSTER} zeros={150 * CLUSTER} saved={150 * CLUSTER}",
        f"image drive-efidisk0: size=1024 zeros={CLUSTER - BLOCK} saved={1024 - CLUSTER + BLOCK}",
    ]


def test_extract_progress_counts_like_the_c_reader() -> None:
    lines: list[str] = []
    devices = (DeviceInfo(1, "a", 200 * CLUSTER), DeviceInfo(2, "b", CLUSTER + 1536))
    progress = ExtractProgress(devices, lines.append, clock=lambda: 0.0)
    for cluster in range(200):
        progress.cluster(1, cluster, 0 if cluster < 100 else fmt.FULL_MASK)
    progress.cluster(2, 0, 0b11)  # 14 blocks left out
    progress.cluster(2, 1, 0)  # the device ends 1536 bytes into this cluster: only those count
    progress.finish()
    # 201 whole clusters (b's partial one does not count), 202 slots read
    assert lines[0] == f"progress 1% (read {3 * CLUSTER} bytes, duration 0 sec)"
    assert sum(1 for line in lines if line.startswith("progress")) == 100
    sparse = 100 * CLUSTER + 14 * BLOCK + 1536
    read = 202 * CLUSTER
    assert lines[-2:] == [
        f"total bytes read {read}, sparse bytes {sparse} ({100.0 * sparse / read:.3g}%)",
        f"space reduction due to 4K zero blocks {100.0 * 14 * BLOCK / (read - sparse):.3g}%",
    ]


def test_extract_progress_without_data() -> None:
    lines: list[str] = []
    ExtractProgress((), lines.append).finish()
    assert lines == ["vma archive contains no image data"]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """20 MiB: random data, zero blocks inside data clusters, a hole, an odd tail."""
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.write(os.urandom(3 * CLUSTER))
        f.write(bytes(BLOCK) + os.urandom(CLUSTER - BLOCK))
        f.seek(12 << 20)
        f.write(os.urandom(100_000))
        f.truncate((20 << 20) + 512)
    return path


def test_cli_create_and_extract_verbose(tmp_path: Path, image: Path) -> None:
    conf = tmp_path / "qemu-server.conf"
    conf.write_bytes(CONFIG)
    archive = tmp_path / "a.vma"
    proc = qmpbackup("create", "-v", archive, "-c", conf, "-d", f"format=raw:drive-scsi0={image}")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    lines = proc.stderr.decode().splitlines()
    size = image.stat().st_size
    data = image.read_bytes()
    zeros = expected_zero_bytes(data, size)
    assert lines[-1] == f"image drive-scsi0: size={size} zeros={zeros} saved={size - zeros}"
    progress = [tuple(map(int, m.groups())) for m in map(CREATE_PROGRESS.match, lines[:-1]) if m]
    assert len(progress) == len(lines) - 1 and len(progress) <= 101
    assert progress[-1] == (100, size, size, zeros)
    assert all(a[1] < b[1] for a, b in zip(progress, progress[1:], strict=False))

    out = tmp_path / "out"
    proc = qmpbackup("extract", "-v", archive, out)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == f"DEVINFO {out}/tmp-disk-drive-scsi0.raw {size}"
    progress_lines = [line for line in lines[1:] if EXTRACT_PROGRESS.match(line)]
    assert 90 <= len(progress_lines) <= 100 and progress_lines[-1].startswith("progress 100% ")
    clusters = fmt.cluster_count(size)
    read = clusters * CLUSTER
    assert lines[-2].startswith(f"total bytes read {read}, sparse bytes {zeros - (read - size)} (")
    assert lines[-1].startswith("space reduction due to 4K zero blocks ")
    assert (out / "disk-drive-scsi0.raw").read_bytes() == data
