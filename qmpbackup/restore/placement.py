"""Where each restored image goes and what it is called, decided before any byte is written.

Images are named as Proxmox names them, ``vm-<vmid>-disk-<n>.<fmt>``, numbered
per directory in device order, so a repeated restore of the same archive
lands on the same names (and is refused unless ``--force``). The directory is
``--target-dir``, or ``<path>/images/<vmid>`` of the storage given by
``--storage``, else of the storage the map line names (``local`` when empty),
as Proxmox does. Work files are hidden (leading dot) and carry a suffix no
Proxmox volume pattern matches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.jobs.storage_cfg import Storage
from qmpbackup.restore.device_map import MappedDevice
from qmpbackup.errors import UsageError

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")
DEFAULT_STOREID = "local"
TEMP_SUFFIX = ".restore-tmp"
STAGING_SUFFIX = ".restore-raw"
OLD_SUFFIX = ".restore-old"


class StorageChoiceError(UsageError):
    """A storage cannot hold VM images (unknown, disabled, no ``images`` content, not file based): exit 2."""


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """One device's image: final name, work names, format and the volume string for the config."""

    mapped: MappedDevice
    format: str
    final: Path

    @property
    def virtdev(self) -> str:
        return self.mapped.virtdev

    @property
    def size(self) -> int:
        return self.mapped.device.size

    @property
    def temp(self) -> Path:
        """The finished image before its rename."""
        return work_name(self.final, TEMP_SUFFIX)

    @property
    def staging(self) -> Path:
        """Where clusters are written: the temp itself for raw, a raw file converted from for qcow2."""
        return work_name(self.final, STAGING_SUFFIX) if self.format != "raw" else self.temp

    @property
    def volume(self) -> str:
        return str(self.final)


def work_name(final: Path, suffix: str) -> Path:
    return final.with_name(f".{final.name}{suffix}")


def image_dir_of(storages: Mapping[str, Storage], storeid: str, vmid: int) -> Path:
    """``<path>/images/<vmid>`` of a storage that may hold VM images."""
    storage = storages.get(storeid)
    if storage is None:
        raise StorageChoiceError(f"storage '{storeid}' does not exist (use --storage ID or --target-dir DIR)")
    if storage.disable:
        raise StorageChoiceError(f"storage '{storeid}' is disabled")
    if "images" not in storage.content:
        raise StorageChoiceError(
            f"storage '{storeid}' does not support VM images (content has no 'images'); "
            "use --storage ID or --target-dir DIR"
        )
    if storage.path is None:
        raise StorageChoiceError(
            f"storage '{storeid}' ({storage.type}) is not a file storage; only file storages are supported"
        )
    return storage.path / "images" / str(vmid)


def choose_format(requested: str | None, mapped: MappedDevice) -> str:
    """``--format``, else the map line's format when we can write it, else raw."""
    if requested is not None:
        return requested
    if mapped.format in FORMATS:
        return mapped.format
    if mapped.format:
        log.warning("%s: format '%s' is not supported for restore; writing raw", mapped.virtdev, mapped.format)
    return "raw"


def plan_images(
    mapped: Sequence[MappedDevice],
    vmid: int,
    *,
    target_dir: Path | None,
    storage: str | None,
    storages: Mapping[str, Storage] | None,
    image_format: str | None,
) -> list[ImagePlan]:
    """One plan per device; ``storages`` is needed unless ``target_dir`` is given."""
    counters: dict[Path, int] = {}
    plans: list[ImagePlan] = []
    for entry in mapped:
        if target_dir is not None:
            directory = target_dir
        else:
            assert storages is not None
            directory = image_dir_of(storages, storage or entry.storeid or DEFAULT_STOREID, vmid)
        fmt = choose_format(image_format, entry)
        index = counters.get(directory, 0)
        counters[directory] = index + 1
        plans.append(ImagePlan(entry, fmt, directory / f"vm-{vmid}-disk-{index}.{fmt}"))
    return plans
