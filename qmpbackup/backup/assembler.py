"""Turns the byte ranges an NBD export receives into whole 64 KiB VMA clusters.

One :class:`ClusterAssembler` per drive. It is the export's
:class:`qmpbackup.nbd.ExportConsumer` and feeds :class:`ClusterSink` (the VMA writer's
``write_cluster``). QEMU's backup job writes each 64 KiB cluster once, whole (only the device's
last cluster may be shorter), in any order, so the usual path is: slice the request into
clusters, detect all-zero ones, hand each to the sink at once. Everything else is the rare path:

* A write covering part of a cluster is copied into a buffer held until the cluster is
  covered; only such partly written clusters are held in memory.
* WRITE_ZEROES and all-zero data become ``None`` (all-zero) clusters.
* :meth:`ClusterAssembler.finish` emits every cluster never touched as zero (the export starts
  all zero and QEMU skips reading zero areas) and partly covered clusters with their gaps zero.
* QEMU's backup job never writes a cluster twice. A second write of an emitted cluster is
  accepted only when the cluster went out all zero and the new bytes are zero too (zeroes
  sent once as WRITE_ZEROES and again as data); anything else raises
  :class:`PointInTimeError`: the first copy is already in the archive, and a backup that
  may mix two moments is not one point in time. Two bits per cluster are kept (emitted,
  emitted as zero): 4 MiB per TiB of disk. An earlier version kept a CRC-32 per cluster to
  accept identical rewrites too; that cost 16 times the memory and 5 % of the CPU of a
  compressed backup (which is CPU-bound on 2 cores) for a case QEMU does not produce.
* TRIM changes nothing: the spec leaves trimmed content unspecified, and a backup target
  keeps what it was given. FLUSH has nothing to do: durability is the archive's own fsync.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Protocol

from qmpbackup.errors import QmpBackupError, StateError
from qmpbackup.vma.format import CLUSTER_SIZE, ZERO_CLUSTER

log = logging.getLogger(__name__)


class ClusterSink(Protocol):
    """Where whole clusters go: ``qmpbackup.vma.VmaWriter`` satisfies it.

    ``data`` is the cluster's bytes (the device's last cluster may be shorter than 64 KiB) or
    None for an all-zero cluster. A memoryview is valid only during the call.
    """

    def write_cluster(self, dev_id: int, cluster_num: int,
                      data: bytes | memoryview | None, /) -> None: ...


class PointInTimeError(QmpBackupError):
    """A cluster arrived twice with different content: the backup is not one point in time."""

    def __init__(self, device: str, cluster_num: int, detail: str) -> None:
        self.device = device
        self.cluster_num = cluster_num
        self.offset = cluster_num * CLUSTER_SIZE
        super().__init__(
            f"{device}: cluster {cluster_num} (offset {self.offset}) written twice: {detail}; "
            f"the backup would not be one point in time")


@dataclass(slots=True)
class AssemblerStats:
    """Counters for the job's progress and closing lines."""

    bytes_written: int = 0      # WRITE payload received
    bytes_zeroed: int = 0       # WRITE_ZEROES length received
    bytes_trimmed: int = 0      # TRIM length received (ignored)
    zero_bytes: int = 0         # bytes of emitted all-zero clusters (the "sparse" share)
    duplicate_bytes: int = 0    # zero bytes received again for clusters that went out zero
    bytes_reused: int = 0       # bytes taken from a previous archive (incremental runs)
    clusters_emitted: int = 0

    @property
    def bytes_received(self) -> int:
        """Every byte QEMU sent for the device, data or zeroes (vzdump's "read")."""
        return self.bytes_written + self.bytes_zeroed


