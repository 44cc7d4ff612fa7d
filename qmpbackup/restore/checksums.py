"""sha256 of each device's full content (zeros included), computed while the archive streams by.

Clusters may arrive in any order, but a hash must see the bytes in order.
Each device hashes up to its "frontier" (the lowest cluster not hashed yet):
a cluster that arrives at the frontier is hashed at once, followed by any
held ones it unblocks. A cluster that arrives early is held: its data goes
into a sparse temporary file at its own offset (zero clusters need no data,
the hole reads as zero) and one bit records that it arrived. Memory is thus
one bit per cluster (32 KiB per TiB of disk) whatever the order; disk use is
the data that arrived early, which is nothing for archives written in order
(ours, and Proxmox's for an idle disk).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from qmpbackup.vma import format as fmt
from qmpbackup.vma.cluster_map import ClusterMap
from qmpbackup.vma.header import DeviceInfo

log = logging.getLogger(__name__)

_ZERO_CLUSTER = bytes(fmt.CLUSTER_SIZE)


class DeviceHasher:
    """Streaming sha256 of one device; feed clusters in any order, then read ``hexdigest``."""

    def __init__(self, device: DeviceInfo, temp_dir: Path | None = None) -> None:
        self.device = device
        self._hash = hashlib.sha256()
        self._frontier = 0
        self._held = ClusterMap(device.clusters)
        self._held_count = 0
        self._temp_dir = temp_dir
        self._spill: int = -1  # fd of the sparse file for early clusters, opened on first need
        self.spilled_bytes = 0

    def _length(self, cluster: int) -> int:
        return min(fmt.CLUSTER_SIZE, self.device.size - cluster * fmt.CLUSTER_SIZE)

    def add(self, cluster: int, data: bytes | memoryview | None) -> None:
        """One cluster as the reader yields it (``data`` None = all zero); each cluster once."""
        if cluster != self._frontier:
            self._hold(cluster, data)
            return
        length = self._length(cluster)
        self._hash.update(memoryview(data)[:length] if data is not None else _ZERO_CLUSTER[:length])
        self._frontier += 1
        if self._held_count:
            self._drain()

    def _hold(self, cluster: int, data: bytes | memoryview | None) -> None:
        self._held.add(cluster)
        self._held_count += 1
        if data is None:
            return
        if self._spill < 0:
            fd, name = tempfile.mkstemp(prefix="qmpbackup-verify-", dir=self._temp_dir)
            os.unlink(name)  # anonymous: gone when closed, whatever happens
            self._spill = fd
        view = memoryview(data)
        offset = cluster * fmt.CLUSTER_SIZE
        while view:
            n = os.pwrite(self._spill, view, offset)
            view, offset = view[n:], offset + n
        self.spilled_bytes += len(data)

    def _drain(self) -> None:
        while self._held_count and self._frontier in self._held:
            cluster = self._frontier
            length = self._length(cluster)
            data = os.pread(self._spill, length, cluster * fmt.CLUSTER_SIZE) if self._spill >= 0 else b""
            # a hole (or past the file's end) reads short or as zeros
            self._hash.update(data + _ZERO_CLUSTER[: length - len(data)])
            self._held_count -= 1
            self._frontier += 1

    @property
    def complete(self) -> bool:
        return self._frontier >= self.device.clusters

    def hexdigest(self) -> str:
        if not self.complete:
            raise ValueError(f"{self.device.name}: cluster {self._frontier} was never added")
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._spill >= 0:
            with contextlib.suppress(OSError):
                os.close(self._spill)
            self._spill = -1
