"""What ``vma list``, ``vma config`` and ``vma verify`` compute; printing is the CLI's job."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from qmpbackup.render import display_name
from qmpbackup.vma import format as fmt
from qmpbackup.vma.errors import VmaError
from qmpbackup.vma.reader import VmaReader

DEFAULT_CONFIG = "qemu-server.conf"


def format_ctime(ctime: int) -> str:
    """ctime(3) in local time, as Proxmox's ``vma list`` prints it (``Mon May 20 18:11:49 2024``)."""
    try:
        return time.ctime(ctime)
    except (OverflowError, ValueError, OSError):
        return str(ctime)  # far outside what the C library can show


def list_lines(reader: VmaReader) -> list[str]:
    """The ``vma list`` lines: configs, devices, then the creation time."""
    lines = [f"CFG: size: {len(data)} name: {display_name(name, keep_bytes=True)}"
             for name, data in reader.header.configs]
    for dev in reader.header.devices:
        if dev.is_vmstate:
            lines.append(f"VMSTATE: dev_id={dev.dev_id} memory: {dev.size}")
        else:
            name = display_name(dev.name, keep_bytes=True)
            lines.append(f"DEV: dev_id={dev.dev_id} size: {dev.size} devname: {name}")
    lines.append(f"CTIME: {format_ctime(reader.ctime)}")
    return lines


def config_data(reader: VmaReader, name: str = DEFAULT_CONFIG) -> bytes:
    """One config file's bytes; the first one of that name, as the Proxmox tool does."""
    for config_name, data in reader.header.configs:
        if config_name == name:
            return data
    raise VmaError(f"unable to find configuration data '{name}'")


@dataclass(slots=True)
class DeviceStats:
    name: str
    size: int
    clusters: int
    zero_clusters: int = 0
    stored_blocks: int = 0


@dataclass(slots=True)
class VerifyResult:
    extents: int = 0
    archive_bytes: int = 0
    devices: dict[int, DeviceStats] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        for dev_id, st in self.devices.items():
            stored = st.stored_blocks * fmt.BLOCK_SIZE
            sparse = 100.0 * (1 - stored / st.size) if st.size else 0.0
            out.append(
                f"VERIFY: dev_id={dev_id} devname: {display_name(st.name, keep_bytes=True)} clusters: {st.clusters} "
                f"zero clusters: {st.zero_clusters} stored: {stored} bytes ({sparse:.1f}% sparse)"
            )
        out.append(f"VERIFY: {self.extents} extents, {self.archive_bytes} archive bytes (uncompressed), OK")
        return out


def verify(reader: VmaReader) -> VerifyResult:
    """Read everything with all checks, including that no cluster is missing.

    Stricter than Proxmox's ``vma verify``, which skips the missing-cluster
    check: an archive cut off at an extent boundary would otherwise pass.
    """
    result = VerifyResult(
        devices={dev.dev_id: DeviceStats(dev.name, dev.size, dev.clusters) for dev in reader.header.devices}
    )
    for extent in reader.extents(check_missing=True):
        result.extents += 1
        for cluster in extent.clusters:
            st = result.devices[cluster.dev_id]
            if cluster.mask == 0:
                st.zero_clusters += 1
            st.stored_blocks += cluster.mask.bit_count()
    result.archive_bytes = reader.offset
    return result
