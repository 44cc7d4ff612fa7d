"""vzdump.conf parsing, option typing and precedence."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qmpbackup.errors import ConfigError
from qmpbackup.jobs.vzdump_conf import (
    OPTIONS,
    FleecingOption,
    Performance,
    VzdumpOptions,
    layer_from_mapping,
    load_vzdump_conf,
    merge,
    parse_vzdump_conf,
    storage_layer,
)
from qmpbackup.store.prune import KEEP_ALL, PruneOptions

FULL = """\
# vzdump default settings
#tmpdir: DIR

bwlimit: 10240
compress: zstd
dumpdir: /srv/dump
exclude-path: /tmp/?* /var/tmp
fleecing: enabled=1,storage=local-lvm
ionice: 5
lockwait: 30
mailnotification: failure
mailto: root@example.com, ops@example.com
mode: suspend
notes-template: {{guestname}} on {{node}}
notification-mode: legacy-sendmail
performance: max-workers=4
pigz: 2
pool: prod
protected: 1
prune-backups: keep-last=3,keep-daily=7
remove: 0
script: /usr/local/bin/hook.sh
stdexcludes: 0
stopwait: 5
tmpdir: /var/tmp
zstd: 0
"""


def test_every_documented_option_parses() -> None:
    options = merge(parse_vzdump_conf(FULL, "/etc/vzdump.conf"))
    assert options == VzdumpOptions(
        dumpdir=Path("/srv/dump"), tmpdir=Path("/var/tmp"), mode="suspend", compress="zstd",
        zstd_threads=0, pigz_threads=2, bwlimit_kib=10240, ionice=5,
        performance=Performance(max_workers=4), fleecing=FleecingOption(True, "local-lvm"),
        lockwait_min=30, stopwait_min=5, prune_backups=PruneOptions(keep_last=3, keep_daily=7),
        remove=False, protected=True, notes_template="{{guestname}} on {{node}}",
        script=Path("/usr/local/bin/hook.sh"), mailto=("root@example.com", "ops@example.com"),
        mailnotification="failure", notification_mode="legacy-sendmail", pool="prod",
        stdexcludes=False, exclude_path=("/tmp/?*", "/var/tmp"),
    )  # fmt: skip
    assert options.bwlimit_bytes_per_s == 10240 * 1024


def test_issue_option_list_is_covered() -> None:
    listed = ("bwlimit compress dumpdir exclude-path fleecing ionice lockwait mailnotification mailto "
              "maxfiles mode notes-template notification-mode performance pigz pool protected "
              "prune-backups remove script stdexcludes stopwait storage tmpdir zstd").split()
    assert set(listed) <= set(OPTIONS)


def test_defaults() -> None:
    d = merge()
    assert (d.mode, d.compress, d.zstd_threads, d.ionice, d.lockwait_min, d.stopwait_min) == (
        "snapshot", "none", 1, 7, 180, 10)
    assert d.performance.max_workers == 16 and not d.fleecing.enabled and d.remove
    assert d.effective_prune == KEEP_ALL


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("mode: snapshot\nfoo: 1\n", 2, "unknown option 'foo'"),
        ("\n\nionice: 9\n", 3, "out of range"),
        ("compress: xz\n", 1, "compress"),
        ("bwlimit: fast\n", 1, "not a whole number"),
        ("performance: max-workers=0\n", 1, "performance"),
        ("performance: workers=2\n", 1, "unknown property"),
        ("fleecing: enabled=1\n", 1, "storage"),
        ("prune-backups: keep-lst=1\n", 1, "keep-lst"),
        ("storage: local\ndumpdir: /x\n", 2, "mutually exclusive"),
        ("maxfiles: 2\nprune-backups: keep-last=1\n", 2, "conflicts"),
        ("mode snapshot\n", 1, "key: value"),
        ("notes-template: " + "x" * 1025 + "\n", 1, "1024"),
        ("storage: -bad\n", 1, "storage ID"),
        ("protected: maybe\n", 1, "boolean"),
    ],
)
def test_errors_name_file_and_line(text: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_vzdump_conf(text, "/etc/vzdump.conf")
    assert err.value.path == "/etc/vzdump.conf" and err.value.line == line
    assert words in str(err.value)
    assert str(err.value).startswith(f"/etc/vzdump.conf:{line}: ")


def test_container_options_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        parse_vzdump_conf("stdexcludes: 1\n", "f")
    assert "only concerns containers" in caplog.text


def test_maxfiles_warns_and_maps(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        options = merge(parse_vzdump_conf("maxfiles: 3\n", "f"))
    assert options.prune_backups == PruneOptions(keep_last=3)
    assert "deprecated" in caplog.text


def test_precedence() -> None:
    conf = parse_vzdump_conf("compress: gzip\nprune-backups: keep-last=9\nperformance: max-workers=4\n"
                             "storage: nfs1\nionice: 3\n", "conf")
    storage = storage_layer(PruneOptions(keep_daily=5), "storage")
    job = layer_from_mapping({"compress": "zstd", "dumpdir": "/job"}, "job")
    cli = layer_from_mapping({"ionice": "1", "performance": "pbs-entries-max=10"}, "cli")
    merged = merge(conf, storage, job, cli)
    assert merged.compress == "zstd" and merged.ionice == 1
    assert merged.prune_backups == PruneOptions(keep_daily=5)  # storage beats vzdump.conf
    assert merged.performance == Performance(max_workers=4, pbs_entries_max=10)  # key by key
    assert (merged.storage, merged.dumpdir) == (None, Path("/job"))  # the job chose a dump dir
    cli_prune = layer_from_mapping({"prune-backups": "keep-last=1"}, "cli")
    assert merge(conf, storage, cli_prune).prune_backups == PruneOptions(keep_last=1)
    assert merge(conf).prune_backups == PruneOptions(keep_last=9)


def test_load_from_config_dir(isolated_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert merge(load_vzdump_conf(isolated_config)) == VzdumpOptions()
    monkeypatch.setattr("os.cpu_count", lambda: 8)  # zstd threads are bounded by the CPUs of the host
    (isolated_config / "vzdump.conf").write_text("zstd: 4\n")
    assert merge(load_vzdump_conf(isolated_config)).zstd_threads == 4
