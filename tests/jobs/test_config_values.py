"""Hostile option values and config bytes: usage errors (exit 2, one line) naming what is wrong and where."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qmpbackup.config_text import parse_integer
from qmpbackup.errors import ConfigError
from qmpbackup.guest_config import check_vmid, load_guest
from qmpbackup.jobs.jobs_cfg import load_jobs_cfg
from qmpbackup.jobs.storage_cfg import load_storage_cfg
from qmpbackup.jobs.vzdump_conf import load_vzdump_conf, parse_option
from qmpbackup.store.prune import PruneSpecError, parse_prune_spec


@pytest.mark.parametrize(
    ("text", "low", "high", "value"),
    [("0", 0, 9, 0), (" 7 ", 0, 9, 7), ("-1", -1, 9, -1), ("0009", 0, 9, 9), ("9223372036854775807", 0, 2**63 - 1,
                                                                            2**63 - 1)],
)
def test_parse_integer(text: str, low: int, high: int, value: int) -> None:
    assert parse_integer(text, low, high) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [("٣", "'٣' is not a whole number (digits 0-9)"), ("１００", "is not a whole number"),
     ("1_000", "is not a whole number"), ("+1", "is not a whole number"), ("", "is not a whole number"),
     ("-1", "is not a whole number"), ("1e3", "is not a whole number"), ("10", "10 is out of range 0..9"),
     ("9" * 5000, "9999999999999999999999999999999999999999... is out of range 0..9")],
)
def test_parse_integer_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_integer(text, 0, 9)


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [("zstd", "99", "zstd: 99 threads are more than the"), ("zstd", "٣", "zstd: '٣' is not a whole number"),
     ("bwlimit", "1" + "0" * 23, "bwlimit: 1" + "0" * 23 + " is out of range 0..9007199254740991"),
     ("lockwait", "1" + "0" * 29, "lockwait: 1" + "0" * 29 + " is out of range 0..153722867"),
     ("stopwait", "1" + "0" * 29, "stopwait: 1" + "0" * 29 + " is out of range"),
     ("prune-backups", "keep-last=" + "1" + "0" * 20, "prune-backups: keep-last: 1" + "0" * 20 + " is out of range"),
     ("prune-backups", ",,,", "prune-backups: ',,,' sets no option"),
     ("prune-backups", "keep-last=٣", "prune-backups: keep-last: '٣' is not a whole number"),
     ("performance", ",", "performance: ',' sets no property"),
     ("exclude", "100,１００", "exclude: VM ID '１００' is not a whole number"),
     ("vmid", "0100", "vmid: VM ID '0100' has leading zeros")],
)
def test_option_values_refused(key: str, text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_option(key, text)
    assert str(info.value).startswith(message)


def test_good_values_still_parse() -> None:
    assert parse_option("zstd", "0") == ("zstd_threads", 0)
    assert parse_option("bwlimit", "9007199254740991") == ("bwlimit_kib", 9007199254740991)
    assert parse_option("lockwait", " 180 ") == ("lockwait_min", 180)
    assert parse_option("exclude", "100, 101;102") == ("exclude", (100, 101, 102))
    assert check_vmid("999999999") == 999999999
    with pytest.raises(PruneSpecError, match="keep-all: 2 is out of range 0..1"):
        parse_prune_spec("keep-all=2")


@pytest.mark.parametrize(
    "args",
    [["backup", "100", "--zstd", "99"], ["backup", "100", "--bwlimit", "1" + "0" * 23],
     ["backup", "100", "--lockwait", "1" + "0" * 29],
     ["backup", "100", "--prune-backups", "keep-last=" + "1" + "0" * 20],
     ["backup", "100", "--prune-backups", ",,,"], ["backup", "100", "--prune-backups", "keep-last=٣"],
     ["backup", "１００"], ["restore", "x.vma", "１００"], ["restore", "x.vma", "100", "--bwlimit", "٣"],
     ["vma", "create", "x.vma", "--zstd-threads", "99", "-d", "format=raw:a=/dev/null"],
     ["jobs", "next-events", "daily", "--count", "٣"]],
)
def test_cli_option_values_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qmpbackup.cli.main", "--config-dir", str(tmp_path), *args,
         *(["--dumpdir", str(tmp_path), "--run-dir", str(tmp_path), "--state-dir", str(tmp_path)]
           if args[0] == "backup" else [])],
        capture_output=True, timeout=60, check=False, cwd=tmp_path,
    )
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and "Traceback" not in lines[0], lines
    assert any(why in lines[0] for why in ("whole number", "out of range", "sets no option", "more than the"))
    assert not list(tmp_path.glob("vzdump-*")) and not (tmp_path / "x.vma").exists()


def _guest(config_dir: Path) -> Path:
    path = config_dir / "guests" / "100.conf"
    path.parent.mkdir()
    return path


CONFIG_FILES: list[tuple[str, Callable[[Path], Path], bytes, Callable[[Path], object]]] = [
    ("vzdump.conf", lambda d: d / "vzdump.conf", b"# options\nmode: snapshot\nnotes-template: caf\xe9\n",
     load_vzdump_conf),
    ("storage.cfg", lambda d: d / "storage.cfg", b"dir: local\n\tpath /var/lib/vz\n\tcontent backup,\xff\n",
     load_storage_cfg),
    ("jobs.cfg", lambda d: d / "jobs.cfg", b"vzdump: daily\n\tschedule 02:00\n\tcomment \x80\n", load_jobs_cfg),
    ("guest", _guest, b"memory: 512\nname: vm\xc3\n", lambda d: load_guest(d, 100)),
]


@pytest.mark.parametrize(("name", "where", "data", "load"), CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_a_non_utf8_byte_names_file_and_line(
    isolated_config: Path, name: str, where: Callable[[Path], Path], data: bytes, load: Callable[[Path], object]
) -> None:
    path = where(isolated_config)
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load(isolated_config)
    line = data.count(b"\n", 0, next(i for i, b in enumerate(data) if b >= 0x80)) + 1
    assert str(info.value).startswith(f"{path}:{line}: byte 0x"), str(info.value)
    assert "is not UTF-8 text" in str(info.value)
