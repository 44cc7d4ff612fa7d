"""Mounting an export read-only through qemu-storage-daemon FUSE and a loop device.

The export is a raw disk image served in-process (tests.nbd.file_source): MBR and GPT
partition tables, ext4 with files. Root only (loop devices, mount); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpbackup.errors import UsageError
from qmpbackup.recovery.journal import Journal
from qmpbackup.mount.host_journal import KIND_MOUNTED, is_mountpoint, undo_all
from qmpbackup.mount.mount_archive import attach, make_rundir
from qmpbackup.nbd import Export, NbdServer
from tests.nbd.file_source import FileSource

pytestmark = [pytest.mark.qemu, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop, mount)")]

MiB = 1 << 20


def make_fs(path: Path, size: int, files: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(path), f"{size // 1024}k"],
                   check=True, capture_output=True)


def make_disk(tmp: Path, label: str, files: Path) -> Path:
    """A 64 MiB disk: partition 1 (8 MiB, empty ext4), partition 2 (ext4 with ``files``)."""
    disk = tmp / f"disk-{label}.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    script = "label: gpt\n" if label == "gpt" else "label: dos\n"
    script += "start=2048, size=16384\nstart=18432, size=100000\n"
    subprocess.run(["sfdisk", "-q", str(disk)], input=script.encode(), check=True, capture_output=True)
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    for start, sectors, content in ((2048, 16384, empty), (18432, 100000, files)):
        fs = tmp / "fs.img"
        make_fs(fs, sectors * 512, content)
        subprocess.run(["dd", f"if={fs}", f"of={disk}", "bs=512", f"seek={start}", "conv=notrunc,sparse",
                        "status=none"], check=True)
        fs.unlink()
    return disk


@pytest.fixture
def files(tmp_path: Path) -> Path:
    d = tmp_path / "files"
    (d / "etc").mkdir(parents=True)
    (d / "etc" / "hostname").write_text("guest-one\n")
    (d / "big.bin").write_bytes(os.urandom(3 * MiB + 17))
    return d


async def _serve(sockdir: Path, disk: Path) -> AsyncIterator[NbdServer]:
    sockdir.mkdir(mode=0o700)
    with FileSource(disk) as src:
        async with NbdServer(sockdir / "nbd.sock", [Export.read_only("drive-scsi0", src)],
                             keep_serving=True) as server:
            yield server


@contextlib.asynccontextmanager
async def _undone(journal: Journal) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await undo_all(journal)


def loop_devices_of(path: Path) -> str:
    return subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True).stdout


@pytest.mark.parametrize("label", ["gpt", "dos"])
async def test_attach_partition_and_undo(label: str, tmp_path: Path, files: Path) -> None:
    disk = make_disk(tmp_path, label, files)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    async for server in _serve(tmp_path / "sock", disk):
        with Journal.open(tmp_path / "state" / "mount.jsonl") as journal:
            async with _undone(journal):
                rundir = make_rundir(journal, tmp_path / "run", mnt)
                with pytest.raises(UsageError, match="has partitions 1, 2"):
                    await attach(journal, server.path, "drive-scsi0", mnt, None, rundir)
                assert not await undo_all(journal)
                rundir = make_rundir(journal, tmp_path / "run", mnt)
                with pytest.raises(UsageError, match="no partition 3"):
                    await attach(journal, server.path, "drive-scsi0", mnt, 3, rundir)
                assert not await undo_all(journal)
                rundir = make_rundir(journal, tmp_path / "run", mnt)
                mounted = await attach(journal, server.path, "drive-scsi0", mnt, 2, rundir)
                journal.record(KIND_MOUNTED, mountpoint=str(mnt), archive="a", drive="drive-scsi0",
                               device=mounted.device)
                assert mounted.fstype == "ext4" and mounted.device.startswith("/dev/loop")
                fuse = rundir / "disk"
                # Reads go through our server, which runs in this event loop: from a thread.
                assert await asyncio.to_thread((mnt / "etc" / "hostname").read_text) == "guest-one\n"
                assert await asyncio.to_thread((mnt / "big.bin").read_bytes) == (files / "big.bin").read_bytes()
                with pytest.raises(OSError):
                    await asyncio.to_thread((mnt / "new").write_text, "x")  # read-only
                # losetup from a thread as well: it can wait on a page of the loop device that the
                # kernel is still reading ahead through FUSE and our server (this loop; a hang seen).
                assert fuse.name in await asyncio.to_thread(loop_devices_of, fuse)
                assert not await undo_all(journal)
                assert not is_mountpoint(mnt) and not is_mountpoint(fuse)
                assert loop_devices_of(fuse) == ""
                assert not rundir.exists()
                assert not journal.pending()
