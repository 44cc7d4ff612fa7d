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

from qmpbackup.instant_copy import (
    COPY_MARK,
    LvmThinSnapshot,
    NoInstantCopy,
    Reflink,
    ZfsSnapshot,
    drop_copy,
    instant_copies,
)
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Journal
from qmpbackup.recovery.replay import replay
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


def _journal_kinds(journal: Journal) -> list[tuple[str, str, str]]:
    return [(e.kind, str(e.data["method"]), str(e.data["path"])) for e in journal.pending()]


def test_lvm_thin_snapshot_commands_with_a_fake_lvm(tmp_path: Path) -> None:
    snap = f"vm-100-disk-0-{COPY_MARK}-t3"
    run = FakeRunner({"lvs": "  pve vm-100-disk-0 thin\n"})
    method = LvmThinSnapshot(run)
    source = Path("/dev/pve/vm-100-disk-0")
    with Journal.open(tmp_path / "100.jsonl") as journal:
        with instant_copies([source], "t3", choose=lambda _: method, journal=journal) as [copy]:
            assert copy.path == Path(f"/dev/pve/{snap}")
            # journaled before lvcreate ran (the fake saw only the lvs query by then)
            assert _journal_kinds(journal) == [("instant-copy", "lvm-thin snapshot", str(copy.path))]
            run.replies["lvs"] = f"  vm-100-disk-0\n  {snap}\n"
        assert not journal.pending()
    assert run.commands == [
        ["lvs", "--noheadings", "-o", "vg_name,lv_name,segtype", str(source)],
        ["lvcreate", "-s", "-n", snap, "-ay", "-K", "-p", "r", "pve/vm-100-disk-0"],
        ["lvs", "--noheadings", "-o", "lv_name", "pve"],
        ["lvremove", "-f", f"pve/{snap}"],
    ]
    gone = FakeRunner({"lvs": "  vm-100-disk-0\n"})
    LvmThinSnapshot(gone).drop(copy.path)  # dropping twice is harmless: nothing to remove
    assert [c[0] for c in gone.commands] == ["lvs"]
    with pytest.raises(NoInstantCopy, match="not thin"):
        LvmThinSnapshot(FakeRunner({"lvs": "pve root linear"})).copy_path(Path("/dev/pve/root"), "t4")


def test_zfs_snapshot_commands_with_a_fake_zfs() -> None:
    base = "rpool/data/vm-100-disk-0"
    snap, clone = f"{base}@{COPY_MARK}-t5", f"{base}-{COPY_MARK}-t5"
    run = FakeRunner({"zfs": f"{base}\n{snap}\n{clone}\n"})
    method = ZfsSnapshot(run)
    copy = method.copy_path(Path(f"/dev/zvol/{base}"), "t5")
    assert copy == Path(f"/dev/zvol/{clone}")
    method.take(Path(f"/dev/zvol/{base}"), copy)
    method.drop(copy)
    assert run.commands == [
        ["zfs", "snapshot", snap],
        ["zfs", "clone", "-o", "readonly=on", snap, clone],
        ["udevadm", "settle"],
        ["zfs", "list", "-H", "-o", "name", "-t", "volume,snapshot", "-r", "rpool/data"],
        ["zfs", "destroy", clone],
        ["zfs", "destroy", snap],
    ]
    failing = FakeRunner(fail="clone")
    with pytest.raises(NoInstantCopy):
        ZfsSnapshot(failing).take(Path("/dev/zvol/rpool/vm-1"), ZfsSnapshot.ZVOL_DIR / f"rpool/vm-1-{COPY_MARK}-t6")
    assert failing.commands[-1] == ["zfs", "destroy", f"rpool/vm-1@{COPY_MARK}-t6"]  # the snapshot is not left
    half = FakeRunner({"zfs": f"{base}\n{snap}\n"})  # killed between snapshot and clone
    ZfsSnapshot(half).drop(copy)
    assert half.commands[-1] == ["zfs", "destroy", snap]


async def test_a_copy_left_by_a_killed_run_is_dropped_by_its_journal(
        loopfs: Callable[[str, int], LoopFs], tmp_path: Path) -> None:
    """A run killed while its copy exists leaves the entry (recorded before the copy was made, as
    :func:`instant_copies` does); the replay of the next run or of cleanup drops the copy."""
    fs = loopfs("xfs", 300 * MiB)
    disk = _disk(fs.mountpoint / "vm-100-disk-0.raw", 8 * MiB)
    path = tmp_path / "journal" / "100.jsonl"
    with Journal.open(path) as journal:
        method = Reflink()
        copy = method.copy_path(disk, "t7")
        journal.record(kinds.INSTANT_COPY, method=method.name, path=str(copy))
        method.take(disk, copy)  # ... and the run is killed here
    assert copy.exists()
    with Journal.open(path) as again:
        assert _journal_kinds(again) == [("instant-copy", "reflink", str(copy))]
        assert await replay(again, None) == []
        assert not again.pending()
    assert not copy.exists() and disk.exists()
    assert not path.exists()


def test_drop_copy_leaves_alone_what_is_not_a_copy(tmp_path: Path) -> None:
    mine = tmp_path / "vm-100-disk-0.raw"
    mine.write_bytes(b"x")
    drop_copy("reflink", mine)
    assert mine.exists()
    with pytest.raises(NoInstantCopy, match="unknown instant copy method"):
        drop_copy("tape", tmp_path / f"x-{COPY_MARK}-1")
