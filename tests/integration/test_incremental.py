"""Dirty-bitmap incremental runs that still write complete VMAs (issue 8), on real QEMU.

Each test keeps a model of the disks (the first archive's extracted images, with every
guest write the test makes applied in Python) and checks each new archive against the
model as it was when that run's jobs started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backup import (
    BackupRun,
    Monitor,
    dir_fleecing_storage,
    extract,
    images_equal,
    make_image,
    monitor_args,
    next_second,
    random_fill,
)
from tests.support.qemu import DriveSpec, QemuBinaries

pytestmark = pytest.mark.qemu

MiB = 1 << 20
C = 65536
VMID = "100"


@pytest.fixture
def mon_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qbi-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _drive(path: Path, key: str, fmt: str) -> DriveSpec:
    return DriveSpec(path, bus="scsi", fmt=fmt, style="blockdev", dev_id=key, drive_id=f"drive-{key}",
                     node_name=f"drive-{key}")


class Model:
    """The guest-visible content of each drive, as the test changed it."""

    def __init__(self, disks: dict[str, bytes]) -> None:
        self.disks = {key: bytearray(data) for key, data in disks.items()}

    def write(self, mon: Monitor, key: str, offset: int, length: int, pattern: int | None) -> None:
        """``pattern`` None writes zeroes (``write -z``)."""
        command = f"write -z {offset} {length}" if pattern is None else f"write -P {pattern} {offset} {length}"
        mon.qemu_io(key, command)
        self.disks[key][offset:offset + length] = bytes([pattern or 0]) * length

    def copy(self) -> dict[str, bytes]:
        return {k: bytes(v) for k, v in self.disks.items()}


class Session:
    """One VM's backups: runs the CLI, finds the new archive, extracts it."""

    def __init__(self, tmp: Path, qmp: Path, qemu_img: Path) -> None:
        self.qemu_img = qemu_img
        self.tmp = tmp
        self.run_ = BackupRun(tmp)
        self.qmp = qmp
        self.count = 0

    def backup(self, *args: str, ok: bool = True) -> tuple[dict[str, Any], str, Path | None]:
        before = set(self.run_.archives())
        next_second()
        r = self.run_.run(VMID, "--qmp", str(self.qmp), "--output-format", "json", *args)
        assert (r.returncode == 0) == ok, r.stderr
        assert "Traceback" not in r.stderr
        [result] = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        new = sorted(set(self.run_.archives()) - before)
        return result, r.stderr, (new[0] if new else None)

    def contents(self, archive: Path, images: dict[str, tuple[Path, str]] | None = None) -> dict[str, bytes]:
        """The archive's disks; with ``images``, each is first checked against its image file."""
        self.count += 1
        out = extract(archive, self.tmp / f"x{self.count}")
        for key, (image, fmt) in (images or {}).items():
            assert images_equal(self.qemu_img, out[f"drive-{key}"], image, fmt), key
        return {dev.removeprefix("drive-"): path.read_bytes() for dev, path in out.items()}


def _wait_jobs(mon: Monitor, proc: subprocess.Popen[str], count: int) -> None:
    """Until ``count`` jobs run; a backup that ended first fails the test with its log."""
    try:
        mon.wait_jobs(count)
    except TimeoutError:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"{count} jobs did not start:\n{err}") from None


def _our_bitmaps(mon: Monitor) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for node in mon.cmd("query-named-block-nodes", flat=True):
        for bm in node.get("dirty-bitmaps") or ():
            if str(bm.get("name", "")).startswith("qmpbackup-"):
                found.setdefault(node["node-name"], []).append(bm)
    return found


def _quit(mon: Monitor) -> None:
    """A clean QEMU exit; the socket may close before (or while) the reply arrives."""
    with contextlib.suppress(EOFError):
        mon.cmd("quit")


def _close(mon: Monitor) -> None:
    with contextlib.suppress(EOFError):
        mon.close()


def _full_read_line(log: str, reason: str) -> None:
    lines = [ln for ln in log.splitlines() if "dirty-bitmap: full read" in ln]
    assert any(reason in ln for ln in lines), log
    assert "Traceback" not in log


