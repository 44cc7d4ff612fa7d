"""vzdump's options: the schema, the ``vzdump.conf`` file, and their precedence.

Users bring their ``/etc/vzdump.conf`` and jobs over from Proxmox, so we accept
exactly vzdump's option names, values, defaults and units. Options are parsed
once, here, into a frozen :class:`VzdumpOptions`; below this module nothing
reads raw option text.

Precedence (:func:`merge`): vzdump defaults < vzdump.conf < storage < job < command line.
Each layer only holds what it sets. Two special cases, both as vzdump does:
``performance`` is merged key by key, and ``storage``/``dumpdir`` are one choice
(a layer that sets either replaces both). The storage layer only carries
``prune-backups`` (option > storage > vzdump.conf > ``keep-all=1``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qmpbackup.compress import parse_compress
from qmpbackup.config_text import INT64_MAX, MAX_BWLIMIT_KIB, parse_integer, read_config_text
from qmpbackup.errors import ConfigError, UsageError
from qmpbackup.guest_config import check_vmid
from qmpbackup.jobs.property_string import PropertyStringError, parse_property_string
from qmpbackup.store.prune import KEEP_ALL, PruneOptions, PruneSpecError, from_maxfiles, parse_prune_spec

log = logging.getLogger(__name__)

VZDUMP_CONF = "vzdump.conf"
NOTES_TEMPLATE_MAX = 1024
MAX_WAIT_MIN = int(threading.TIMEOUT_MAX // 60)  # the longest wait the platform can express

STORAGE_ID_RE = re.compile(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$", re.IGNORECASE)
_LIST_SPLIT = re.compile(r"[\s,;]+")


@dataclass(frozen=True, slots=True)
class Performance:
    max_workers: int = 16
    pbs_entries_max: int = 1048576  # containers only


@dataclass(frozen=True, slots=True)
class FleecingOption:
    enabled: bool = False
    storage: str | None = None


@dataclass(frozen=True, slots=True)
class VzdumpOptions:
    """Every vzdump option with vzdump's default; units are in the field names."""

    # target
    storage: str | None = None
    dumpdir: Path | None = None
    tmpdir: Path | None = None
    # how
    mode: str = "snapshot"
    compress: str = "none"  # none | lzo | gzip | zstd (Compression values)
    zstd_threads: int = 1  # 0 = half the CPUs
    pigz_threads: int = 0  # 0 = gzip; 1 = half the CPUs; N = N threads
    bwlimit_kib: int = 0  # KiB/s, 0 = unlimited
    ionice: int = 7  # 0..8, 8 = idle class
    performance: Performance = Performance()
    fleecing: FleecingOption = FleecingOption()
    dirty_bitmap: bool = True  # incremental reads with dirty bitmaps (issue 8)
    lockwait_min: int = 180
    stopwait_min: int = 10
    # retention and archive extras
    prune_backups: PruneOptions | None = None  # None: not set here, falls back to keep-all
    remove: bool = True
    protected: bool = False
    notes_template: str | None = None
    # job behaviour
    script: Path | None = None
    quiet: bool = False
    stdout: bool = False
    mailto: tuple[str, ...] = ()
    mailnotification: str = "always"
    notification_mode: str = "auto"
    notification_policy: str | None = None  # deprecated
    notification_target: str | None = None  # deprecated
    job_id: str | None = None
    # guest selection
    all: bool = False
    vmid: tuple[int, ...] = ()
    exclude: tuple[int, ...] = ()
    pool: str | None = None
    node: str | None = None
    # containers only (accepted, ignored)
    stdexcludes: bool = True
    exclude_path: tuple[str, ...] = ()
    pbs_change_detection_mode: str | None = None

    @property
    def effective_prune(self) -> PruneOptions:
        return self.prune_backups if self.prune_backups is not None else KEEP_ALL

    @property
    def bwlimit_bytes_per_s(self) -> int:
        return self.bwlimit_kib * 1024


@dataclass(frozen=True, slots=True)
class OptionLayer:
    """The options one source sets (field name → typed value), and where it came from."""

    origin: str
    values: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


# -- value parsers: each takes text and returns a typed value or raises ValueError -------------


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "on", "true"):
        return True
    if lowered in ("0", "no", "off", "false"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use 0 or 1)")


def _int(low: int = 0, high: int = INT64_MAX) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return parse_integer(text, low, high)

    return parse


def _threads(text: str) -> int:
    """Threads of our own: more than the CPUs here cost memory (frames in flight) and win nothing."""
    value = parse_integer(text)
    cpus = os.cpu_count() or 1
    if value > cpus:
        raise ValueError(f"{value} threads are more than the {cpus} CPUs here")
    return value


