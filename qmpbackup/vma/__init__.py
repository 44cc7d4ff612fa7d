"""The Proxmox VMA archive format: a streaming writer and a validating reader.

The byte layout is documented in ``docs/format.md``; this package knows
nothing of QEMU, only bytes.
"""

from qmpbackup.vma.errors import VmaError, VmaFormatError
from qmpbackup.vma.format import BLOCK_SIZE, CLUSTER_SIZE
from qmpbackup.vma.header import DeviceInfo, VmaHeader
from qmpbackup.vma.reader import ByteSource, Cluster, Extent, VmaReader
from qmpbackup.vma.writer import ByteSink, VmaWriter

__all__ = [
    "BLOCK_SIZE",
    "CLUSTER_SIZE",
    "ByteSink",
    "ByteSource",
    "Cluster",
    "DeviceInfo",
    "Extent",
    "VmaError",
    "VmaFormatError",
    "VmaHeader",
    "VmaReader",
    "VmaWriter",
]
