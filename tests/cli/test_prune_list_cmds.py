"""`qmpbackup prune` and `qmpbackup list` through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.retention_helpers import assert_usage_error, backup, qmpbackup


def test_prune_dry_run_then_real(tmp_path: Path) -> None:
    a = backup(tmp_path, 100, "2024_01_01-10_00_00")
    b = backup(tmp_path, 100, "2024_01_01-12_00_00")
    c = backup(tmp_path, 100, "2024_01_02-10_00_00")
    (tmp_path / "vzdump-qemu-100-2024_01_01-10_00_00.log").write_text("log")
    (tmp_path / (a.name + ".notes")).write_text("n")
    other = backup(tmp_path, 101, "2024_01_01-10_00_00")
    args = ["prune", "--vmid", "100", "--dumpdir", str(tmp_path), "--prune-backups", "keep-daily=5"]
    r = qmpbackup(*args, "--dry-run", "--output-format", "json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [(e["filename"], e["mark"]) for e in result] == [
        (c.name, "keep"), (b.name, "keep"), (a.name, "remove")]
    assert result[2]["ctime"] == 1704103200  # 2024-01-01 10:00:00 UTC
    assert a.exists()
    r = qmpbackup(*args)
    assert r.returncode == 0, r.stderr
    assert "would" not in r.stdout and "1 removed" in r.stdout
    assert "prune older backups with retention: keep-daily=5" in r.stderr
    assert not a.exists() and not (tmp_path / "vzdump-qemu-100-2024_01_01-10_00_00.log").exists()
    assert not (tmp_path / (a.name + ".notes")).exists()
    assert b.exists() and c.exists() and other.exists()


def test_prune_uses_local_time(tmp_path: Path) -> None:
    backup(tmp_path, 100, "2024_01_01-23_30_00")
    r = qmpbackup("prune", "--vmid", "100", "--dumpdir", str(tmp_path), "--dry-run",
                  "--output-format", "json", tz="America/New_York")
    assert json.loads(r.stdout)[0]["ctime"] == 1704169800  # 23:30 EST = 04:30 UTC next day


def test_prune_defaults_to_keep_all_and_storage_precedence(tmp_path: Path, isolated_config: Path) -> None:
    store = tmp_path / "store"
    dump = store / "dump"
    dump.mkdir(parents=True)
    for day in range(1, 5):
        backup(dump, 100, f"2024_01_0{day}-10_00_00")
    r = qmpbackup("prune", "--vmid", "100", "--dumpdir", str(dump), "--dry-run", "--output-format", "json")
    assert {e["mark"] for e in json.loads(r.stdout)} == {"keep"}
    (isolated_config / "vzdump.conf").write_text("prune-backups: keep-last=3\n")
    (isolated_config / "storage.cfg").write_text(
        f"dir: bk\n\tpath {store}\n\tcontent backup\n\tprune-backups keep-last=2\n")
    r = qmpbackup("prune", "--vmid", "100", "--storage", "bk", "--dry-run", "--output-format", "json")
    assert [e["mark"] for e in json.loads(r.stdout)].count("keep") == 2  # storage beats vzdump.conf
    r = qmpbackup("prune", "--vmid", "100", "--dumpdir", str(dump), "--dry-run", "--output-format", "json")
    assert [e["mark"] for e in json.loads(r.stdout)].count("keep") == 3  # bare dumpdir: vzdump.conf
    r = qmpbackup("prune", "--vmid", "100", "--storage", "bk", "--prune-backups", "keep-last=1",
                  "--dry-run", "--output-format", "json")
    assert [e["mark"] for e in json.loads(r.stdout)].count("keep") == 1  # option beats storage


def test_prune_maxfiles_warns(tmp_path: Path, isolated_config: Path) -> None:
    backup(tmp_path, 100, "2024_01_01-10_00_00")
    backup(tmp_path, 100, "2024_01_02-10_00_00")
    (isolated_config / "vzdump.conf").write_text("maxfiles: 1\n")
    r = qmpbackup("prune", "--vmid", "100", "--dumpdir", str(tmp_path), "--dry-run", "--output-format", "json")
    assert r.returncode == 0
    assert "WARN:" in r.stderr and "deprecated" in r.stderr
    assert [e["mark"] for e in json.loads(r.stdout)] == ["keep", "remove"]


def test_prune_bad_usage(tmp_path: Path, isolated_config: Path) -> None:
    assert_usage_error(qmpbackup("prune", "--vmid", "7", "--dumpdir", str(tmp_path)), "VM ID")
    assert_usage_error(qmpbackup("prune", "--vmid", "100", "--dumpdir", str(tmp_path),
                                 "--prune-backups", "keep-weakly=2"), "keep-weakly")
    assert_usage_error(qmpbackup("prune", "--vmid", "100", "--dumpdir", str(tmp_path / "missing")),
                       "does not exist")
    assert_usage_error(qmpbackup("prune", "--vmid", "100", "--storage", "nope"), "nope")
    assert_usage_error(qmpbackup("prune", "--vmid", "100", "--storage", "a", "--dumpdir", "/x"), "not allowed")
    (isolated_config / "vzdump.conf").write_text("# c\ncompress: zstd\nbogus: 1\n")
    assert_usage_error(qmpbackup("prune", "--vmid", "100", "--dumpdir", str(tmp_path)), "vzdump.conf:3:")


def test_list(tmp_path: Path) -> None:
    a = backup(tmp_path, 100, "2024_01_01-10_00_00", data=b"x" * 2048)
    backup(tmp_path, 101, "2024_01_02-10_00_00", ext=".vma")
    (tmp_path / (a.name + ".notes")).write_text("nightly\nmore")
    (tmp_path / (a.name + ".protected")).write_text("")
    r = qmpbackup("list", "--dumpdir", str(tmp_path), "--output-format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["vmid"], x["compression"], x["protected"], x["notes"], x["size"]) for x in rows] == [
        (100, "zstd", True, "nightly", 2048), (101, "none", False, "", 4)]
    assert rows[0]["time"] == "2024-01-01 10:00:00"
    r = qmpbackup("list", "--dumpdir", str(tmp_path), "--vmid", "100")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["FILE", "TIME", "SIZE", "COMPRESSION", "PROTECTED", "NOTES"]
    assert len(lines) == 2 and "2.0 KiB" in lines[1] and "yes" in lines[1] and "nightly" in lines[1]
