"""What ``vma list``, ``vma config`` and ``vma verify`` compute; printing is the CLI's job."""

from __future__ import annotations

import time

from qmpbackup.render import display_name
from qmpbackup.vma.errors import VmaError
from qmpbackup.vma.progress import ExtractProgress
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


def verify(reader: VmaReader, progress: ExtractProgress | None = None) -> None:
    """Read everything with all checks, including that no cluster is missing.

    Stricter than Proxmox's ``vma verify``, which skips the missing-cluster
    check: an archive cut off at an extent boundary would otherwise pass.
    With ``progress``, each cluster is counted as Proxmox's ``vma verify -v`` counts it.
    """
    if progress is not None:
        progress.start()
    for extent in reader.extents(check_missing=True):
        if progress is not None:
            for cluster in extent.clusters:
                progress.cluster(cluster.dev_id, cluster.cluster_num, cluster.mask)
    if progress is not None:
        progress.finish()
