"""`qmpbackup protect|unprotect` and `qmpbackup notes` through the real CLI."""

from __future__ import annotations

from pathlib import Path

from tests.cli.retention_helpers import assert_usage_error, backup, qmpbackup


def test_protect_unprotect(tmp_path: Path) -> None:
    a = backup(tmp_path, 100, "2024_01_01-10_00_00")
    r = qmpbackup("protect", str(a))
    assert r.returncode == 0 and "protected" in r.stdout
    assert (tmp_path / (a.name + ".protected")).exists()
    assert qmpbackup("protect", str(a)).returncode == 0
    r = qmpbackup("prune", "--vmid", "100", "--dumpdir", str(tmp_path), "--prune-backups", "keep-last=1",
                  "--output-format", "json")
    assert '"protected"' in r.stdout and a.exists()
    r = qmpbackup("unprotect", str(a))
    assert r.returncode == 0 and not (tmp_path / (a.name + ".protected")).exists()


def test_max_protected(tmp_path: Path, isolated_config: Path) -> None:
    store = tmp_path / "s"
    dump = store / "dump"
    dump.mkdir(parents=True)
    (isolated_config / "storage.cfg").write_text(
        f"dir: bk\n\tpath {store}\n\tcontent backup\n\tmax-protected-backups 1\n")
    a = backup(dump, 100, "2024_01_01-10_00_00")
    b = backup(dump, 100, "2024_01_02-10_00_00")
    assert qmpbackup("protect", str(a)).returncode == 0
    r = qmpbackup("protect", str(b))
    assert r.returncode == 1 and "max-protected-backups" in r.stderr and r.stderr.count("\n") == 1
    assert qmpbackup("protect", str(b), "--max-protected-backups", "2").returncode == 0


def test_protect_errors(tmp_path: Path) -> None:
    assert_usage_error(qmpbackup("protect", str(tmp_path / "vzdump-qemu-100-2024_01_01-10_00_00.vma")),
                       "does not exist")
    other = tmp_path / "random.bin"
    other.write_bytes(b"")
    assert_usage_error(qmpbackup("unprotect", str(other)), "not a vzdump backup name")


def test_notes(tmp_path: Path) -> None:
    a = backup(tmp_path, 100, "2024_01_01-10_00_00")
    r = qmpbackup("notes", str(a))
    assert r.returncode == 0 and r.stdout == ""
    assert qmpbackup("notes", str(a), "--set", "Grüße\nzwei").returncode == 0
    assert (tmp_path / (a.name + ".notes")).read_text(encoding="utf-8") == "Grüße\nzwei"
    assert qmpbackup("notes", str(a)).stdout == "Grüße\nzwei\n"
    assert qmpbackup("notes", str(a), "--set", "").returncode == 0
    assert not (tmp_path / (a.name + ".notes")).exists()
    assert_usage_error(qmpbackup("notes", str(tmp_path / "missing.vma")), "does not exist")
