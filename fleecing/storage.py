"""Which storage holds the fleecing images, in what format, and whether it may hold them at all.

The space rule (checked before any QEMU change; :func:`check_space`):

* The fleecing image of a disk holds the old data of every block the guest overwrites
  before the backup has read it: at worst the whole disk. ``needed`` = the sum of the
  sizes of the disks being backed up.
* **Refused** when the storage cannot give space back or reserves it up front and has
  less than ``needed`` free: no discard (the images only grow), thick allocation
  (``preallocation=falloc|full``, a non-sparse zvol, a non-thin filesystem).
* **Refused** when less than :data:`MIN_FREE_BYTES` is free on any storage.
* **Allowed with a warning** when the storage is thin *and* gives space back (discard)
  but has less than ``needed`` free: the backup discards what it has read, so the peak
  is what the guest overwrites ahead of the backup. If that outgrows the storage, the
  backup fails and the guest does not (``on-cbw-error: break-snapshot``).
* Without discard we warn and use qcow2 with ``preallocation=off`` (qcow2 at least only
  allocates what is written, as vzdump's documentation advises for NFS before 4.2).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleecing.errors import FleecingConfigError, FleecingSpaceError
from fleecing.probe import SpaceProbe, probe_directory
from fleecing.runner import Runner, run_command
from qmpbackup.jobs.storage_cfg import Storage

log = logging.getLogger(__name__)

#: Storages whose volumes are files below ``path``: qcow2 fleecing images.
FILE_TYPES = frozenset({"dir", "nfs", "cifs", "btrfs", "glusterfs"})
#: Block storages we can allocate on: raw fleecing volumes.
BLOCK_TYPES = frozenset({"lvmthin", "zfspool"})
#: Below this much free space no storage is used for fleecing.
MIN_FREE_BYTES = 4 << 20
DEFAULT_CLUSTER_SIZE = 64 << 10
QCOW2_PREALLOCATIONS = frozenset({"off", "metadata", "falloc", "full"})
_THICK = frozenset({"falloc", "full"})


@dataclass(frozen=True, slots=True)
class FleecingPlan:
    """How images are made on one storage, and what the probe said about it."""

    storage: Storage
    format: str  # qcow2 | raw
    preallocation: str
    cluster_size: int
    probe: SpaceProbe
    warnings: tuple[str, ...] = ()

    @property
    def storeid(self) -> str:
        return self.storage.storeid


def fleecing_storage(storages: Mapping[str, Storage], storeid: str) -> Storage:
    """The storage ``storeid``, checked to be one we can put fleecing images on."""
    storage = storages.get(storeid)
    if storage is None:
        raise FleecingConfigError(f"fleecing storage '{storeid}' does not exist in storage.cfg")
    where = f" ({storage.origin})" if storage.origin else ""
    if storage.disable:
        raise FleecingConfigError(f"fleecing storage '{storeid}' is disabled{where}")
    if storage.type not in FILE_TYPES | BLOCK_TYPES:
        raise FleecingConfigError(
            f"fleecing storage '{storeid}' is of type {storage.type}; supported:"
            f" {', '.join(sorted(FILE_TYPES | BLOCK_TYPES))}{where}"
        )
    if "images" not in storage.content:
        raise FleecingConfigError(f"fleecing storage '{storeid}' does not allow disk images (content){where}")
    if storage.type == "lvmthin" and not (storage.vgname and storage.thinpool):
        raise FleecingConfigError(f"lvmthin storage '{storeid}' needs 'vgname' and 'thinpool'{where}")
    if storage.type == "zfspool" and not storage.pool:
        raise FleecingConfigError(f"zfspool storage '{storeid}' needs 'pool'{where}")
    return storage


def _zfs_blocksize(text: str | None) -> int:
    if not text:
        return 16 << 10
    units = {"k": 10, "m": 20}
    t = text.strip().lower()
    if t[-1:] in units:
        return int(t[:-1]) << units[t[-1]]
    return int(t)


async def probe_storage(storage: Storage, runner: Runner = run_command) -> SpaceProbe:
    """Free space and features of a fleecing storage (file storages by experiment)."""
    if storage.type in FILE_TYPES:
        assert storage.path is not None
        images = storage.path / "images"
        directory = images if images.is_dir() else storage.path
        if not directory.is_dir():
            raise FleecingConfigError(f"fleecing storage '{storage.storeid}': {storage.path} does not exist")
        return probe_directory(directory)
    if storage.type == "lvmthin":
        out = await runner(["lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", ";",
                            "-o", "lv_size,data_percent,discards", f"{storage.vgname}/{storage.thinpool}"])
        size_text, pct_text, discards = (f.strip() for f in out.strip().split(";"))
        size = int(float(size_text))
        used = int(size * float(pct_text or 0) / 100)
        return SpaceProbe(where=f"{storage.vgname}/{storage.thinpool}", device=None, fstype="lvmthin",
                          thin=True, discard=discards != "ignore", rotational=None,
                          free_bytes=size - used, total_bytes=size)
    out = await runner(["zfs", "get", "-Hp", "-o", "value", "available,used", str(storage.pool)])
    avail, used = (int(v) for v in out.split())
    return SpaceProbe(where=str(storage.pool), device=None, fstype="zfs", thin=storage.sparse, discard=True,
                      rotational=None, free_bytes=avail, total_bytes=avail + used)


def image_format(storage: Storage) -> str:
    return "qcow2" if storage.type in FILE_TYPES else "raw"


def check_space(storage: Storage, probe: SpaceProbe, disk_sizes: Sequence[int],
                cluster_size: int = DEFAULT_CLUSTER_SIZE) -> FleecingPlan:
    """Apply the space rule of the module docstring; raise or return the plan with its warnings."""
    sid = storage.storeid
    needed = sum(disk_sizes)
    fmt = image_format(storage)
    warnings: list[str] = []
    prealloc = storage.options.get("preallocation", "metadata") if fmt == "qcow2" else "off"
    if prealloc not in QCOW2_PREALLOCATIONS:
        raise FleecingConfigError(f"fleecing storage '{sid}': unknown preallocation {prealloc!r}")
    if fmt == "qcow2" and not probe.discard:
        warnings.append(f"fleecing storage '{sid}' does not support discard: space is only given back"
                        " when the backup ends (using qcow2 with preallocation=off)")
        prealloc = "off"
    thick = (not probe.thin) or prealloc in _THICK
    free_text = f"{_mib(probe.free_bytes)} free, the disks have {_mib(needed)}"
    if probe.free_bytes < MIN_FREE_BYTES * max(1, len(disk_sizes)):
        raise FleecingSpaceError(f"fleecing storage '{sid}' is (nearly) full: {free_text}",
                                 sid, probe.free_bytes, needed)
    if (thick or not probe.discard) and probe.free_bytes < needed:
        why = "allocates images in full" if thick else "cannot give space back (no discard)"
        raise FleecingSpaceError(f"fleecing storage '{sid}' {why} and is too small: {free_text}",
                                 sid, probe.free_bytes, needed)
    if probe.free_bytes < needed:
        warnings.append(f"fleecing storage '{sid}' has {free_text}: if the guest overwrites more than"
                        " that before it is backed up, the backup fails (the guest does not)")
    if storage.type == "zfspool":
        cluster_size = max(cluster_size, _zfs_blocksize(storage.blocksize))
    return FleecingPlan(storage=storage, format=fmt, preallocation=prealloc, cluster_size=cluster_size,
                        probe=probe, warnings=tuple(warnings))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


async def plan_fleecing(storage: Storage, disk_sizes: Sequence[int], runner: Runner = run_command,
                        cluster_size: int = DEFAULT_CLUSTER_SIZE) -> FleecingPlan:
    """Probe ``storage`` and apply the space rule: the one call before a backup touches QEMU.

    The plan's warnings are for the caller's task log (logging them here too printed them twice).
    """
    return check_space(storage, await probe_storage(storage, runner), disk_sizes, cluster_size)


def images_dir(storage: Storage, vmid: int) -> Path:
    """Proxmox's layout: ``<path>/images/<vmid>/``."""
    assert storage.path is not None
    return storage.path / "images" / str(vmid)
