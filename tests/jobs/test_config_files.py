"""storage.cfg and jobs.cfg (Proxmox section-config files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpbackup.errors import ConfigError
from qmpbackup.jobs.jobs_cfg import find_job, load_jobs_cfg, parse_jobs_cfg
from qmpbackup.jobs.storage_cfg import StorageError, backup_storage, load_storage_cfg, parse_storage_cfg
from qmpbackup.jobs.target import resolve_target
from qmpbackup.store.prune import KEEP_ALL, PruneOptions

STORAGE_CFG = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images

zfspool: tank
\tpool tank/vms
\tcontent images
\tsparse 1

dir: backups
\tpath /mnt/backups
\tcontent backup
\tprune-backups keep-daily=7,keep-weekly=4
\tmax-protected-backups 2
\tshared 1

nfs: nas
\texport /export/pve
\tserver 10.0.0.5
\tpath /mnt/pve/nas
\tcontent backup
\tmaxfiles 3
\tdisable

pbs: pbs1
\tdatastore store1
\tserver pbs.example.com
\tcontent backup
"""


def test_storage_cfg() -> None:
    storages = parse_storage_cfg(STORAGE_CFG, "/etc/pve/storage.cfg")
    assert set(storages) == {"local", "local-lvm", "tank", "backups", "nas", "pbs1"}
    assert storages["local"].dump_dir == Path("/var/lib/vz/dump")
    lvm = storages["local-lvm"]
    assert (lvm.type, lvm.vgname, lvm.thinpool, lvm.content) == ("lvmthin", "pve", "data",
                                                                  frozenset({"rootdir", "images"}))
    assert storages["tank"].pool == "tank/vms" and storages["tank"].sparse
    b = storages["backups"]
    assert b.prune_backups == PruneOptions(keep_daily=7, keep_weekly=4)
    assert b.max_protected_backups == 2 and b.shared
    assert storages["nas"].prune_backups == PruneOptions(keep_last=3) and storages["nas"].disable
    assert storages["pbs1"].options["datastore"] == "store1"
    assert backup_storage(storages, "backups").dump_dir == Path("/mnt/backups/dump")
    for storeid, words in [("nope", "does not exist"), ("nas", "disabled"), ("local-lvm", "does not support"),
                           ("pbs1", "not a file storage")]:
        with pytest.raises(StorageError, match=words):
            backup_storage(storages, storeid)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("dir: a\n\tpath /x\n\tpath /y\n", 3),
        ("dir a\n", 1),
        ("dir: a\n\tcontent backup\n", 1),
        ("dir: a\n\tpath /x\n\tprune-backups keep-daily=x\n", 3),
        ("dir: a\n\tpath /x\n\ndir: a\n\tpath /y\n", 4),
    ],
)
def test_storage_cfg_errors(text: str, line: int) -> None:
    with pytest.raises(ConfigError) as err:
        parse_storage_cfg(text, "s.cfg")
    assert (err.value.path, err.value.line) == ("s.cfg", line)


JOBS_CFG = """\
vzdump: backup-nightly
\tschedule mon..fri 21:00
\tall 1
\texclude 105,106
\tcompress zstd
\tenabled 1
\tmailnotification always
\tmode snapshot
\tnotes-template {{guestname}}
\tstorage backups
\tprune-backups keep-last=2

realm-sync: sync-ldap
\tschedule daily
\trealm ldap

vzdump: weekly-db
\tschedule sat 03:00
\tvmid 200 201
\tenabled 0
\trepeat-missed 1
\tcomment database servers
\tdumpdir /srv/db-dumps
"""


def test_jobs_cfg() -> None:
    jobs = parse_jobs_cfg(JOBS_CFG, "jobs.cfg")
    assert [j.id for j in jobs] == ["backup-nightly", "weekly-db"]
    nightly, weekly = jobs
    assert nightly.enabled and not nightly.repeat_missed and nightly.schedule_text == "mon..fri 21:00"
    s = nightly.settings
    assert s.all and s.exclude == (105, 106) and s.compress == "zstd" and s.storage == "backups"
    assert s.prune_backups == PruneOptions(keep_last=2)
    assert not weekly.enabled and weekly.repeat_missed and weekly.comment == "database servers"
    assert weekly.settings.vmid == (200, 201)
    assert find_job(jobs, "weekly-db") is weekly
    with pytest.raises(ConfigError):
        find_job(jobs, "nope")


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("vzdump: j\n\tall 1\n", 1, "no 'schedule'"),
        ("vzdump: j\n\tschedule mon..fry\n\tall 1\n", 2, "calendar event"),
        ("vzdump: j\n\tschedule daily\n\tall 1\n\tcompres zstd\n", 4, "unknown option"),
        ("vzdump: j\n\tschedule daily\n", 1, "selects no guests"),
        ("vzdump: j\n\tschedule daily\n\tall 1\n\tenabled 2\n", 4, "enabled"),
    ],
)
def test_jobs_cfg_errors(text: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_jobs_cfg(text, "jobs.cfg")
    assert (err.value.path, err.value.line) == ("jobs.cfg", line)
    assert words in str(err.value)


def test_resolve_target_precedence(isolated_config: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    (isolated_config / "storage.cfg").write_text(
        f"dir: bk\n\tpath {store}\n\tcontent backup\n\tprune-backups keep-daily=3\n"
    )
    (isolated_config / "vzdump.conf").write_text("storage: bk\nprune-backups: keep-last=9\n")
    target = resolve_target(isolated_config, {})
    assert target.dump_dir == store / "dump" and target.storage is not None
    assert target.options.prune_backups == PruneOptions(keep_daily=3)
    target = resolve_target(isolated_config, {"prune-backups": "keep-last=1"})
    assert target.options.prune_backups == PruneOptions(keep_last=1)
    target = resolve_target(isolated_config, {"dumpdir": str(tmp_path)})
    assert target.dump_dir == tmp_path and target.storage is None
    assert target.options.prune_backups == PruneOptions(keep_last=9)  # no storage: vzdump.conf


def test_missing_files(isolated_config: Path) -> None:
    assert load_jobs_cfg(isolated_config) == []
    storages = load_storage_cfg(isolated_config)
    assert storages["local"].dump_dir == Path("/var/lib/vz/dump")
    assert resolve_target(isolated_config, {}).options.effective_prune == KEEP_ALL
