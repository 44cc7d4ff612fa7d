"""End-to-end ``qmpbackup backup`` against real QEMU processes (each available version).

Each test starts QEMU with a second QMP monitor for itself, runs our CLI as a
real process, and checks the archive by extracting it and comparing with
``qemu-img compare``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpbackup.store.names import temp_name
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
    result_lines,
    terminate,
)
from tests.support.qemu import DriveSpec, QemuBinaries

pytestmark = pytest.mark.qemu

MiB = 1 << 20
#: What QEMU says of a backup target that cannot tell its cluster size (a bare NBD node).
BLOCK_SIZE_WARNING = "doesn't provide information about the block size"


@pytest.fixture
def mon_dir() -> Iterator[Path]:
    """A short folder for the test's own monitor socket (unix socket paths are short)."""
    path = Path(tempfile.mkdtemp(prefix="qbm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _drive(path: Path, key: str, bus: str, fmt: str, style: str) -> DriveSpec:
    return DriveSpec(path, bus=bus, fmt=fmt, style=style, dev_id=key,  # type: ignore[arg-type]
                     drive_id=f"drive-{key}", node_name=f"drive-{key}")


def _snapshot(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir()
    copies = []
    for p in paths:
        target = folder / p.name
        subprocess.run(["cp", "--sparse=always", str(p), str(target)], check=True)
        copies.append(target)
    return copies


@pytest.mark.parametrize("style", ["drive", "blockdev"])
def test_point_in_time_three_disks(qemu: QemuBinaries, qemu_vm, tmp_path: Path, mon_dir: Path,
                                   style: str) -> None:
    disks = tmp_path / "disks"
    disks.mkdir()
    size0 = 24 * MiB + 4608  # not a multiple of 64 KiB
    a = make_image(qemu.img, qemu.io, disks / "a.raw", "raw", size0)
    random_fill(a, 0, size0)  # full disk
    b = make_image(qemu.img, qemu.io, disks / "b.qcow2", "qcow2", 40 * MiB,
                   [(0xAA, 0, MiB), (0x55, 30 * MiB, 65536)])  # sparse
    c = make_image(qemu.img, qemu.io, disks / "c.raw", "raw", 16 * MiB, [(0x11, 4 * MiB, 4 * MiB)])
    before = _snapshot([a, b, c], tmp_path / "before")
    vm = qemu_vm([_drive(a, "scsi0", "scsi", "raw", style), _drive(b, "virtio1", "virtio", "qcow2", style),
                  _drive(c, "sata0", "sata", "raw", style)], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    nodes_before = mon.node_names()
    run = BackupRun(tmp_path)
    proc = run.start("100", "--qmp", str(vm.qmp_path), "--bwlimit", "20480", "--output-format", "json")
    try:
        mon.wait_jobs(3)
        # Guest writes during the job, into areas not copied yet and at the start.
        mon.qemu_io("scsi0", f"write -P 0xcc {size0 - 2 * MiB} 1M")
        mon.qemu_io("scsi0", "write -P 0xcd 0 4k")
        mon.qemu_io("/machine/peripheral/virtio1/virtio-backend", "write -P 0xdd 35M 2M")
        mon.qemu_io("/machine/peripheral/virtio1/virtio-backend", "write -z 0 1M")
        mon.qemu_io("sata0", "write -P 0xee 12M 512k")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert mon.node_names() == nodes_before, "our nodes are gone again"
        # Our qcow2 target (data file: our NBD export) tells block-copy its cluster size.
        assert BLOCK_SIZE_WARNING not in vm.stderr(), vm.stderr()
        assert mon.cmd("query-block-jobs") == []
    finally:
        if proc.poll() is None:
            proc.kill()
        mon.close()
    [result] = result_lines(out)
    assert result["status"] == "ok" and result["vmid"] == 100
    [archive] = run.archives()
    assert result["archive"] == str(archive) and archive.name.endswith(".vma")
    extracted = extract(archive, tmp_path / "x")
    for dev, image, fmt in (("drive-scsi0", before[0], "raw"), ("drive-virtio1", before[1], "qcow2"),
                            ("drive-sata0", before[2], "raw")):
        assert images_equal(qemu.img, extracted[dev], image, fmt), f"{dev} is not the disk at job start"
    assert not images_equal(qemu.img, extracted["drive-scsi0"], a, "raw"), "the guest writes happened"
    log = archive.with_name(archive.name.removesuffix(".vma") + ".log").read_text()
    assert "INFO: include disk 'sata0'" in log and "bandwidth limit: 20480 KiB/s" in log


@pytest.mark.spread_over_qemu("compress")  # the compress does not meet QEMU: one version each
@pytest.mark.parametrize("compress", ["0", "zstd", "gzip", "lzo"])
def test_compression_and_archive_contents(qemu: QemuBinaries, qemu_vm, tmp_path: Path, compress: str) -> None:
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.qcow2", "qcow2", 8 * MiB + 512,
                      [(0x42, 65536, 3 * MiB)])
    vm = qemu_vm([_drive(disk, "virtio0", "virtio", "qcow2", "drive")])
    run = BackupRun(tmp_path)
    r = run.run("123", "--qmp", str(vm.qmp_path), "--compress", compress, "--notes-template",
                "{{guestname}} on {{node}}\\nvmid {{vmid}}")
    assert r.returncode == 0, r.stderr
    [archive] = run.archives()
    ext = {"0": ".vma", "zstd": ".vma.zst", "gzip": ".vma.gz", "lzo": ".vma.lzo"}[compress]
    assert archive.name.startswith("vzdump-qemu-123-") and archive.name.endswith(ext)
    assert not run.leftovers()
    verify = subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "vma", "verify", str(archive)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    config = subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "vma", "config", str(archive)],
                            capture_output=True, text=True, timeout=60).stdout
    assert "#qmdump#map:virtio0:drive-virtio0::qcow2:" in config
    notes = Path(str(archive) + ".notes").read_text()
    assert notes.endswith("\nvmid 123")
    extracted = extract(archive, tmp_path / "x")
    assert images_equal(qemu.img, extracted["drive-virtio0"], disk, "qcow2")


def test_suspend_mode_resumes_running_vm_and_keeps_paused_vm_paused(qemu: QemuBinaries, qemu_vm, tmp_path: Path,
                                                                     mon_dir: Path) -> None:
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.raw", "raw", 4 * MiB, [(0x42, 0, MiB)])
    vm = qemu_vm([_drive(disk, "scsi0", "scsi", "raw", "drive")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    try:
        run = BackupRun(tmp_path)
        r = run.run("100", "--qmp", str(vm.qmp_path), "--mode", "suspend")
        assert r.returncode == 0, r.stderr
        assert mon.cmd("query-status")["status"] == "prelaunch", "a VM the user had paused stays paused"
        assert "suspending guest" not in r.stderr
        mon.cmd("cont")
        next_second()
        r = run.run("100", "--qmp", str(vm.qmp_path), "--mode", "suspend")
        assert r.returncode == 0, r.stderr
        assert "INFO: suspending guest" in r.stderr and "resuming VM again after" in r.stderr
        assert mon.cmd("query-status")["status"] == "running"
        assert len(run.archives()) >= 1
    finally:
        mon.close()


def test_stopped_vm_is_spawned_paused_and_stopped_again(qemu: QemuBinaries, tmp_path: Path,
                                                          isolated_config: Path) -> None:
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.qcow2", "qcow2", 6 * MiB, [(0x77, 2 * MiB, MiB)])
    guests = isolated_config / "guests"
    guests.mkdir()
    (guests / "150.conf").write_text(
        f"name: stopped-vm\nmemory: 64\nscsi0: {disk},format=qcow2\n\n[qmpbackup]\nqemu: {qemu.system}\n"
        f"qmp: {tmp_path / 'nonexistent.qmp'}\n")
    run = BackupRun(tmp_path)
    r = run.run("150")
    assert r.returncode == 0, r.stderr
    assert "INFO: status = stopped" in r.stderr and "backup mode: stop" in r.stderr
    [archive] = run.archives()
    assert images_equal(qemu.img, extract(archive, tmp_path / "x")["drive-scsi0"], disk, "qcow2")
    leftover = subprocess.run(["pgrep", "-f", str(disk)], capture_output=True, text=True)
    assert leftover.stdout == "", "the spawned QEMU is gone"


@pytest.mark.spread_over_qemu("compress")  # the compress does not meet QEMU: one version each
@pytest.mark.parametrize("compress", ["0", "zstd"])
def test_full_dump_dir_fails_cleanly(qemu: QemuBinaries, qemu_vm, tmp_path: Path, mon_dir: Path,
                                     compress: str) -> None:
    """The dump folder is a 2 MiB tmpfs; 8 MiB of random data cannot fit: one ERROR line naming
    the dump file, exit 1, nothing left (no .dat, no journal, no nodes, no jobs)."""
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.raw", "raw", 8 * MiB)
    random_fill(disk, 0, 8 * MiB)
    vm = qemu_vm([_drive(disk, "scsi0", "scsi", "raw", "drive")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    run = BackupRun(tmp_path)
    run.dumpdir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(run.dumpdir)], check=True)
    try:
        nodes_before = mon.node_names()
        r = run.run("100", "--qmp", str(vm.qmp_path), "--compress", compress)
        assert r.returncode == 1, r.stderr
        errors = [line for line in r.stderr.splitlines() if "ERROR" in line]
        archive = run.dumpdir / next(run.dumpdir.glob("*.log")).name.replace(
            ".log", ".vma.zst" if compress == "zstd" else ".vma")
        assert errors == [f"ERROR: Backup of VM 100 failed - {temp_name(archive)}: No space left on device"], r.stderr
        assert "Traceback" not in r.stderr and "WARN" not in r.stderr, r.stderr
        assert not run.leftovers() and not run.archives()
        assert not (tmp_path / "state" / "journal" / "100.jsonl").exists()
        assert mon.node_names() == nodes_before
        assert mon.cmd("query-block-jobs") == []
    finally:
        mon.close()
        subprocess.run(["umount", str(run.dumpdir)], check=False)


def test_sigterm_during_job_cleans_up(qemu: QemuBinaries, qemu_vm, tmp_path: Path, mon_dir: Path) -> None:
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.raw", "raw", 32 * MiB, [(0x42, 0, 32 * MiB)])
    vm = qemu_vm([_drive(disk, "scsi0", "scsi", "raw", "drive")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    try:
        nodes_before = mon.node_names()
        run = BackupRun(tmp_path)
        proc = run.start("100", "--qmp", str(vm.qmp_path), "--bwlimit", "2048")
        mon.wait_jobs(1)
        code, err = terminate(proc, signal.SIGTERM)
        assert code == 128 + signal.SIGTERM, err
        assert "interrupted by signal" in err
        assert not run.leftovers() and not run.archives()
        assert mon.node_names() == nodes_before
        assert mon.cmd("query-block-jobs") == []
        assert not list((tmp_path / "state" / "journal").glob("*.jsonl"))
    finally:
        mon.close()


def test_qemu_killed_during_job_fails_cleanly(qemu: QemuBinaries, qemu_vm, tmp_path: Path, mon_dir: Path) -> None:
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.raw", "raw", 32 * MiB, [(0x42, 0, 32 * MiB)])
    vm = qemu_vm([_drive(disk, "scsi0", "scsi", "raw", "drive")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    run = BackupRun(tmp_path)
    proc = run.start("100", "--qmp", str(vm.qmp_path), "--bwlimit", "2048")
    try:
        mon.wait_jobs(1)
        mon.close()
        time.sleep(0.2)
        vm.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "ERROR: Backup of VM 100 failed" in err and "Traceback" not in err
    assert not run.leftovers() and not run.archives()


def test_hook_script_phases_and_environment(qemu: QemuBinaries, qemu_vm, tmp_path: Path) -> None:
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.raw", "raw", 2 * MiB, [(0x42, 0, MiB)])
    vm = qemu_vm([_drive(disk, "scsi0", "scsi", "raw", "drive")])
    record = tmp_path / "phases.txt"
    script = tmp_path / "hook.sh"
    script.write_text(f'#!/bin/sh\necho "$* TARGET=$TARGET DUMPDIR=$DUMPDIR" >> {record}\necho "hook says $1"\n')
    script.chmod(0o755)
    run = BackupRun(tmp_path)
    r = run.run("100", "--qmp", str(vm.qmp_path), "--script", str(script))
    assert r.returncode == 0, r.stderr
    lines = record.read_text().splitlines()
    phases = [line.split()[0] for line in lines]
    assert phases == ["job-init", "job-start", "backup-start", "pre-stop", "pre-restart", "post-restart",
                      "backup-end", "log-end", "job-end"]
    [archive] = run.archives()
    assert f"backup-end snapshot 100 TARGET={archive} DUMPDIR={run.dumpdir}" in lines
    assert "INFO: hook says backup-start" in r.stderr

    failing = tmp_path / "fail.sh"
    failing.write_text('#!/bin/sh\n[ "$1" = backup-start ] && exit 3\nexit 0\n')
    failing.chmod(0o755)
    next_second()
    r = run.run("100", "--qmp", str(vm.qmp_path), "--script", str(failing))
    assert r.returncode == 1 and "backup-start" in r.stderr
    assert len(run.archives()) == 1


def test_fleecing_point_in_time_and_nothing_left(qemu: QemuBinaries, qemu_vm, tmp_path: Path, mon_dir: Path,
                                                 isolated_config: Path) -> None:
    """Fleecing on a dir storage: the guest's old data goes to a fleecing image, not to the target."""
    fleece_dir = dir_fleecing_storage(isolated_config, tmp_path / "fleece")
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.qcow2", "qcow2", 24 * MiB, [(0x42, 0, 24 * MiB)])
    [before] = _snapshot([disk], tmp_path / "before")
    vm = qemu_vm([_drive(disk, "scsi0", "scsi", "qcow2", "drive")], extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    nodes_before = mon.node_names()
    run = BackupRun(tmp_path)
    proc = run.start("100", "--qmp", str(vm.qmp_path), "--fleecing", "enabled=1,storage=fast",
                     "--bwlimit", "8192", "--compress", "zstd")
    try:
        mon.wait_jobs(1)
        assert any(p.name.startswith("vm-100-fleece-") for p in fleece_dir.rglob("*")), "a fleecing image"
        mon.qemu_io("scsi0", "write -P 0xcc 20M 2M")
        mon.qemu_io("scsi0", "write -P 0xcd 0 64k")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "attaching fleecing image" in err
        assert mon.node_names() == nodes_before, "the device is back on its own node, our nodes are gone"
        assert mon.cmd("query-block-jobs") == []
    finally:
        if proc.poll() is None:
            proc.kill()
        mon.close()
    assert not [p for p in fleece_dir.rglob("*") if p.is_file()], "no fleecing image left"
    [archive] = run.archives()
    assert images_equal(qemu.img, extract(archive, tmp_path / "x")["drive-scsi0"], before, "qcow2")


def test_retention_limit_and_status_mail(qemu: QemuBinaries, qemu_vm, tmp_path: Path) -> None:
    """remove=0 refuses a backup over the retention; mailto hands a status mail to sendmail."""
    import os

    disk = make_image(qemu.img, qemu.io, tmp_path / "d.raw", "raw", 2 * MiB, [(0x42, 0, MiB)])
    vm = qemu_vm([_drive(disk, "scsi0", "scsi", "raw", "drive")])
    bindir = tmp_path / "bin"
    bindir.mkdir()
    mailbox = tmp_path / "mail.txt"
    (bindir / "sendmail").write_text(f"#!/bin/sh\necho \"ARGS: $*\" > {mailbox}\ncat >> {mailbox}\n")
    (bindir / "sendmail").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    run = BackupRun(tmp_path)
    r = run.run("100", "--qmp", str(vm.qmp_path), "--mailto", "admin@example.org", env=env)
    assert r.returncode == 0, r.stderr
    mail = mailbox.read_text()
    assert "admin@example.org" in mail and "100" in mail
    next_second()
    r = run.run("100", "--qmp", str(vm.qmp_path), "--remove", "0", "--prune-backups", "keep-last=1")
    assert r.returncode == 1 and "max backup limit of 1" in r.stderr, r.stderr
    assert len(run.archives()) == 1
