"""Which archive device becomes which drive: the ``#qmdump#map:`` lines of ``qemu-server.conf``.

Proxmox's restore needs exactly one map line per archived device, and every
map line must name a device that is in the archive; the errors use Proxmox's
wording so that users recognise them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from qmpbackup.render import display_name
from qmpbackup.restore.errors import DeviceMapError
from qmpbackup.vma.header import DeviceInfo

log = logging.getLogger(__name__)

MAP_PREFIX = "#qmdump#map:"
_VIRTDEV_RE = re.compile(r"(ide|sata|scsi|virtio|efidisk|tpmstate)\d{1,2}")


@dataclass(frozen=True, slots=True)
class MapLine:
    """One ``#qmdump#map:<virtdev>:<devname>:<storeid>:<format>:`` line (empty fields kept empty)."""

    virtdev: str
    devname: str
    storeid: str
    format: str


@dataclass(frozen=True, slots=True)
class MappedDevice:
    """An archive device and the drive it restores to."""

    device: DeviceInfo
    virtdev: str
    storeid: str  # "" when the map line left it empty
    format: str  # "" when the map line left it empty


def parse_map_lines(config_text: str) -> list[MapLine]:
    """The map lines in file order; malformed ones are logged and skipped (they map nothing)."""
    lines: list[MapLine] = []
    for number, raw in enumerate(config_text.splitlines(), start=1):
        line = raw.strip()
        if not line.startswith(MAP_PREFIX):
            continue
        fields = line[len(MAP_PREFIX) :].split(":")
        if len(fields) != 5 or fields[4] != "" or not fields[0] or not fields[1] or any(
            c.isspace() for c in line
        ):
            log.warning("qemu-server.conf line %d: ignoring malformed map line %r", number, line)
            continue
        lines.append(MapLine(fields[0], fields[1], fields[2], fields[3]))
    return lines


def map_devices(config_text: str, devices: Iterable[DeviceInfo]) -> list[MappedDevice]:
    """Pair every archive device with its map line, in device order.

    :raise DeviceMapError: a map line names a device the archive lacks, a
        device has no map line, or a drive or device is mapped twice.
    """
    by_name = {dev.name: dev for dev in devices if not dev.is_vmstate}
    seen_virtdev: set[str] = set()
    by_devname: dict[str, MapLine] = {}
    for entry in parse_map_lines(config_text):
        if not _VIRTDEV_RE.fullmatch(entry.virtdev):
            raise DeviceMapError(f"map line names an unknown drive '{entry.virtdev}'")
        if entry.virtdev in seen_virtdev:
            raise DeviceMapError(f"drive '{entry.virtdev}' is mapped twice in qemu-server.conf")
        if entry.devname in by_devname:
            raise DeviceMapError(f"device '{display_name(entry.devname)}' is mapped twice in qemu-server.conf")
        if entry.devname not in by_name:
            raise DeviceMapError(f"archive does not contain data for drive '{entry.virtdev}'")
        seen_virtdev.add(entry.virtdev)
        by_devname[entry.devname] = entry
    mapped: list[MappedDevice] = []
    for name, dev in by_name.items():
        line = by_devname.get(name)
        if line is None:
            raise DeviceMapError(f"found no device mapping information for device '{display_name(name)}'")
        mapped.append(MappedDevice(dev, line.virtdev, line.storeid, line.format))
    return sorted(mapped, key=lambda m: m.device.dev_id)