class _Partial:
    """A cluster written in pieces: its bytes so far and the covered ranges (sorted, merged)."""

    __slots__ = ("buf", "starts", "ends", "covered")

    def __init__(self, length: int) -> None:
        self.buf = bytearray(length)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.covered = 0

    def first_difference(self, off: int, piece: memoryview | None, length: int) -> int | None:
        """Offset of the first byte where ``piece`` contradicts bytes already covered."""
        end = off + length
        i = max(bisect.bisect_right(self.starts, off) - 1, 0)
        while i < len(self.starts) and self.starts[i] < end:
            a, b = max(self.starts[i], off), min(self.ends[i], end)
            if a < b:
                old = bytes(self.buf[a:b])
                new = ZERO_CLUSTER[:b - a] if piece is None else bytes(piece[a - off:b - off])
                if old != new:
                    return a + next(k for k, (x, y) in enumerate(zip(old, new, strict=True)) if x != y)
            i += 1
        return None

    def add(self, off: int, piece: memoryview | None, length: int) -> None:
        end = off + length
        if piece is not None:
            self.buf[off:end] = piece
        # Merge [off, end) into the interval list and recount coverage.
        lo = bisect.bisect_left(self.ends, off)
        hi = bisect.bisect_right(self.starts, end)
        if lo < hi:
            off = min(off, self.starts[lo])
            end = max(end, self.ends[hi - 1])
        removed = sum(self.ends[j] - self.starts[j] for j in range(lo, hi))
        self.starts[lo:hi] = [off]
        self.ends[lo:hi] = [end]
        self.covered += (end - off) - removed


