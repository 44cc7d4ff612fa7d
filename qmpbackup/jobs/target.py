"""Where backups of a run go, and with which settings: ``--dumpdir`` / ``--storage`` resolved.

vzdump picks the target from the command line, else from vzdump.conf, else the
storage ``local``; ``prune-backups`` then comes from the command line, else the
storage, else vzdump.conf, else ``keep-all=1``. Commands that work on a dump
directory (backup, prune, list, protect) share this one resolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.jobs.storage_cfg import Storage, backup_storage, load_storage_cfg, storage_for_dir
from qmpbackup.jobs.vzdump_conf import (
    OptionLayer,
    VzdumpOptions,
    layer_from_mapping,
    load_vzdump_conf,
    merge,
    storage_layer,
)

DEFAULT_STORAGE = "local"


@dataclass(frozen=True, slots=True)
class Target:
    """The resolved dump directory, its storage (None for a bare dump dir) and the merged options."""

    dump_dir: Path
    storage: Storage | None
    options: VzdumpOptions


def resolve_target(
    config_dir: Path,
    command_line: Mapping[str, str],
    job: OptionLayer | None = None,
) -> Target:
    """Resolve target and options from vzdump.conf, storage.cfg, a job and the command line.

    ``command_line`` maps vzdump option names to their text (only the options given).
    """
    conf = load_vzdump_conf(config_dir)
    cli = layer_from_mapping(command_line, "command line")
    upper = [job, cli] if job is not None else [cli]
    chosen = merge(conf, *upper)
    storage: Storage | None = None
    if chosen.dumpdir is not None:
        dump_dir = chosen.dumpdir
        final = chosen
    else:
        storages = load_storage_cfg(config_dir)
        storage = backup_storage(storages, chosen.storage or DEFAULT_STORAGE)
        dump_dir = storage.dump_dir
        final = merge(conf, storage_layer(storage.prune_backups, f"storage {storage.storeid}"), *upper)
    return Target(dump_dir=dump_dir, storage=storage, options=final)


def storage_of_dir(config_dir: Path, dump_dir: Path) -> Storage | None:
    """The configured storage whose dump directory is ``dump_dir``, if any."""
    return storage_for_dir(load_storage_cfg(config_dir), dump_dir)
