"""``-v`` progress of ``vma create`` and ``vma extract``, in the Proxmox tool's line formats.

The counters follow the definitions of Proxmox's C tool, so the
numbers in the lines mean the same as Proxmox's; the lines go to an ``emit``
callback (the CLI prints them: create to stderr, extract to stdout, as the C
tool does). A progress line is emitted only when the whole percentage
changes, so a disk of any size gives at most about a hundred of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qmpbackup.vma import format as fmt
from qmpbackup.vma.header import DeviceInfo

Emit = Callable[[str], None]


def zero_bytes(data: bytes | bytearray | memoryview | None, valid: int) -> int:
    """Bytes of a cluster counted as zero the way the C writer counts them.

    Every 4 KiB block that is all zero or starts at/after ``valid`` (the
    device end) counts whole; None (a hole) is a whole zero cluster. The
    writer keeps its masks to itself, so ``create -v`` counts again here; a
    block whose first byte is not zero needs no full comparison.
    """
    if data is None:
        return fmt.CLUSTER_SIZE
    view = data if isinstance(data, memoryview) else memoryview(data)
    if fmt.ZERO_CLUSTER.startswith(view[:valid]):
        return fmt.CLUSTER_SIZE
    zero = 0
    firsts = view[:valid:fmt.BLOCK_SIZE].tobytes()
    for block in range(fmt.BLOCKS_PER_CLUSTER):
        start = block * fmt.BLOCK_SIZE
        if start >= valid:
            zero += fmt.BLOCK_SIZE
        elif firsts[block] == 0 and fmt.ZERO_BLOCK.startswith(view[start : min(start + fmt.BLOCK_SIZE, valid)]):
            zero += fmt.BLOCK_SIZE
    return zero


@dataclass(slots=True)
class _Stream:
    name: str
    size: int
    transferred: int = 0
    zero_bytes: int = 0


class CreateProgress:
    """``vma create -v``: ``progress P% DONE/TOTAL ZEROS`` lines, then one ``image`` line per device."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._streams: dict[int, _Stream] = {}
        self._total = 0
        self._transferred = 0
        self._zero = 0
        self._last_percent = -1

    def add_device(self, dev_id: int, name: str, size: int) -> None:
        self._streams[dev_id] = _Stream(name, size)
        self._total += size

    def cluster(self, dev_id: int, cluster_num: int, data: bytes | bytearray | memoryview | None) -> None:
        """Count one cluster handed to the writer (before the writer sees it)."""
        stream = self._streams[dev_id]
        offset = cluster_num * fmt.CLUSTER_SIZE
        valid = min(fmt.CLUSTER_SIZE, stream.size - offset)
        zero = zero_bytes(data, valid)
        stream.transferred += valid
        stream.zero_bytes += zero
        self._transferred += valid
        self._zero += zero
        percent = self._transferred * 100 // self._total if self._total else 100
        if percent != self._last_percent:
            self._last_percent = percent
            self._emit(f"progress {percent}% {self._transferred}/{self._total} {self._zero}")

    def summary(self) -> list[str]:
        return [
            f"image {s.name}: size={s.size} zeros={s.zero_bytes} saved={s.size - s.zero_bytes}"
            for s in self._streams.values()
        ]

    def finish(self) -> None:
        for line in self.summary():
            self._emit(line)


class ExtractProgress:
    """``vma extract -v``: ``progress P% (read N bytes, duration S sec)`` lines and the closing statistics.

    As in the C reader, the percentage is cluster slots read (of every device,
    restored or skipped) over the sum of whole clusters of the disks, and the
    sparse bytes are the blocks a slot leaves out, cut at the device's last
    whole sector.
    """

    def __init__(self, devices: Sequence[DeviceInfo], emit: Emit, clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._clock = clock
        self._start = clock()
        self._ends = {dev.dev_id: (None if dev.is_vmstate else dev.size // fmt.SECTOR_SIZE * fmt.SECTOR_SIZE)
                      for dev in devices}
        self._cluster_count = sum(dev.size // fmt.CLUSTER_SIZE for dev in devices if not dev.is_vmstate)
        self._clusters_read = 0
        self._last_percent = 0
        self.zero_data = 0
        self.partial_zero_data = 0

    def start(self) -> None:
        """The duration in the lines counts from here (after the map is read)."""
        self._start = self._clock()

    def cluster(self, dev_id: int, cluster_num: int, mask: int) -> None:
        self._clusters_read += 1
        if self._cluster_count:
            percent = self._clusters_read * 100 // self._cluster_count
            if percent != self._last_percent:
                self._last_percent = percent
                self._emit(
                    f"progress {percent}% (read {self._clusters_read * fmt.CLUSTER_SIZE} bytes, "
                    f"duration {int(self._clock() - self._start)} sec)"
                )
        if mask == fmt.FULL_MASK:
            return
        start = cluster_num * fmt.CLUSTER_SIZE
        end = self._ends.get(dev_id)
        if mask == 0 and (end is None or start + fmt.CLUSTER_SIZE <= end):
            self.zero_data += fmt.CLUSTER_SIZE
            return
        for block in range(fmt.BLOCKS_PER_CLUSTER):
            if mask >> block & 1:
                continue
            block_start = start + block * fmt.BLOCK_SIZE
            block_end = block_start + fmt.BLOCK_SIZE if end is None else min(block_start + fmt.BLOCK_SIZE, end)
            if block_end > block_start:
                self.zero_data += block_end - block_start
                if mask:
                    self.partial_zero_data += block_end - block_start

    def summary(self) -> list[str]:
        if not self._clusters_read:
            return ["vma archive contains no image data"]
        read = self._clusters_read * fmt.CLUSTER_SIZE
        lines = [f"total bytes read {read}, sparse bytes {self.zero_data} ({100.0 * self.zero_data / read:.3g}%)"]
        data = read - self.zero_data
        if data:
            lines.append(f"space reduction due to 4K zero blocks {100.0 * self.partial_zero_data / data:.3g}%")
        return lines

    def finish(self) -> None:
        for line in self.summary():
            self._emit(line)
