"""Instant point-in-time copies of a shut-down VM's disks (stop mode), on real loop-mounted file systems.

LVM-thin and ZFS cannot run on this machine: for them a fake command runner stands in
and the tests check the commands and the clean-up only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from qmpbackup.backup.instant_copy import (
    COPY_MARK,
    LvmThinSnapshot,
    NoInstantCopy,
    ZfsSnapshot,
    instant_copies,
)
from tests.support.loopfs import LoopFs

MiB = 1 << 20


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _disk(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.writelines(os.urandom(4 * MiB) for _ in range(size // (4 * MiB)))
        os.fsync(f.fileno())
    return path


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_reflink_copy_shares_the_data_and_keeps_the_moment(fstype: str, loopfs: Callable[[str, int], LoopFs]) -> None:
    fs = loopfs(fstype, 400 * MiB)
    disk = _disk(fs.mountpoint / "vm-100-disk-0.raw", 128 * MiB)
    before = _digest(disk)
    free = _free(fs.mountpoint)
    with instant_copies([disk], "t1") as [copy]:
        assert copy.method == "reflink" and copy.source == disk
        assert copy.path.parent == disk.parent and COPY_MARK in copy.path.name
        # No data was copied: the clone shares the disk's extents (at most metadata was written).
        assert free - _free(fs.mountpoint) < 8 * MiB
        with open(disk, "r+b") as f:  # the restarted VM writes to its disk ...
            f.write(b"\xff" * MiB)
        assert _digest(copy.path) == before  # ... and the copy stays at the shutdown's moment
        path = copy.path
    assert not path.exists()
    assert sorted(p.name for p in fs.mountpoint.iterdir() if p.name != "lost+found") == ["vm-100-disk-0.raw"]


def test_no_reflink_says_why_and_leaves_nothing(loopfs: Callable[[str, int], LoopFs]) -> None:
    xfs = loopfs("xfs", 300 * MiB)
    ext4 = loopfs("ext4", 64 * MiB)
    first = _disk(xfs.mountpoint / "a.raw", 8 * MiB)
    second = _disk(ext4.mountpoint / "b.raw", 8 * MiB)
    reason = rf"^ext4 at {ext4.mountpoint} cannot clone files \(no reflink\)$"
    with pytest.raises(NoInstantCopy, match=reason), instant_copies([first, second], "t2"):
        raise AssertionError("not reached")
    assert [p.name for p in xfs.mountpoint.iterdir()] == ["a.raw"]  # the first copy was dropped
    assert sorted(p.name for p in ext4.mountpoint.iterdir()) == ["b.raw", "lost+found"]


class FakeRunner:
    """Stands in for lvs/lvcreate/lvremove and zfs, which cannot run here; records each command."""

    def __init__(self, replies: dict[str, str] | None = None, fail: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.replies = replies or {}
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> str:
        self.commands.append(list(argv))
        if self.fail and self.fail in " ".join(argv):
            raise NoInstantCopy(f"{argv[0]} failed: fake failure")
        return self.replies.get(argv[0], "")


def test_lvm_thin_snapshot_commands_with_a_fake_lvm() -> None:
    run = FakeRunner({"lvs": "  pve vm-100-disk-0 thin\n"})
    method = LvmThinSnapshot(run)
    copy = method.take(Path("/dev/pve/vm-100-disk-0"), "t3")
    assert copy == Path(f"/dev/pve/vm-100-disk-0-{COPY_MARK}-t3")
    method.drop(copy)
    assert run.commands[1] == ["lvcreate", "-s", "-n", f"vm-100-disk-0-{COPY_MARK}-t3", "-ay", "-K", "-p", "r",
                               "pve/vm-100-disk-0"]
    assert run.commands[2] == ["lvremove", "-f", f"pve/vm-100-disk-0-{COPY_MARK}-t3"]
    with pytest.raises(NoInstantCopy, match="not thin"):
        LvmThinSnapshot(FakeRunner({"lvs": "pve root linear"})).take(Path("/dev/pve/root"), "t4")


def test_zfs_snapshot_commands_with_a_fake_zfs() -> None:
    run = FakeRunner()
    method = ZfsSnapshot(run)
    copy = method.take(Path("/dev/zvol/rpool/data/vm-100-disk-0"), "t5")
    assert copy == Path(f"/dev/zvol/rpool/data/vm-100-disk-0-{COPY_MARK}-t5")
    method.drop(copy)
    snap = f"rpool/data/vm-100-disk-0@{COPY_MARK}-t5"
    assert run.commands == [
        ["zfs", "snapshot", snap],
        ["zfs", "clone", "-o", "readonly=on", snap, f"rpool/data/vm-100-disk-0-{COPY_MARK}-t5"],
        ["udevadm", "settle"],
        ["zfs", "destroy", f"rpool/data/vm-100-disk-0-{COPY_MARK}-t5"],
        ["zfs", "destroy", snap],
    ]
    failing = FakeRunner(fail="clone")
    with pytest.raises(NoInstantCopy):
        ZfsSnapshot(failing).take(Path("/dev/zvol/rpool/vm-1"), "t6")
    assert failing.commands[-1] == ["zfs", "destroy", f"rpool/vm-1@{COPY_MARK}-t6"]  # the snapshot is not left
