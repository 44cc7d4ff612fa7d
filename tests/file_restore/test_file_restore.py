"""file-restore end to end: a real archive, our export, the real helper VM (TCG), the real CLI.

One helper daemon serves the module's archive (booting it takes a few seconds under TCG), so
the follow-up calls also show that the helper stays up between calls.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpbackup.cli.main import main
from tests.file_restore.disks import Part, make_disk, make_lvm_disk

pytestmark = pytest.mark.qemu

HOSTNAME = b"helper-host\n"
BIG = os.urandom(3 << 20) + b"tail"
VG = f"qbt{os.getpid()}"  # volume group names are host-wide: unique per test run


def _host_mounts_of(workdir: Path) -> set[str]:
    """The host's mounts that could be this module's: of or under ``workdir``, or of an NBD device.

    (Other tests, and other test runs on a shared machine, mount and unmount their own at any time.)
    """
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET,SOURCE"], capture_output=True, text=True,
                         check=False).stdout
    loops = subprocess.run(["losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list"],
                           capture_output=True, text=True, check=False).stdout
    ours = {line.split()[0] for line in loops.splitlines() if str(workdir) in line}
    return {line for line in out.splitlines()
            if str(workdir) in line or "/dev/nbd" in line or any(dev in line.split() for dev in ours)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("file-restore")


@pytest.fixture(scope="module")
def archive(workdir: Path) -> Path:
    """Two drives: GPT with ext4 + xfs + a corrupt ext4 + a blank partition; an ext4 whole disk."""
    if os.geteuid() != 0:
        pytest.skip("making the test file systems needs loop mounts (root)")
    disk0 = workdir / "disk0.raw"
    make_disk(disk0, [
        Part(64, "ext4", files={"etc/hostname": HOSTNAME, "data/big.bin": BIG, "data/sub/note.txt": b"note\n"},
             symlinks={"etc/link": "hostname", "data/sub/up": "../big.bin"},
             modes={"etc/hostname": 0o640, "data/sub/note.txt": 0o600}),
        Part(300, "xfs", files={"x.txt": b"xfsdata\n"}),
        Part(16, "corrupt-ext4"),
        Part(8, None),
    ])
    disk1 = workdir / "disk1.raw"
    from tests.file_restore.disks import make_fs
    make_fs(disk1, Part(33, "ext4", files={"hello.txt": b"whole disk\n"}))
    disk2 = workdir / "disk2.raw"
    make_lvm_disk(disk2, VG, Part(32, "ext4", files={"lvm.txt": b"inside an LV\n"}))
    conf = workdir / "qemu-server.conf"
    conf.write_text(f"name: fr\nscsi0: x:0,size={disk0.stat().st_size}\nvirtio1: x:1,size={disk1.stat().st_size}\n"
                    f"virtio2: x:2,size={disk2.stat().st_size}\n")
    out = workdir / "vzdump-qemu-100-2026_12_04-10_00_00.vma.zst"
    assert main(["vma", "create", str(out), "-c", str(conf), "--compress", "zstd",
                 "-d", f"format=raw:drive-scsi0={disk0}", "-d", f"format=raw:drive-virtio1={disk1}",
                 "-d", f"format=raw:drive-virtio2={disk2}"]) == 0
    return out


@pytest.fixture(scope="module")
def fr(workdir: Path, archive: Path) -> Iterator[list[str]]:
    """The command prefix; the helper is stopped (and checked gone) after the module."""
    before = _host_mounts_of(workdir)
    # the helper image is cached beside the test guest's (tests/vm-images is git-ignored)
    state = Path(__file__).resolve().parents[1] / "vm-images" / "file-restore-state"
    state.mkdir(parents=True, exist_ok=True)
    prefix = [sys.executable, "-m", "qmpbackup.cli.main", "file-restore", "--run-dir", str(workdir / "run"),
              "--state-dir", str(state)]
    yield prefix
    subprocess.run([*prefix, "--stop", str(archive)], check=True, timeout=60)
    assert not list((workdir / "run" / "file-restore").glob("*/pid"))
    assert subprocess.run(["pgrep", "-f", str(workdir / "run")], capture_output=True).returncode == 1
    assert _host_mounts_of(workdir) == before  # the host mounted nothing


def run(prefix: list[str], archive: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*prefix[:4], str(archive), *args, *prefix[4:]], capture_output=True, timeout=300,
                          check=False)


def test_top_level_lists_the_drives(fr: list[str], archive: Path) -> None:
    res = run(fr, archive, "list", "/")
    assert res.returncode == 0, res.stderr
    names = [line.split("\t")[0] for line in res.stdout.decode().splitlines()]
    assert names == ["drive-scsi0", "drive-virtio1", "drive-virtio2"]


def test_drive_lists_volumes_and_reports_the_broken_ones(fr: list[str], archive: Path) -> None:
    res = run(fr, archive, "list", "drive-scsi0", "--output-format", "json")
    assert res.returncode == 0, res.stderr
    vols = {v["name"]: v for v in json.loads(res.stdout)}
    assert vols["part1"]["fstype"] == "ext4" and vols["part2"]["fstype"] == "xfs"
    errors = res.stderr.decode().splitlines()
    assert "drive-scsi0/part3: no file system found" in errors
    assert "drive-scsi0/part4: no file system found" in errors
    whole = run(fr, archive, "list", "drive-virtio1")
    assert whole.stdout.decode().startswith("disk\text4")


def test_files_are_listed_with_modes_and_links(fr: list[str], archive: Path) -> None:
    res = run(fr, archive, "list", "drive-scsi0/part1/etc", "--output-format", "json")
    assert res.returncode == 0, res.stderr
    entries = {e["name"]: e for e in json.loads(res.stdout)}
    assert entries["hostname"]["mode"] == 0o640 and entries["hostname"]["size"] == len(HOSTNAME)
    assert entries["link"] == {**entries["link"], "type": "symlink", "target": "hostname"}
    text = run(fr, archive, "list", "drive-scsi0/part2").stdout.decode()
    assert "x.txt" in text


def test_extract_a_file_byte_for_byte(fr: list[str], archive: Path, tmp_path: Path) -> None:
    dest = tmp_path / "big.bin"
    res = run(fr, archive, "extract", "drive-scsi0/part1/data/big.bin", str(dest))
    assert res.returncode == 0, res.stderr
    assert dest.read_bytes() == BIG
    again = run(fr, archive, "extract", "drive-scsi0/part1/data/big.bin", str(dest))
    assert again.returncode == 2 and b"exists" in again.stderr
    assert run(fr, archive, "extract", "drive-virtio1/disk/hello.txt", "-").stdout == b"whole disk\n"


def test_extract_a_directory_as_tar_keeps_modes_and_symlinks(fr: list[str], archive: Path) -> None:
    res = run(fr, archive, "extract", "drive-scsi0/part1/data", "-", "--format", "tar")
    assert res.returncode == 0, res.stderr
    with tarfile.open(fileobj=io.BytesIO(res.stdout)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["data/sub/note.txt"].mode == 0o600
        assert members["data/sub/up"].issym() and members["data/sub/up"].linkname == "../big.bin"
        got = tar.extractfile("data/big.bin")
        assert got is not None and got.read() == BIG
    listing = subprocess.run(["tar", "-tvf", "-"], input=res.stdout, capture_output=True, check=True).stdout
    assert b"data/sub/up -> ../big.bin" in listing


def test_extract_as_zip(fr: list[str], archive: Path, tmp_path: Path) -> None:
    dest = tmp_path / "etc.zip"
    res = run(fr, archive, "extract", "drive-scsi0/part1/etc", str(dest), "--format", "zip")
    assert res.returncode == 0, res.stderr
    with zipfile.ZipFile(dest) as zf:
        assert zf.read("etc/hostname") == HOSTNAME
        assert (zf.getinfo("etc/hostname").external_attr >> 16) & 0o777 == 0o640


def test_a_missing_path_fails_with_its_name(fr: list[str], archive: Path, tmp_path: Path) -> None:
    res = run(fr, archive, "list", "drive-scsi0/part1/nope")
    assert res.returncode == 1
    assert res.stderr.decode().strip() == "ERROR: drive-scsi0/part1/nope: no such file or directory"
    out = tmp_path / "out"
    out.mkdir()
    res = run(fr, archive, "extract", "drive-scsi0/part3/x", str(out / "x"))
    assert res.returncode == 1 and b"drive-scsi0/part3: no file system found" in res.stderr
    assert not list(out.iterdir())  # no partial file
    res = run(fr, archive, "list", "drive-sata9")
    assert res.returncode == 1 and b"drive-sata9: no such drive" in res.stderr


def test_logical_volumes_are_listed_and_read(fr: list[str], archive: Path) -> None:
    top = run(fr, archive, "list", "drive-virtio2", "--output-format", "json")
    assert top.returncode == 0, top.stderr
    assert {"name": "lv", "type": "dir", "size": 0} in json.loads(top.stdout)
    lvs = run(fr, archive, "list", "drive-virtio2/lv", "--output-format", "json")
    assert [(v["name"], v["fstype"]) for v in json.loads(lvs.stdout)] == [(f"{VG}-root", "ext4")], lvs.stderr
    got = run(fr, archive, "extract", f"drive-virtio2/lv/{VG}-root/lvm.txt", "-")
    assert got.returncode == 0 and got.stdout == b"inside an LV\n", got.stderr
