"""`qmpbackup backup` options as vzdump reads them, checked before any VM is touched (real CLI)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

import pytest

from qmpbackup.jobs.backup_job import JobRequest, plan_backup_job
from qmpbackup.jobs.command_line import vzdump_command_line
from qmpbackup.jobs.jobs_cfg import parse_jobs_cfg
from qmpbackup.jobs.scheduler import backup_command
from tests.cli.retention_helpers import assert_usage_error, backup, qmpbackup


def _dirs(tmp_path: Path) -> list[str]:
    return ["--state-dir", str(tmp_path / "state"), "--run-dir", str(tmp_path / "run")]


def test_protected_refused_before_the_backup_when_the_limit_is_reached(tmp_path: Path, isolated_config: Path) -> None:
    store = tmp_path / "s"
    dump = store / "dump"
    dump.mkdir(parents=True)
    (isolated_config / "storage.cfg").write_text(
        f"dir: bk\n\tpath {store}\n\tcontent backup\n\tmax-protected-backups 1\n")
    a = backup(dump, 100, "2024_01_01-10_00_00")
    assert qmpbackup("protect", str(a)).returncode == 0
    before = sorted(p.name for p in dump.iterdir())
    r = qmpbackup("backup", "100", "--storage", "bk", "--protected", "1", *_dirs(tmp_path))
    assert_usage_error(r, "max-protected-backups")
    assert sorted(p.name for p in dump.iterdir()) == before
    assert not (tmp_path / "run").exists()  # refused before the host lock, before any QEMU


def test_vmids_with_all_refused(tmp_path: Path, isolated_config: Path) -> None:
    assert_usage_error(qmpbackup("backup", "100", "--all", "--dumpdir", str(tmp_path), *_dirs(tmp_path)),
                       "not both")


def test_exclude_alone_means_all_but_these(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    (config / "guests").mkdir(parents=True)
    for vmid in (100, 101, 102):
        (config / "guests" / f"{vmid}.conf").write_text("")
    request = JobRequest(config_dir=config, options={"exclude": "101", "dumpdir": str(tmp_path / "dump")},
                         state_dir=tmp_path / "state")
    plan = plan_backup_job(request)
    assert plan.vmids == [100, 102] and sorted(plan.definitions) == [100, 102]


def test_pool_refused_and_node_elsewhere_does_nothing(tmp_path: Path, isolated_config: Path) -> None:
    assert_usage_error(qmpbackup("backup", "--pool", "p1", "--dumpdir", str(tmp_path), *_dirs(tmp_path)),
                       "pools are not supported")
    r = qmpbackup("backup", "100", "--node", "not-" + os.uname().nodename, "--exclude-path", "/tmp",
                  "--stdexcludes", "1", "--dumpdir", str(tmp_path), *_dirs(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "'exclude-path' only concerns containers; ignored for VMs" in r.stderr
    assert "skipping backup job: it is for node" in r.stderr
    assert not (tmp_path / "run").exists()


def test_quiet_keeps_info_off_stderr(tmp_path: Path, isolated_config: Path) -> None:
    r = qmpbackup("backup", "100", "--quiet", "1", "--node", "elsewhere-x", "--dumpdir", str(tmp_path),
                  *_dirs(tmp_path))
    assert r.returncode == 0 and r.stderr == ""


def test_version_and_help() -> None:
    r = qmpbackup("--version")
    assert r.returncode == 0 and r.stdout.startswith("qmpbackup ")
    text = qmpbackup("backup", "--help").stdout
    for words in ("(default 180)", "KiB/s", "snapshot | suspend | stop", "(default 10)", "ignored for VMs"):
        assert words in " ".join(text.split()), words


def test_usage_errors_point_to_the_subcommand_help(tmp_path: Path, isolated_config: Path) -> None:
    assert_usage_error(qmpbackup("backup", "--bogus"), "see 'qmpbackup backup --help'")
    assert_usage_error(qmpbackup("jobs", "run", "x", "--bogus"), "see 'qmpbackup jobs run --help'")
    assert_usage_error(qmpbackup("backup", "100", "--mode", "x", "--dumpdir", str(tmp_path)),
                       "see 'qmpbackup backup --help'")


def test_starting_line_is_a_shell_quoted_vzdump_command() -> None:
    line = vzdump_command_line([100, 101], False, {"notes-template": "{{guestname}} on $HOST", "mode": "stop",
                                                   "mailto": "a@x,b@y"})
    assert line == "vzdump 100 101 --mailto a@x --mailto b@y --mode stop --notes-template '{{guestname}} on $HOST'"
    assert shlex.split(line)[-1] == "{{guestname}} on $HOST"
    [job] = parse_jobs_cfg("vzdump: nightly\n\tschedule 21:00\n\tall 1\n\tnotes-template a b\n\tcompress zstd\n",
                           "jobs.cfg")
    assert vzdump_command_line((), True, {**job.text, "job-id": job.id}) == (
        "vzdump --all 1 --compress zstd --job-id nightly --notes-template 'a b'")


def test_jobs_run_passes_state_and_run_dir(tmp_path: Path) -> None:
    [job] = parse_jobs_cfg("vzdump: j\n\tschedule 21:00\n\tvmid 100\n", "jobs.cfg")
    command = backup_command(job, tmp_path, tmp_path / "st", tmp_path / "rn")
    assert command[-4:] == ["--state-dir", str(tmp_path / "st"), "--run-dir", str(tmp_path / "rn")]
    text = " ".join(qmpbackup("jobs", "run", "--help").stdout.split())
    assert "--state-dir" in text and "--run-dir" in text


def test_prune_without_vmid_prunes_every_group(tmp_path: Path, isolated_config: Path) -> None:
    dump = tmp_path / "dump"
    dump.mkdir()
    for vmid in (100, 101):
        for day in (1, 2, 3):
            backup(dump, vmid, f"2024_01_0{day}-10_00_00")
    r = qmpbackup("prune", "--dumpdir", str(dump), "--prune-backups", "keep-last=1")
    assert r.returncode == 0, r.stderr
    left = sorted(p.name for p in dump.iterdir())
    assert left == ["vzdump-qemu-100-2024_01_03-10_00_00.vma.zst", "vzdump-qemu-101-2024_01_03-10_00_00.vma.zst"]


def test_a_relative_dumpdir_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qmpbackup.cli.common import target_options

    monkeypatch.chdir(tmp_path)
    assert target_options(argparse.Namespace(dumpdir="dump", storage=None)) == {"dumpdir": str(tmp_path / "dump")}


def test_protect_says_it_once(tmp_path: Path) -> None:
    a = backup(tmp_path, 100, "2024_01_01-10_00_00")
    r = qmpbackup("protect", str(a))
    assert r.returncode == 0 and r.stdout == f"{a.name}: protected\n" and r.stderr == ""