@pytest.mark.spread_over_qemu("compress")  # the compress does not meet QEMU: one version each
@pytest.mark.parametrize("compress", ["0", "zstd"])
def test_incremental_is_the_disks_at_job_start(qemu: QemuBinaries, qemu_vm, tmp_path: Path, mon_dir: Path,
                                               compress: str) -> None:
    a_size = 8 * MiB + 4608  # a short last cluster
    a = make_image(qemu.img, qemu.io, tmp_path / "a.raw", "raw", a_size)
    random_fill(a, 0, a_size)
    b = make_image(qemu.img, qemu.io, tmp_path / "b.qcow2", "qcow2", 16 * MiB,
                   [(0x11, 0, 4 * MiB), (0x22, 10 * MiB, MiB)])
    vm = qemu_vm([_drive(a, "scsi0", "raw"), _drive(b, "scsi1", "qcow2")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    s = Session(tmp_path, vm.qmp_path, qemu.img)
    try:
        result, log, first = s.backup("--compress", compress)
        assert first is not None and result["bytes_reused"] == 0
        _full_read_line(log, "no previous archive")
        model = Model(s.contents(first, {"scsi0": (a, "raw"), "scsi1": (b, "qcow2")}))
        bitmaps = _our_bitmaps(mon)
        assert [bm["persistent"] for bm in bitmaps["drive-scsi1"]] == [True], "qcow2: persistent"
        assert [bm["persistent"] for bm in bitmaps["drive-scsi0"]] == [False], "raw: in memory"

        # Changes between the runs: unaligned, whole clusters, zeroes, the short last cluster.
        model.write(mon, "scsi0", 4096 + 512, 4096, 0x33)
        model.write(mon, "scsi0", 3 * MiB, MiB, 0x44)
        model.write(mon, "scsi0", a_size - 1024, 1024, 0x55)
        model.write(mon, "scsi1", 0, 2 * MiB, None)
        model.write(mon, "scsi1", 12 * MiB + 7, 100, 0x66)
        changed_max = 4 * 65536 + 2 * MiB + 65536 + 65536 + MiB  # whole clusters around each write
        at_start = model.copy()

        # A slow job, so guest writes land while it runs (into changed and unchanged areas).
        next_second()
        proc = s.run_.start(VMID, "--qmp", str(vm.qmp_path), "--output-format", "json",
                            "--compress", compress, "--bwlimit", "1024")
        try:
            _wait_jobs(mon, proc, 2)
            model.write(mon, "scsi0", 3 * MiB + 512 * 1024, 4096, 0x77)  # dirty, maybe not copied yet
            model.write(mon, "scsi0", 6 * MiB, MiB, 0x78)  # clean: from the previous archive
            model.write(mon, "scsi1", MiB, 4096, 0x79)
            out, log = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, log
        [result] = [json.loads(line) for line in out.splitlines() if line.strip()]
        second = Path(result["archive"])
        assert "scsi0: dirty-bitmap status: OK" in log and "scsi1: dirty-bitmap status: OK" in log
        assert "dirty-bitmap: full read" not in log
        assert "scsi0: dirty-bitmap:" in log and "taken from the previous archive" in log
        assert result["bytes_read"] <= changed_max, result
        assert result["bytes_reused"] == a_size + 16 * MiB - result["bytes_read"]
        assert s.contents(second) == at_start, "the incremental archive is the disks at its job start"
        [left] = _our_bitmaps(mon)["drive-scsi0"]
        assert left["name"].endswith(_uuid_hex(second)), "only the new archive's bitmap is left"

        # The chain goes on: the writes made during the second job are in the third archive.
        result, log, third = s.backup("--compress", compress)
        assert third is not None and "dirty-bitmap: full read" not in log
        assert s.contents(third) == model.copy()
        assert all(len(v) == 1 for v in _our_bitmaps(mon).values())
    finally:
        mon.close()


def _uuid_hex(archive: Path) -> str:
    from qmpbackup.vma import VmaReader
    from qmpbackup.vma.archive_io import open_archive

    with open_archive(str(archive), read_to_end=False) as src:
        return VmaReader(src).uuid.hex


def test_every_doubt_falls_back_to_a_full_read(qemu: QemuBinaries, qemu_vm, tmp_path: Path,
                                               mon_dir: Path) -> None:
    size = 4 * MiB
    a = make_image(qemu.img, qemu.io, tmp_path / "a.raw", "raw", size)
    random_fill(a, 0, size)
    vm = qemu_vm([_drive(a, "scsi0", "raw")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    s = Session(tmp_path, vm.qmp_path, qemu.img)
    try:
        result, log, arch = s.backup("--dirty-bitmap", "0")
        _full_read_line(log, "dirty-bitmap disabled")
        assert _our_bitmaps(mon) == {} and arch is not None
        model = Model(s.contents(arch, {"scsi0": (a, "raw")}))

        model.write(mon, "scsi0", 0, 65536, 0x01)
        result, log, arch = s.backup()
        _full_read_line(log, "bitmap missing")
        assert result["bytes_read"] == size and arch is not None and s.contents(arch) == model.copy()

        model.write(mon, "scsi0", MiB, 65536, 0x02)
        result, log, good = s.backup()
        assert "scsi0: dirty-bitmap status: OK" in log and result["bytes_read"] == 65536
        assert good is not None and s.contents(good) == model.copy()

        # Damaged during the merge (truncated): this run starts over and reads everything.
        raw = good.read_bytes()
        good.write_bytes(raw[: len(raw) - 70000])
        model.write(mon, "scsi0", 2 * MiB, 65536, 0x03)
        result, log, arch = s.backup()
        assert "is damaged or unreadable" in log and ": reading the whole disk" in log
        _full_read_line(log, "reading the whole disk")
        assert result["bytes_read"] == size
        assert arch is not None and s.contents(arch) == model.copy()
        assert not s.run_.leftovers()
        result, log, arch = s.backup()
        assert "scsi0: dirty-bitmap status: OK" in log
        assert arch is not None and s.contents(arch) == model.copy()

        # A header nobody can read.
        junk = s.run_.dumpdir / "vzdump-qemu-100-2099_01_01-00_00_00.vma"
        junk.write_bytes(b"not a vma" * 100)
        model.write(mon, "scsi0", 3 * MiB, 65536, 0x04)
        result, log, arch = s.backup()
        _full_read_line(log, "damaged or unreadable")
        assert arch is not None and s.contents(arch) == model.copy()
        junk.unlink()

        # Resized: the bitmap and the archive no longer describe the drive.
        result, log, arch = s.backup()
        assert "scsi0: dirty-bitmap status: OK" in log
        mon.cmd("block_resize", **{"node-name": "drive-scsi0", "size": size + MiB})
        model.disks["scsi0"] += bytes(MiB)
        result, log, arch = s.backup()
        _full_read_line(log, "drive resized")
        assert arch is not None and s.contents(arch) == model.copy()
        assert len(_our_bitmaps(mon)["drive-scsi0"]) == 1
    finally:
        mon.close()


@pytest.mark.spread_over_qemu("compress")  # the compress does not meet QEMU: one version each
@pytest.mark.parametrize("compress", ["0", "zstd"])
def test_damaged_cluster_of_previous_archive_is_not_propagated(qemu: QemuBinaries, qemu_vm, tmp_path: Path,
                                                               mon_dir: Path, compress: str) -> None:
    """Issue 12's reproduction: 64 bytes overwritten inside an archive pass every format rule; verify
    fails on them, and the next incremental run does not copy them but reads the disk in full."""
    from qmpbackup.vma.index import ArchiveIndex

    size = 4 * MiB
    a = make_image(qemu.img, qemu.io, tmp_path / "a.raw", "raw", size)
    random_fill(a, 0, size)
    vm = qemu_vm([_drive(a, "scsi0", "raw")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    s = Session(tmp_path, vm.qmp_path, qemu.img)
    try:
        _, log, first = s.backup("--compress", compress)
        assert first is not None
        model = Model(s.contents(first, {"scsi0": (a, "raw")}))
        with ArchiveIndex.open(first) as index:
            dev = index.devices[0]
            record = index.record(dev, 30)
        if compress == "0":
            with first.open("r+b") as f:
                f.seek(record.data_offset + 1000)
                f.write(b"\x5a" * 64)
        else:  # damage the plain bytes and compress the frame again: every zstd check still passes
            import zstandard
            with ArchiveIndex.open(first) as index:
                n = index.frame_at(record.data_offset)
                (c0, p0), (c1, _p1) = index.frame(n), index.frame(n + 1)
            raw = first.read_bytes()
            plain = bytearray(zstandard.ZstdDecompressor().decompress(raw[c0:c1]))
            plain[record.data_offset - p0 + 1000:record.data_offset - p0 + 1064] = b"\x5a" * 64
            first.write_bytes(raw[:c0] + zstandard.ZstdCompressor(write_checksum=True).compress(bytes(plain))
                              + raw[c1:])
        verify = subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "verify", str(first)],
                                capture_output=True, text=True, timeout=300, check=False)
        assert verify.returncode == 1
        assert f"data checksum mismatch in drive-scsi0 cluster 30 (byte offset {record.data_offset})" in verify.stderr

        model.write(mon, "scsi0", MiB, 65536, 0x07)
        result, log, arch = s.backup("--compress", compress)
        assert "damaged at drive-scsi0 cluster 30: reading the whole disk" in log, log
        assert result["bytes_read"] == size
        assert arch is not None and s.contents(arch) == model.copy()
        assert not s.run_.leftovers()
    finally:
        mon.close()


def test_persistent_bitmap_survives_restart_and_new_drive_is_read_fully(
        qemu: QemuBinaries, qemu_vm, tmp_path: Path, mon_dir: Path) -> None:
    b = make_image(qemu.img, qemu.io, tmp_path / "b.qcow2", "qcow2", 8 * MiB, [(0x31, 0, 3 * MiB)])
    vm = qemu_vm([_drive(b, "scsi0", "qcow2")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    s = Session(tmp_path, vm.qmp_path, qemu.img)
    try:
        _, log, first = s.backup("--compress", "zstd")
        assert first is not None
        model = Model(s.contents(first, {"scsi0": (b, "qcow2")}))
        model.write(mon, "scsi0", 5 * MiB, 65536, 0x41)
        _quit(mon)  # a clean exit stores the persistent bitmap in the image
    finally:
        _close(mon)
    vm.proc.wait(timeout=30)

    c = make_image(qemu.img, qemu.io, tmp_path / "c.raw", "raw", 2 * MiB, [(0x51, 0, MiB)])
    mon_dir2 = Path(tempfile.mkdtemp(prefix="qbj-", dir="/tmp"))
    try:
        vm2 = qemu_vm([_drive(b, "scsi0", "qcow2"), _drive(c, "scsi1", "raw")],
                      extra_args=monitor_args(mon_dir2), name="vm2")
        mon = Monitor(mon_dir2 / "monitor.sock")
        s.qmp = vm2.qmp_path
        try:
            model.disks["scsi1"] = bytearray(c.read_bytes())  # raw: the file is the disk
            model.write(mon, "scsi0", 6 * MiB, 4096, 0x42)
            result, log, second = s.backup("--compress", "zstd")
            assert "scsi0: dirty-bitmap status: OK" in log, log
            _full_read_line(log, "drive added")
            assert result["bytes_read"] == 2 * 65536 + 2 * MiB
            assert second is not None and s.contents(second) == model.copy()
            _quit(mon)
        finally:
            _close(mon)
        vm2.proc.wait(timeout=30)
        # A crash while the stored bitmap is loaded: QEMU marked it in use in the image.
        vm3 = qemu_vm([_drive(b, "scsi0", "qcow2"), _drive(c, "scsi1", "raw")],
                      extra_args=monitor_args(mon_dir2), name="vm3")
        mon = Monitor(mon_dir2 / "monitor.sock")
        try:
            model.write(mon, "scsi0", MiB, 4096, 0x43)  # allocated already: no qcow2 metadata to lose
        finally:
            _close(mon)
        os.kill(vm3.proc.pid, 9)
        vm3.proc.wait(timeout=30)
        vm3 = qemu_vm([_drive(b, "scsi0", "qcow2"), _drive(c, "scsi1", "raw")],
                      extra_args=monitor_args(mon_dir2), name="vm4")
        s.qmp = vm3.qmp_path
        mon = Monitor(mon_dir2 / "monitor.sock")
        try:
            result, log, third = s.backup("--compress", "zstd")
            _full_read_line(log, "inconsistent")
            assert third is not None and s.contents(third) == model.copy()
            assert not any(bm.get("inconsistent") for bms in _our_bitmaps(mon).values() for bm in bms)
        finally:
            _close(mon)
    finally:
        shutil.rmtree(mon_dir2, ignore_errors=True)


def test_stopped_vm_backs_up_incrementally_through_the_stored_bitmap(qemu: QemuBinaries, tmp_path: Path,
                                                                     isolated_config: Path) -> None:
    """Stop mode: each run spawns QEMU; the qcow2 keeps the bitmap between runs (QEMU tools track writes)."""
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.qcow2", "qcow2", 6 * MiB, [(0x71, 0, 3 * MiB)])
    guests = isolated_config / "guests"
    guests.mkdir()
    (guests / "150.conf").write_text(
        f"name: stopped-vm\nmemory: 64\nscsi0: {disk},format=qcow2\n\n[qmpbackup]\nqemu: {qemu.system}\n"
        f"qmp: {tmp_path / 'nonexistent.qmp'}\n")
    run = BackupRun(tmp_path)
    r = run.run("150", "--output-format", "json")
    assert r.returncode == 0, r.stderr
    subprocess.run([str(qemu.io), "-f", "qcow2", "-c", "write -P 0x72 4M 64k", str(disk)], check=True,
                   capture_output=True, timeout=60)
    next_second()
    r = run.run("150", "--output-format", "json")
    assert r.returncode == 0, r.stderr
    assert "scsi0: dirty-bitmap status: OK" in r.stderr, r.stderr
    [result] = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert result["bytes_read"] == 65536 and result["bytes_reused"] == 6 * MiB - 65536
    out = extract(Path(result["archive"]), tmp_path / "x")
    assert images_equal(qemu.img, out["drive-scsi0"], disk, "qcow2")


def test_incremental_with_fleecing(qemu: QemuBinaries, qemu_vm, tmp_path: Path, mon_dir: Path,
                                   isolated_config: Path) -> None:
    """Fleecing: the job reads the snapshot through a frozen copy of the base bitmap."""
    fleece_dir = dir_fleecing_storage(isolated_config, tmp_path / "fleece")
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.qcow2", "qcow2", 16 * MiB, [(0x61, 0, 12 * MiB)])
    vm = qemu_vm([_drive(disk, "scsi0", "qcow2")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    s = Session(tmp_path, vm.qmp_path, qemu.img)
    fleecing = ("--fleecing", "enabled=1,storage=fast", "--compress", "zstd")
    try:
        nodes_before = mon.node_names()
        _, log, first = s.backup(*fleecing)
        assert first is not None and "attaching fleecing image" in log
        model = Model(s.contents(first, {"scsi0": (disk, "qcow2")}))
        model.write(mon, "scsi0", 2 * MiB, 3 * C, 0x62)
        model.write(mon, "scsi0", 14 * MiB + 100, 200, 0x63)
        at_start = model.copy()
        next_second()
        proc = s.run_.start(VMID, "--qmp", str(vm.qmp_path), "--output-format", "json", *fleecing,
                            "--bwlimit", "256")
        try:
            _wait_jobs(mon, proc, 1)
            model.write(mon, "scsi0", 2 * MiB + C, 4096, 0x64)  # changed area, maybe not copied yet
            model.write(mon, "scsi0", 8 * MiB, MiB, 0x65)  # unchanged area
            out, log = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, log
        assert "scsi0: dirty-bitmap status: OK" in log and "attaching fleecing image" in log
        [result] = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert result["bytes_read"] == 4 * C
        assert s.contents(Path(result["archive"])) == at_start
        assert mon.node_names() == nodes_before, "our nodes are gone"
        assert [len(v) for v in _our_bitmaps(mon).values()] == [1]
        assert not [p for p in fleece_dir.rglob("*") if p.is_file()], "no fleecing image left"
        _, log, third = s.backup(*fleecing)
        assert third is not None and "scsi0: dirty-bitmap status: OK" in log
        assert s.contents(third) == model.copy()
    finally:
        mon.close()
