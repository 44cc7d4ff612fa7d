"""Every kind of journal entry and the data it carries: the one list, checked on write and on read.

A kind's schema names each data key with its type; ``Journal.record`` refuses data that does
not match (a programming error), and the reader marks an entry that does not match (a
journal written by another version, or damaged) so that cleanup names it and keeps it
instead of guessing. Extra keys a later version may add are allowed on read, never on write.

``where`` says what a resource depends on, which decides what happens when the QEMU the
entry belongs to is gone (:mod:`qmpbackup.recovery.replay`):

- ``qemu``: it lives inside QEMU and went with it (nodes, jobs, bitmaps, exports, ...);
- ``qemu-file``: a file or volume QEMU may hold open (delete it only once that QEMU is
  gone or has let go of it);
- ``host``: ours alone (archive ``.dat`` files, run folders, stop mode's instant copies of disks,
  a freeze reached through the agent, a VM stop mode shut down and must start again).

The undo step of each kind is in :mod:`qmpbackup.recovery.steps`; docs/format.md section J
lists the same kinds for readers of the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Where = Literal["qemu", "qemu-file", "host"]


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of entry: its name, its data keys (key → type; ``None`` allowed where listed)."""

    name: str
    keys: Mapping[str, type]
    where: Where
    nullable: frozenset[str] = frozenset()
    step_timeout: float | None = None  # seconds its undo step may take, where longer than replay's default

    def problem(self, data: Mapping[str, Any], *, exact: bool = False) -> str | None:
        """Why ``data`` does not fit this kind, or None. ``exact``: no extra keys either."""
        for key, typ in self.keys.items():
            if key not in data:
                return f"missing key {key!r}"
            value = data[key]
            if value is None and key in self.nullable:
                continue
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                return f"key {key!r} is {type(value).__name__}, not {typ.__name__}"
            if isinstance(value, list) and not all(isinstance(item, str) for item in value):
                return f"key {key!r} is not a list of strings"
        if exact and (extra := sorted(set(data) - set(self.keys))):
            return f"unknown key {extra[0]!r}"
        return None


BLOCKDEV = Kind("blockdev", {"node": str}, "qemu")
BLOCKJOB = Kind("blockjob", {"job": str}, "qemu")
BITMAP = Kind("bitmap", {"node": str, "name": str}, "qemu")
PAUSE = Kind("pause", {"qmp": str}, "qemu")
FREEZE = Kind("freeze", {"qga": str, "vm": str}, "host")
DRIVE_FILTER = Kind("drive-filter", {"qdev": str, "qom_path": str, "original": str, "filter": str}, "qemu")
BLOCK_EXPORT = Kind("block-export", {"id": str}, "qemu")
NBD_SERVER = Kind("nbd-server", {"socket": str}, "qemu")
FLEECING_IMAGE = Kind("fleecing-image", {
    "storeid": str, "storage_type": str, "name": str, "path": str, "format": str, "size": int,
    "alloc_size": int, "cluster_size": int, "preallocation": str, "volume": str}, "qemu-file",
    nullable=frozenset({"volume"}))
OUTPUT_FILE = Kind("output-file", {"path": str}, "host")
RUN_FOLDER = Kind("run-folder", {"path": str}, "host")
# stop mode's point-in-time copy of a disk (a reflink clone, an LVM-thin or ZFS snapshot)
INSTANT_COPY = Kind("instant-copy", {"method": str, "path": str}, "host")
# stop mode shut the running VM down: it is started again with ``start`` (its definition's command,
# a list of strings) unless it answers on ``qmp``; recorded before the shutdown
STOPPED_VM = Kind("stopped-vm", {"vmid": int, "qmp": str, "start": list}, "host", step_timeout=240.0)
# qmpbackup export --daemon and qmpbackup mount (the host journal, not a VM's)
EXPORT_DAEMON = Kind("export-daemon", {"socket": str, "pidfile": str, "pid": int, "create_time": float}, "host",
                     frozenset({"pid", "create_time"}))
MOUNT_DIR = Kind("mount-dir", {"path": str}, "host")
FUSE_EXPORT = Kind("fuse-export", {"fuse": str, "pidfile": str}, "host")
LOOP_DEVICE = Kind("loop-device", {"backing": str}, "host")
MOUNT = Kind("mount", {"mountpoint": str}, "host")
MOUNTED = Kind("mounted", {"mountpoint": str, "archive": str, "drive": str, "device": str}, "host")

#: The registry: a kind not listed here cannot be recorded.
KINDS: dict[str, Kind] = {k.name: k for k in (
    BLOCKDEV, BLOCKJOB, BITMAP, PAUSE, FREEZE, DRIVE_FILTER, BLOCK_EXPORT, NBD_SERVER, FLEECING_IMAGE,
    OUTPUT_FILE, RUN_FOLDER, INSTANT_COPY, STOPPED_VM, EXPORT_DAEMON, MOUNT_DIR, FUSE_EXPORT, LOOP_DEVICE, MOUNT,
    MOUNTED)}


def entry_problem(kind: str, data: Mapping[str, Any], *, exact: bool = False) -> str | None:
    """Why an entry of ``kind`` with ``data`` is not valid, or None."""
    known = KINDS.get(kind)
    if known is None:
        return f"unknown kind {kind!r}"
    return known.problem(data, exact=exact)