def _enum(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _compress(text: str) -> str:
    """The one parser of compress values (:func:`qmpbackup.compress.parse_compress`), as a Compression value."""
    try:
        return parse_compress(text).value
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def _text(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("empty value")
    return value


def _path(text: str) -> Path:
    return Path(_text(text))


def _storage_id(text: str) -> str:
    value = text.strip()
    if not STORAGE_ID_RE.match(value):
        raise ValueError(f"{value!r} is not a valid storage ID")
    return value


def _vmid_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(check_vmid(item) for item in _LIST_SPLIT.split(text.strip()) if item)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _word_list(text: str) -> tuple[str, ...]:
    return tuple(item for item in _LIST_SPLIT.split(text.strip()) if item)


def _notes_template(text: str) -> str:
    if len(text) > NOTES_TEMPLATE_MAX:
        raise ValueError(f"longer than {NOTES_TEMPLATE_MAX} characters")
    if "\n" in text or "\r" in text:
        raise ValueError("must be one line (write a newline as \\n)")
    return text


def _performance(text: str) -> dict[str, int]:
    parts = parse_property_string(text, {"max-workers", "pbs-entries-max"})
    result: dict[str, int] = {}
    if "max-workers" in parts:
        result["max_workers"] = _int(1, 256)(parts["max-workers"])
    if "pbs-entries-max" in parts:
        result["pbs_entries_max"] = _int(1)(parts["pbs-entries-max"])
        log.info("performance: pbs-entries-max only concerns containers; ignored")
    return result


def _fleecing(text: str) -> FleecingOption:
    parts = parse_property_string(text, {"enabled", "storage"}, default_key="enabled")
    enabled = _bool(parts["enabled"]) if "enabled" in parts else False
    storage = _storage_id(parts["storage"]) if "storage" in parts else None
    if enabled and storage is None:
        raise ValueError("fleecing enabled=1 needs storage=<id>")
    return FleecingOption(enabled=enabled, storage=storage)


def _prune(text: str) -> PruneOptions:
    return parse_prune_spec(text)


@dataclass(frozen=True, slots=True)
class _Option:
    field: str | None  # None: accepted and dropped
    parse: Callable[[str], Any]
    containers_only: bool = False
    deprecated: str | None = None


# vzdump's option names → field and parser.
OPTIONS: Mapping[str, _Option] = MappingProxyType(
    {
        "all": _Option("all", _bool),
        "bwlimit": _Option("bwlimit_kib", _int(0, MAX_BWLIMIT_KIB)),
        "compress": _Option("compress", _compress),
        "dirty-bitmap": _Option("dirty_bitmap", _bool),
        "dumpdir": _Option("dumpdir", _path),
        "exclude": _Option("exclude", _vmid_list),
        "exclude-path": _Option("exclude_path", _word_list, containers_only=True),
        "fleecing": _Option("fleecing", _fleecing),
        "ionice": _Option("ionice", _int(0, 8)),
        "job-id": _Option("job_id", _text),
        "lockwait": _Option("lockwait_min", _int(0, MAX_WAIT_MIN)),
        "mailnotification": _Option(
            "mailnotification", _enum("always", "failure"), deprecated="use notification-mode"
        ),
        "mailto": _Option("mailto", _word_list),
        "maxfiles": _Option("prune_backups", lambda t: from_maxfiles(_int(1)(t)), deprecated="use prune-backups"),
        "mode": _Option("mode", _enum("snapshot", "suspend", "stop")),
        "node": _Option("node", _text),
        "notes-template": _Option("notes_template", _notes_template),
        "notification-mode": _Option(
            "notification_mode", _enum("auto", "legacy-sendmail", "notification-system")
        ),
        "notification-policy": _Option(
            "notification_policy", _enum("always", "failure", "never"), deprecated="use notification-mode"
        ),
        "notification-target": _Option("notification_target", _text, deprecated="use notification-mode"),
        "pbs-change-detection-mode": _Option(
            "pbs_change_detection_mode", _enum("legacy", "data", "metadata"), containers_only=True
        ),
        "performance": _Option("performance", _performance),
        "pigz": _Option("pigz_threads", _int(0)),
        "pool": _Option("pool", _text),
        "protected": _Option("protected", _bool),
        "prune-backups": _Option("prune_backups", _prune),
        "quiet": _Option("quiet", _bool),
        "remove": _Option("remove", _bool),
        "script": _Option("script", _path),
        "size": _Option(None, _int(500), deprecated="unused (LVM snapshot size)"),
        "stdexcludes": _Option("stdexcludes", _bool, containers_only=True),
        "stdout": _Option("stdout", _bool),
        "stopwait": _Option("stopwait_min", _int(0, MAX_WAIT_MIN)),
        "storage": _Option("storage", _storage_id),
        "tmpdir": _Option("tmpdir", _path),
        "vmid": _Option("vmid", _vmid_list),
        "zstd": _Option("zstd_threads", _threads),
    }
)

_FIELD_NAMES = frozenset(f.name for f in fields(VzdumpOptions))
assert all(o.field is None or o.field in _FIELD_NAMES for o in OPTIONS.values())


def parse_option(key: str, text: str) -> tuple[str | None, Any]:
    """Type one option: ``(field name, value)``; field None means accepted and ignored.

    Raises ValueError with a one-line message for an unknown key or a bad value.
    """
    option = OPTIONS.get(key)
    if option is None:
        raise ValueError(f"unknown option {key!r}")
    try:
        value = option.parse(text)
    except (PropertyStringError, PruneSpecError) as exc:
        raise ValueError(f"{key}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    return option.field, value


def layer_from_items(
    items: Iterable[tuple[str, str, int | None]], origin: str, path: str | None = None
) -> OptionLayer:
    """Build a layer from ``(key, text, line)`` items; errors name ``path`` and the line."""
    values: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    for key, text, line in items:
        try:
            name, value = parse_option(key, text)
        except ValueError as exc:
            raise ConfigError(str(exc), path, line) from None
        where = f"{path}:{line}: " if path is not None and line is not None else ""
        option = OPTIONS[key]
        if option.deprecated:
            log.warning("%s'%s' is deprecated: %s", where, key, option.deprecated)
        if option.containers_only:
            log.info("%s'%s' only concerns containers; ignored for VMs", where, key)
        if name is None:
            continue
        if name in set_by:
            raise ConfigError(f"'{key}' conflicts with '{set_by[name]}' (given before)", path, line)
        if name in ("storage", "dumpdir") and ({"storage", "dumpdir"} & set_by.keys()):
            raise ConfigError("'storage' and 'dumpdir' are mutually exclusive", path, line)
        values[name] = value
        set_by[name] = key
    return OptionLayer(origin, MappingProxyType(values))


def parse_vzdump_conf(text: str, path: str) -> OptionLayer:
    """Parse vzdump.conf text: ``key: value`` lines, ``#`` comments, blank lines."""
    items: list[tuple[str, str, int | None]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-z][a-z0-9-]*)\s*:\s*(.*?)\s*$", line)
        if m is None:
            raise ConfigError(f"expected 'key: value', got {line!r}", path, number)
        items.append((m.group(1), m.group(2), number))
    return layer_from_items(items, origin=path, path=path)


def load_vzdump_conf(config_dir: Path) -> OptionLayer:
    """``<config-dir>/vzdump.conf`` as a layer; a missing file is an empty layer."""
    path = config_dir / VZDUMP_CONF
    try:
        text = read_config_text(path)
    except FileNotFoundError:
        log.debug("no %s; using vzdump's defaults", path)
        return OptionLayer(str(path))
    return parse_vzdump_conf(text, str(path))


def layer_from_mapping(options: Mapping[str, str], origin: str) -> OptionLayer:
    """A layer from ``{vzdump option name: text}`` (command line, API-style callers)."""
    return layer_from_items(((k, v, None) for k, v in options.items()), origin)


def storage_layer(prune_backups: PruneOptions | None, origin: str) -> OptionLayer:
    """The storage's contribution: only its ``prune-backups`` (if it sets one)."""
    values = {} if prune_backups is None else {"prune_backups": prune_backups}
    return OptionLayer(origin, MappingProxyType(values))


def merge(*layers: OptionLayer) -> VzdumpOptions:
    """Apply layers lowest precedence first: vzdump.conf, storage, job, command line."""
    result = VzdumpOptions()
    for layer in layers:
        values = dict(layer.values)
        if "performance" in values:
            values["performance"] = replace(result.performance, **values["performance"])
        if "storage" in values or "dumpdir" in values:
            values.setdefault("storage", None)
            values.setdefault("dumpdir", None)
        result = replace(result, **values)
    return result


__all__ = [
    "OPTIONS",
    "FleecingOption",
    "OptionLayer",
    "Performance",
    "VzdumpOptions",
    "layer_from_items",
    "layer_from_mapping",
    "load_vzdump_conf",
    "merge",
    "parse_option",
    "parse_prune_spec",
    "parse_vzdump_conf",
    "storage_layer",
]
