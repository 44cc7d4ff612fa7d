"""Damaged archives: a clear one-line error, exit 1, and nothing left behind (restore) or reported (verify)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.restore.helpers import Disk, cli, config_text, tree, vma_create
from tests.vma.archive_builder import extent_offsets, header_size_of

VMID = "200"


def flip(data: bytearray, offset: int) -> bytearray:
    data[offset] ^= 0x10
    return data


def header_flip(a: bytearray) -> bytearray:
    return flip(a, 12288 + 40)  # inside the blob buffer: the header checksum no longer matches


def extent_header_flip(a: bytearray) -> bytearray:
    return flip(a, extent_offsets(bytes(a))[1] + 100)  # a blockinfo slot of the second extent


def truncate_mid_extent(a: bytearray) -> bytearray:
    return a[: extent_offsets(bytes(a))[1] + 5000]


def truncate_at_extent(a: bytearray) -> bytearray:
    return a[: extent_offsets(bytes(a))[-1]]


def truncate_header(a: bytearray) -> bytearray:
    return a[: header_size_of(bytes(a)) - 100]


CASES: list[tuple[str, Callable[[bytearray], bytearray], str]] = [
    ("header", header_flip, "ERROR: wrong vma header checksum"),
    ("extent-header", extent_header_flip, "ERROR: wrong vma extent header checksum (at byte "),
    ("truncated-mid-extent", truncate_mid_extent, "ERROR: short vma extent ("),
    ("truncated-at-extent", truncate_at_extent, "ERROR: detected missing cluster "),
    ("truncated-header", truncate_header, "ERROR: can't read vma header data"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, source_disks: list[Disk]) -> bytes:
    base = tmp_path_factory.mktemp("corrupt")
    return vma_create(base / "good.vma", source_disks, config_text(source_disks)).read_bytes()


def assert_nothing_left(target: Path, config_dir: Path) -> None:
    assert list(target.iterdir()) == []
    guests = config_dir / "guests"
    assert not guests.exists() or list(guests.iterdir()) == []


@pytest.mark.parametrize(("name", "damage", "message"), CASES, ids=[c[0] for c in CASES])
def test_damaged_uncompressed(
    good: bytes,
    tmp_path: Path,
    isolated_config: Path,
    name: str,
    damage: Callable[[bytearray], bytearray],
    message: str,
) -> None:
    archive = tmp_path / "bad.vma"
    archive.write_bytes(bytes(damage(bytearray(good))))
    target = tmp_path / "t"
    target.mkdir()
    proc = cli("restore", str(archive), VMID, "--target-dir", str(target))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
    assert_nothing_left(target, isolated_config)
    verified = cli("verify", str(archive))
    assert verified.returncode == 1
    errors = [line for line in verified.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and errors[0].startswith(message)


@pytest.mark.parametrize("compress", ["zstd", "gzip"])
def test_damaged_compressed_data(
    source_disks: list[Disk], tmp_path: Path, isolated_config: Path, compress: str
) -> None:
    archive = vma_create(tmp_path / "a.vma.z", source_disks, config_text(source_disks), compress)
    data = bytearray(archive.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01
    archive.write_bytes(bytes(data))
    target = tmp_path / "t"
    target.mkdir()
    proc = cli("restore", str(archive), VMID, "--target-dir", str(target))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: ") and ("corrupt" in last or "checksum" in last or "wrong" in last), last
    assert_nothing_left(target, isolated_config)
    assert cli("verify", str(archive)).returncode == 1


def test_truncated_zstd(source_disks: list[Disk], tmp_path: Path, isolated_config: Path) -> None:
    archive = vma_create(tmp_path / "a.vma.zst", source_disks, config_text(source_disks), "zstd")
    archive.write_bytes(archive.read_bytes()[:-1000])
    target = tmp_path / "t"
    target.mkdir()
    proc = cli("restore", str(archive), VMID, "--target-dir", str(target))
    assert proc.returncode == 1
    assert_nothing_left(target, isolated_config)


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello" * 5000)
    proc = cli("verify", str(junk))
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ERROR: not a vma file - wrong magic number (at byte 0)"
    proc = cli("verify", str(tmp_path / "missing.vma"))
    assert proc.returncode == 2 and "cannot open archive" in proc.stderr


def test_signal_removes_everything(tmp_path: Path, isolated_config: Path) -> None:
    """SIGTERM in the middle of a (slowed-down) restore: exit 143, no images, no definition."""
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.write(os.urandom(8 << 20))
    disk = Disk("scsi0", big, 8 << 20)
    archive = vma_create(tmp_path / "a.vma", [disk], config_text([disk]))
    target = tmp_path / "t"
    target.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpbackup.cli.main", "restore", str(archive), VMID, "--target-dir", str(target),
         "--bwlimit", "4096"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not any(p.name.endswith(".restore-tmp") for p in target.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "restore never started writing"
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "ERROR: interrupted by signal SIGTERM"
    assert_nothing_left(target, isolated_config)


def test_a_failed_restore_leaves_existing_files_alone(
    good: bytes, tmp_path: Path, isolated_config: Path
) -> None:
    """With --force and a damaged archive, the old definition and images stay exactly as they were."""
    guests = isolated_config / "guests"
    guests.mkdir()
    (guests / "200.conf").write_text("name: old\nscsi0: /x/old.raw\n")
    target = tmp_path / "t"
    target.mkdir()
    (target / "vm-200-disk-0.raw").write_bytes(b"old")
    before = tree(tmp_path)
    archive = tmp_path / "bad.vma"
    archive.write_bytes(bytes(truncate_at_extent(bytearray(good))))
    before = tree(tmp_path)
    proc = cli("restore", str(archive), VMID, "--target-dir", str(target), "--force")
    assert proc.returncode == 1
    assert tree(tmp_path) == before


SAMPLE = Path("/work/shared/testdata/proxmox-sample.vma.gz")


@pytest.mark.skipif(not SAMPLE.exists(), reason="the Proxmox sample archive is not available")
def test_real_proxmox_archive_missing_clusters(tmp_path: Path, isolated_config: Path) -> None:
    """The public Proxmox sample is truncated: verify and restore both name the first missing cluster."""
    verified = cli("verify", str(SAMPLE))
    assert verified.returncode == 1
    last = verified.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: detected missing cluster ") and "for stream drive-scsi0" in last
    target = tmp_path / "t"
    target.mkdir()
    proc = cli("restore", str(SAMPLE), VMID, "--target-dir", str(target))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == last
    assert_nothing_left(target, isolated_config)
