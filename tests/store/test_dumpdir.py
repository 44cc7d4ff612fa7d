"""Dump-directory operations on real files: listing, prune, protection, notes."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest

from qmpbackup.store.dumpdir import (
    DumpDirError,
    apply_prune,
    check_backup_limit,
    list_backups,
    plan_prune,
    prune_after_backup,
    remove_backup,
)
from qmpbackup.store.names import archive_name, index_name, log_name, notes_name, protected_name
from qmpbackup.store.notes import NotesTemplateError, read_notes, render_notes, write_notes
from qmpbackup.store.protection import ProtectionError, is_protected, protect, unprotect
from qmpbackup.store.prune import Mark, PruneOptions

UTC = timezone.utc


def make(d: Path, vmid: int, when: datetime, ext: str = ".zst", size: int = 10) -> Path:
    path = d / archive_name(vmid, when, ext)
    path.write_bytes(b"x" * size)
    log_name(path).write_text("log\n")
    return path


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    d = tmp_path / "dump"
    d.mkdir()
    return d


def test_list(dump: Path) -> None:
    a = make(dump, 100, datetime(2024, 1, 2, 3, 4, 5), ".zst", 7)
    make(dump, 101, datetime(2024, 1, 1), "")
    (dump / "vzdump-lxc-100-2024_01_01-00_00_00.tar.zst").write_bytes(b"")
    (dump / "unrelated.txt").write_text("")
    write_notes(a, "first line\nsecond")
    protect(a)
    index_name(a).write_bytes(b"")
    backups = list_backups(dump, tz=UTC)
    assert [b.path.name for b in backups] == [
        "vzdump-qemu-101-2024_01_01-00_00_00.vma",
        "vzdump-qemu-100-2024_01_02-03_04_05.vma.zst",
    ]
    b = backups[1]
    assert (b.size, b.compression, b.protected, b.notes) == (7, "zstd", True, "first line")
    assert b.ctime == int(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())
    assert backups[0].compression == "none"
    assert [x.name.vmid for x in list_backups(dump, 101)] == [101]


def test_prune_removes_sidecars_and_keeps_protected_and_renamed(dump: Path) -> None:
    days = [make(dump, 100, datetime(2024, 1, d, 12)) for d in range(1, 6)]
    for p in days:
        write_notes(p, "n")
        index_name(p).write_bytes(b"index")  # a sidecar index is part of the backup, not a renamed one
    protect(days[0])
    renamed = dump / "vzdump-qemu-100-my-copy.vma.zst"
    renamed.write_bytes(b"")
    other = make(dump, 200, datetime(2024, 1, 1))
    entries = plan_prune(dump, 100, PruneOptions(keep_last=2), UTC)
    marks = {e.path.name: e.mark for e in entries}
    assert marks == {
        days[4].name: Mark.KEEP, days[3].name: Mark.KEEP, days[2].name: Mark.REMOVE,
        days[1].name: Mark.REMOVE, days[0].name: Mark.PROTECTED, renamed.name: Mark.RENAMED,
    }  # fmt: skip
    removed = apply_prune(entries)
    assert removed == [days[1], days[2]]
    for p in (days[1], days[2]):
        assert not p.exists() and not log_name(p).exists() and not notes_name(p).exists()
        assert not index_name(p).exists()
    for p in (days[0], days[3], days[4], renamed, other):
        assert p.exists()
    assert index_name(days[0]).exists()
    assert log_name(days[0]).exists() and notes_name(days[0]).exists()


def test_remove_refuses_protected(dump: Path) -> None:
    a = make(dump, 100, datetime(2024, 1, 1))
    protect(a)
    with pytest.raises(DumpDirError):
        remove_backup(a)
    assert a.exists()


def test_protection_file_and_limit(dump: Path) -> None:
    a = make(dump, 100, datetime(2024, 1, 1))
    b = make(dump, 100, datetime(2024, 1, 2))
    c = make(dump, 101, datetime(2024, 1, 3))
    old = os.umask(0o077)
    try:
        assert protect(a, max_protected=1)
    finally:
        os.umask(old)
    st = protected_name(a).stat()
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_size == 0
    assert not protect(a, max_protected=1)  # already protected: no error, no change
    with pytest.raises(ProtectionError, match="max-protected-backups"):
        protect(b, max_protected=1)
    assert protect(c, max_protected=1)  # another VM has its own count
    assert unprotect(a) and not is_protected(a)
    assert not unprotect(a)
    assert protect(b, max_protected=1)
    with pytest.raises(ProtectionError):
        protect(dump / "vzdump-qemu-100-2024_01_09-00_00_00.vma", 5)


def test_backup_limit_with_remove_0(dump: Path) -> None:
    a = make(dump, 100, datetime(2024, 1, 1))
    make(dump, 100, datetime(2024, 1, 2))
    check_backup_limit(dump, 100, PruneOptions(keep_last=3))
    with pytest.raises(DumpDirError, match="max backup limit of 2"):
        check_backup_limit(dump, 100, PruneOptions(keep_last=2))
    protect(a)
    check_backup_limit(dump, 100, PruneOptions(keep_last=2))
    check_backup_limit(dump, 100, PruneOptions(keep_all=True))


def test_notes_round_trip(dump: Path) -> None:
    a = make(dump, 100, datetime(2024, 1, 1))
    assert read_notes(a) is None
    write_notes(a, "größe ✓\nline 2")
    assert notes_name(a).read_bytes() == "größe ✓\nline 2".encode()
    assert read_notes(a) == "größe ✓\nline 2"
    write_notes(a, "")
    assert not notes_name(a).exists()
    assert [p.name for p in dump.iterdir() if p.name.startswith(".")] == []


def test_render_notes() -> None:
    out = render_notes("{{guestname}} ({{vmid}}) on {{node}}/{{cluster}}\\nback\\\\slash {{other}}",
                       cluster="c1", guestname="web\\01", node="pve1", vmid=100)
    assert out == "web\\01 (100) on pve1/c1\nback\\slash {{other}}"
    assert render_notes("{{guestname}} / {{cluster}}", cluster=None, guestname=None, node="n", vmid=105) == (
        "VM 105 / standalone node")
    with pytest.raises(NotesTemplateError):
        render_notes("bad \\t escape", "c", "g", "n", 1)
    with pytest.raises(NotesTemplateError):
        render_notes("trailing \\", "c", "g", "n", 1)


def test_prune_after_backup_log_lines(dump: Path) -> None:
    days = [make(dump, 100, datetime(2024, 1, d, 12)) for d in range(1, 4)]
    lines: list[str] = []
    removed = prune_after_backup(dump, 100, PruneOptions(keep_last=1, keep_daily=1), lines.append,
                                 storeid="local", tz=UTC)
    assert removed == [days[0]]
    assert lines == [
        "prune older backups with retention: keep-daily=1, keep-last=1",
        f"removing backup 'local:backup/{days[0].name}'",
        "pruned 1 backup(s) not covered by keep-retention policy",
    ]
    assert prune_after_backup(dump, 100, PruneOptions(), lines.append) == []
