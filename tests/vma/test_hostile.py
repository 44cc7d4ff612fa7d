"""Hostile archives through the real commands: bounded memory, one-line reader errors, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from qmpbackup.vma import format as fmt
from qmpbackup.vma.cluster_map import MAX_RUNS, ClusterMap, RunBudget, TooManyRuns
from tests.vma.archive_builder import RawExtent, raw_archive

# Runs the CLI and reports the process's own peak RSS as a last stderr line.
# VmHWM, not getrusage's ru_maxrss: a child started with vfork (as subprocess does) reports
# the parent's peak in ru_maxrss, and pytest's own peak grows over a whole suite run.
_WITH_PEAK = (
    "import sys\n"
    "from qmpbackup.cli.main import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "print('PEAK-RSS-KIB', hwm, file=sys.stderr)\n"
    "sys.exit(code)\n"
)
MEMORY_BOUND_KIB = 200 * 1024  # before: 562 MiB to 1.08 GiB for these archives


def _config(devices: int) -> bytes:
    lines = [b"memory: 512\n"]
    for i in range(devices):
        lines.append(b"scsi%d: local:100/vm-100-disk-%d.raw,size=1G\n" % (i, i))
        lines.append(b"#qmdump#map:scsi%d:drive-scsi%d::raw:\n" % (i, i))
    return b"".join(lines)


def sparse_archive(devices: list[tuple[str, int]], gap: int, *, zstd: bool = False) -> bytes:
    """Mask-0 slots ``gap`` clusters apart on every device: tiny, but every slot far from the last."""
    slots = [fmt.blockinfo(0, dev_id, c) for dev_id, (_name, size) in enumerate(devices, start=1)
             for c in range(0, fmt.cluster_count(size), gap)]
    extents = [RawExtent(slots=slots[i : i + 59]) for i in range(0, len(slots), 59)]
    data = raw_archive(devices, extents, configs=[(b"qemu-server.conf", _config(len(devices)))])
    return zstandard.ZstdCompressor(level=3).compress(data) if zstd else data


def run(tmp_path: Path, *args: str | Path) -> tuple[int, list[str], int]:
    """Exit code, stderr lines (without the peak line) and peak RSS in KiB of one CLI run."""
    proc = subprocess.run(
        [sys.executable, "-c", _WITH_PEAK, "--config-dir", str(tmp_path / "config"), *map(str, args)],
        capture_output=True, timeout=600, check=False,
    )
    lines = proc.stderr.decode(errors="replace").splitlines()
    assert lines and lines[-1].startswith("PEAK-RSS-KIB "), proc.stderr
    assert not any("Traceback" in line or "internal error" in line for line in lines), proc.stderr
    return proc.returncode, lines[:-1], int(lines[-1].split()[1])


@pytest.fixture
def huge_one(tmp_path: Path) -> Path:
    path = tmp_path / "one.vma.zst"
    path.write_bytes(sparse_archive([("drive-scsi0", 1 << 48)], 1 << 16, zstd=True))
    return path


@pytest.mark.parametrize("command", [["vma", "verify"], ["verify"], ["verify", "--checksums"]])
def test_a_sparse_256_tib_device_costs_no_memory(tmp_path: Path, huge_one: Path, command: list[str]) -> None:
    assert huge_one.stat().st_size < 200_000
    code, lines, peak = run(tmp_path, *command, huge_one)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("ERROR: detected missing cluster 1 for stream drive-scsi0 (at byte ")
    assert peak < MEMORY_BOUND_KIB


def test_twelve_16_tib_devices_cost_no_memory(tmp_path: Path) -> None:
    archive = tmp_path / "twelve.vma"
    archive.write_bytes(sparse_archive([(f"drive-scsi{i}", (16 << 40) - (1 << 16)) for i in range(12)], 1 << 16))
    (tmp_path / "images").mkdir()
    for args in (["vma", "extract", archive, tmp_path / "out"],
                 ["restore", archive, "100", "--target-dir", tmp_path / "images"]):
        code, lines, peak = run(tmp_path, *args)
        assert code == 1, lines
        assert lines[-1].startswith("ERROR: detected missing cluster 1 for stream drive-scsi0 (at byte "), lines
        assert peak < MEMORY_BOUND_KIB
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path / "images") == []


def test_the_run_cap_bounds_memory() -> None:
    """The worst order for runs (every second cluster, descending): what the cap allows fits the bound.

    Measured on 2^17 runs and scaled to the cap, as filling all 2^22 through the CLI takes most of a
    minute (``scripts/bench-hostile`` does that).
    """
    budget = RunBudget()
    seen = ClusterMap(1 << 32, budget=budget)
    held = ClusterMap(1 << 32, budget=budget, values=True)
    tracemalloc.start()
    try:
        for k in range(1 << 16, 0, -1):
            seen.add(2 * k)
            held.add(2 * k, k)
        size, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert budget.used == 1 << 17
    assert size / budget.used * MAX_RUNS < 150 * 1024 * 1024
    budget.limit = budget.used
    with pytest.raises(TooManyRuns):
        seen.add(0)


def test_checksums_hold_a_far_cluster_without_a_huge_file(tmp_path: Path) -> None:
    """A data cluster 64 TiB into the device arrives first: held in slot 0, not at its offset (EFBIG before)."""
    far = (64 << 40) // fmt.CLUSTER_SIZE
    payload = b"\x5a" * fmt.CLUSTER_SIZE
    archive = tmp_path / "far.vma"
    archive.write_bytes(raw_archive([("drive-scsi0", 1 << 47)], [
        RawExtent(slots=[fmt.blockinfo(fmt.FULL_MASK, 1, far), fmt.blockinfo(0, 1, 0)], payload=payload)]))
    code, lines, _peak = run(tmp_path, "verify", "--checksums", archive)
    assert code == 1
    assert lines == [f"ERROR: detected missing cluster 1 for stream drive-scsi0 (at byte {archive.stat().st_size})"]


@pytest.mark.parametrize("size", [1 << 63, (1 << 64) - 512])
def test_devices_beyond_2_63_bytes_are_reader_errors(tmp_path: Path, size: int) -> None:
    archive = tmp_path / "big.vma"
    archive.write_bytes(raw_archive([("drive-scsi0", size)], [RawExtent(slots=[fmt.blockinfo(0, 1, 0)])],
                                    configs=[(b"qemu-server.conf", _config(1))]))
    (tmp_path / "images").mkdir()
    for args in (["vma", "extract", archive, tmp_path / "out"],
                 ["restore", archive, "100", "--target-dir", tmp_path / "images"]):
        code, lines, _peak = run(tmp_path, *args)
        assert code == 1
        assert lines[-1] == (f"ERROR: device 1 size {size} is larger than the 281474976710656 bytes a VMA archive "
                             "can address (at byte 4136)")


def test_restore_refuses_two_devices_of_one_name(tmp_path: Path) -> None:
    """Before: exit 0, one image, the other device read and thrown away."""
    archive = tmp_path / "dup.vma"
    slots = [fmt.blockinfo(0, 1, 0), fmt.blockinfo(0, 2, 0)]
    archive.write_bytes(raw_archive([("drive-scsi0", 512), ("drive-scsi0", 512)], [RawExtent(slots=slots)],
                                    configs=[(b"qemu-server.conf", _config(1))]))
    (tmp_path / "images").mkdir()
    code, lines, _peak = run(tmp_path, "restore", archive, "100", "--target-dir", tmp_path / "images")
    assert code == 1
    assert lines[-1] == "ERROR: duplicate device name drive-scsi0 (at byte 4160)"
    assert os.listdir(tmp_path / "images") == []
    assert not (tmp_path / "config" / "guests" / "100.conf").exists()


FORGED = "INFO: restored VM 100: /etc/pve/qemu-server/100.conf"


def _one_device(tmp_path: Path, name: str) -> Path:
    archive = tmp_path / "forged.vma"
    archive.write_bytes(raw_archive([(name, 512)], [RawExtent(slots=[fmt.blockinfo(0, 1, 0)])],
                                    configs=[(b"qemu-server.conf", _config(0)), (f"x\n{FORGED}".encode(), b"")]))
    return archive


def test_restore_logs_archive_names_on_one_line(tmp_path: Path) -> None:
    """Before: a standalone forged 'restored' line on a failed restore, and the error split over two lines."""
    archive = _one_device(tmp_path, f"drive-scsi0\n{FORGED}")
    (tmp_path / "images").mkdir()
    code, lines, _peak = run(tmp_path, "restore", archive, "100", "--target-dir", tmp_path / "images")
    assert code == 1
    assert all(line.startswith(("INFO: ", "WARN: ", "ERROR: ")) for line in lines), lines
    assert FORGED not in lines
    assert f"INFO: DEV: dev_id=1 size: 512 devname: drive-scsi0\\n{FORGED}" in lines
    assert f"INFO: CFG: size: 0 name: x\\n{FORGED}" in lines
    assert lines[-1] == f"ERROR: found no device mapping information for device 'drive-scsi0\\n{FORGED}'"


def test_checksum_and_list_lines_escape_archive_names(tmp_path: Path) -> None:
    """Before: the forged line on verify --checksums' stdout."""
    archive = _one_device(tmp_path, f"d\x1b[2J\n{FORGED}")
    proc = subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "verify", "--checksums", str(archive)],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    digest = "076a27c79e5ace2a3d47f9dd2e83e4ff6ea8872b3c2218f66c92b89b55f36560"  # sha256 of 512 zero bytes
    assert proc.stdout.decode() == f"{digest}  d\\x1b[2J\\n{FORGED}\n"
    proc = subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "vma", "list", str(archive)],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines()[1:3] == [
        f"CFG: size: 0 name: x\\n{FORGED}", f"DEV: dev_id=1 size: 512 devname: d\\x1b[2J\\n{FORGED}"]
