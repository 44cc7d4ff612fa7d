"""sha256 of each device's full content (zeros included), computed while the archive streams by.

Clusters may arrive in any order, but a hash must see the bytes in order.
Each device hashes up to its "frontier" (the lowest cluster not hashed yet):
a cluster that arrives at the frontier is hashed at once, followed by any
held ones it unblocks. A cluster that arrives early is held: a zero cluster
needs no data, a data cluster gets the next 64 KiB slot of a temporary file
(appended, so the file is never larger than the data held, however far into
the device the cluster lies; blocks the archive left out stay holes). Which
clusters are held, and in which slots, is a run map sharing the reader's run
budget, so memory stays bounded whatever the order; archives written in order
(ours, and Proxmox's for an idle disk) hold nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from qmpbackup.vma import format as fmt
from qmpbackup.vma.cluster_map import ClusterMap, RunBudget
from qmpbackup.vma.header import DeviceInfo

log = logging.getLogger(__name__)

_ALL_RUNS = ((0, fmt.CLUSTER_SIZE),)


class DeviceHasher:
    """Streaming sha256 of one device; feed clusters in any order, then read ``hexdigest``."""

    def __init__(self, device: DeviceInfo, temp_dir: Path | None = None, budget: RunBudget | None = None) -> None:
        self.device = device
        self._hash = hashlib.sha256()
        self._frontier = 0
        self._held = ClusterMap(device.clusters, budget=budget, values=True)  # value: spill slot, -1 = zeros
        self._temp_dir = temp_dir
        self._spill: int = -1  # fd of the spill file, opened on first need
        self._slots = 0  # slots used in the spill file
        self.spilled_bytes = 0

    def _length(self, cluster: int) -> int:
        return min(fmt.CLUSTER_SIZE, self.device.size - cluster * fmt.CLUSTER_SIZE)

    def add(self, cluster: int, data: bytes | memoryview | None, mask: int = fmt.FULL_MASK) -> None:
        """One cluster as the reader yields it (``data`` None = all zero, ``mask`` its stored blocks); each once."""
        if cluster != self._frontier:
            self._hold(cluster, data, mask)
            return
        length = self._length(cluster)
        self._hash.update(memoryview(data)[:length] if data is not None else fmt.ZERO_CLUSTER[:length])
        self._frontier += 1
        if self._held.runs:
            self._drain()

    def _hold(self, cluster: int, data: bytes | memoryview | None, mask: int) -> None:
        if data is None or not mask:
            self._held.add(cluster)
            return
        slot = self._slots
        self._held.add(cluster, slot)  # first: over the budget, nothing is written
        self._slots += 1
        if self._spill < 0:
            fd, name = tempfile.mkstemp(prefix="qmpbackup-verify-", dir=self._temp_dir)
            os.unlink(name)  # anonymous: gone when closed, whatever happens
            self._spill = fd
        view = memoryview(data)
        base = slot * fmt.CLUSTER_SIZE
        for start, end in _ALL_RUNS if mask == fmt.FULL_MASK else fmt.stored_runs(mask):
            chunk, offset = view[start:end], base + start
            while chunk:
                n = os.pwrite(self._spill, chunk, offset)
                chunk, offset = chunk[n:], offset + n
            self.spilled_bytes += end - start

    def _drain(self) -> None:
        while (run := self._held.first_run()) is not None and run[0] == self._frontier:
            start, end, slot = run
            for cluster in range(start, end):
                length = self._length(cluster)
                if slot < 0:
                    self._hash.update(fmt.ZERO_CLUSTER[:length])
                    continue
                data = os.pread(self._spill, length, (slot + cluster - start) * fmt.CLUSTER_SIZE)
                # a hole (or past the file's end) reads as zeros or short
                self._hash.update(data + fmt.ZERO_CLUSTER[: length - len(data)])
            self._held.pop_first()
            self._frontier = end

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