class ClusterAssembler:
    """Assembles one device's clusters from NBD writes (an ``ExportConsumer``); see module doc."""

    def __init__(self, sink: ClusterSink, dev_id: int, size: int, *, name: str = "") -> None:
        if size < 0:
            raise ValueError(f"bad device size {size}")
        self.sink = sink
        self.dev_id = dev_id
        self.size = size
        self.name = name or f"device {dev_id}"
        self.cluster_count = (size + CLUSTER_SIZE - 1) // CLUSTER_SIZE
        self.stats = AssemblerStats()
        self._done = bytearray((self.cluster_count + 7) // 8)
        self._zero = bytearray((self.cluster_count + 7) // 8)
        self._partial: dict[int, _Partial] = {}
        self._finished = False

    def __repr__(self) -> str:
        state = "finished" if self._finished else "open"
        return (f"<ClusterAssembler {self.name} {state} {self.stats.clusters_emitted}/"
                f"{self.cluster_count} clusters, {len(self._partial)} partial>")

    @property
    def partial_clusters(self) -> int:
        """Clusters currently held because they are only partly written."""
        return len(self._partial)

    # -- ExportConsumer --------------------------------------------------------------------

    async def write(self, offset: int, data: memoryview, /) -> None:
        self.write_sync(offset, data)

    async def write_zeroes(self, offset: int, length: int, /) -> None:
        self.write_zeroes_sync(offset, length)

    async def trim(self, offset: int, length: int, /) -> None:
        self._check_open()
        self.stats.bytes_trimmed += length

    async def flush(self) -> None:
        self._check_open()

    # -- the work --------------------------------------------------------------------------

    def write_sync(self, offset: int, data: bytes | memoryview) -> None:
        self._check_range(offset, len(data))
        view = data if isinstance(data, memoryview) else memoryview(data)
        self.stats.bytes_written += len(view)
        self._apply(offset, view, len(view))

    def write_zeroes_sync(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        self.stats.bytes_zeroed += length
        self._apply(offset, None, length)

    def finish(self) -> None:
        """Emits every cluster not yet emitted (untouched: zero; partial: gaps zero)."""
        self._check_open()
        done = self._done
        for byte_index, bits in enumerate(done):
            if bits == 0xFF:
                continue
            for c in range(byte_index * 8, min(byte_index * 8 + 8, self.cluster_count)):
                if bits & (1 << (c & 7)):
                    continue
                partial = self._partial.pop(c, None)
                if partial is None:
                    self._emit(c, None, self._cluster_length(c))
                else:
                    self._emit(c, memoryview(partial.buf), len(partial.buf))
        self._finished = True
        log.debug("%r: finished", self)

    def first_missing(self) -> int | None:
        """The lowest cluster not emitted yet (None: the device is complete)."""
        for byte_index, bits in enumerate(self._done):
            if bits != 0xFF:
                for c in range(byte_index * 8, min(byte_index * 8 + 8, self.cluster_count)):
                    if not bits & (1 << (c & 7)):
                        return c
        return None

    def adopt_reused(self, c: int, mask: int) -> int:
        """Take cluster ``c`` (stored with ``mask``) from a previous archive unless QEMU sent it.

        Returns the bytes taken (0: QEMU sent it). The caller hands the cluster's stored
        blocks to the writer itself, a whole extent at a time
        (:meth:`qmpbackup.vma.VmaWriter.write_reused_extent`). Only after QEMU's writes
        have ended (incremental runs): a cluster QEMU sent only in part cannot be
        completed from elsewhere.
        """
        self._check_open()
        if not 0 <= c < self.cluster_count:
            raise ValueError(f"{self.name}: cluster {c} outside 0..{self.cluster_count}")
        if self._is_done(c):
            return 0
        if c in self._partial:
            raise PointInTimeError(self.name, c, "QEMU sent only part of this changed cluster")
        clen = self._cluster_length(c)
        self._mark_emitted(c, clen, zero=mask == 0)
        self.stats.bytes_reused += clen
        return clen

    def _check_open(self) -> None:
        if self._finished:
            raise StateError(f"assembler of {self.name}", "finished", "open")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{self.name}: range {offset}+{length} outside 0..{self.size}")

    def _cluster_length(self, c: int) -> int:
        return min(CLUSTER_SIZE, self.size - c * CLUSTER_SIZE)

    def _apply(self, offset: int, data: memoryview | None, length: int) -> None:
        """Splits ``[offset, offset+length)`` by cluster; ``data`` None means zeroes."""
        pos = offset
        end = offset + length
        size = self.size
        while pos < end:
            c = pos // CLUSTER_SIZE
            cstart = c * CLUSTER_SIZE
            clen = min(CLUSTER_SIZE, size - cstart)
            take = min(end, cstart + clen) - pos
            piece = None if data is None else data[pos - offset:pos - offset + take]
            if take == clen:
                self._whole(c, piece, clen)
            else:
                self._part(c, pos - cstart, piece, take, clen)
            pos += take

    def _is_done(self, c: int) -> bool:
        return bool(self._done[c >> 3] & (1 << (c & 7)))

    def _whole(self, c: int, piece: memoryview | None, clen: int) -> None:
        if self._is_done(c):
            self._again(c, piece, clen)
            return
        partial = self._partial.pop(c, None)
        if partial is not None:
            diff = partial.first_difference(0, piece, clen)
            if diff is not None:
                self._partial[c] = partial
                raise PointInTimeError(
                    self.name, c, f"byte {diff} of the cluster differs from the first write")
        self._emit(c, piece, clen)

    def _part(self, c: int, off: int, piece: memoryview | None, length: int, clen: int) -> None:
        if self._is_done(c):
            self._again(c, piece, length)
            return
        partial = self._partial.get(c)
        if partial is None:
            partial = self._partial[c] = _Partial(clen)
        diff = partial.first_difference(off, piece, length)
        if diff is not None:
            raise PointInTimeError(
                self.name, c, f"byte {diff} of the cluster differs from the first write")
        partial.add(off, piece, length)
        if partial.covered == clen:
            del self._partial[c]
            self._emit(c, memoryview(partial.buf), clen)

    def _again(self, c: int, piece: memoryview | None, length: int) -> None:
        """Bytes for a cluster already emitted: fine only if it and they are all zero."""
        zero_piece = piece is None or ZERO_CLUSTER.startswith(piece)
        if zero_piece and self._zero[c >> 3] & (1 << (c & 7)):
            self.stats.duplicate_bytes += length
            return
        raise PointInTimeError(self.name, c, "its first copy is already in the archive and cannot be compared")

    def _emit(self, c: int, piece: memoryview | None, clen: int) -> None:
        if piece is not None and ZERO_CLUSTER.startswith(piece):
            piece = None
        self.sink.write_cluster(self.dev_id, c, piece)
        self._mark_emitted(c, clen, zero=piece is None)

    def _mark_emitted(self, c: int, clen: int, *, zero: bool) -> None:
        """Record that cluster ``c`` is in the archive (and whether it went out all zero)."""
        if zero:
            self._zero[c >> 3] |= 1 << (c & 7)
            self.stats.zero_bytes += clen
        self._done[c >> 3] |= 1 << (c & 7)
        self.stats.clusters_emitted += 1
