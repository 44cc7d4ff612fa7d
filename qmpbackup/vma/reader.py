"""Streaming, validating VMA reader (docs/format.md R1-R3).

It reads the header, then one extent at a time, checking every rule the
Proxmox reader checks and in the same order, so the first broken rule is the
one reported. Memory is bounded by one extent (at most 944 payload blocks)
plus the runs of seen clusters (:mod:`qmpbackup.vma.cluster_map`), whose
number has a fixed cap whatever the header claims.
Anything wrong in the archive raises :class:`VmaFormatError` naming the byte
offset and the rule.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeAlias
from uuid import UUID

from qmpbackup.render import display_name
from qmpbackup.vma import format as fmt
from qmpbackup.vma.cluster_map import ClusterMap, RunBudget, TooManyRuns
from qmpbackup.vma.errors import VmaError, VmaFormatError
from qmpbackup.vma.header import DeviceInfo, VmaHeader, check_fixed_part, decode_header

log = logging.getLogger(__name__)

_ZERO_EXTENT_MD5 = bytes(16)


Piece: TypeAlias = bytes | memoryview


class ByteSource(Protocol):
    """Where the reader gets archive bytes: a file, a decompressor, a pipe.

    ``read`` may return a memoryview (the read-ahead hands out views of its
    chunks); the bytes it views must not change afterwards.
    """

    def read(self, n: int, /) -> bytes | memoryview:
        """Up to ``n`` bytes; empty only at end of input."""
        ...


@dataclass(frozen=True, slots=True)
class Cluster:
    """One cluster slot of an extent.

    ``data`` is the whole 65536-byte cluster with omitted blocks filled with
    zeros, or None when the mask is 0 (an all-zero cluster). For a device's
    last partial cluster, bytes past the device size are zero; consumers cut
    them off.
    """

    dev_id: int
    cluster_num: int
    mask: int
    data: bytes | None


class ClusterView(NamedTuple):
    """A cluster as :meth:`VmaReader.cluster_views` yields it: like :class:`Cluster`, without copies.

    ``data`` views the decompressed input for a full cluster stored in one
    piece of it; otherwise (omitted blocks, or a cluster split across two
    reads of the input) it views a new 65536-byte buffer. None = all zero.
    A NamedTuple, not a dataclass: one is made per 64 KiB restored, and a
    frozen dataclass's ``__init__`` costs several times more.
    """

    dev_id: int
    cluster_num: int
    mask: int
    data: memoryview | None


@dataclass(frozen=True, slots=True)
class Extent:
    """One validated extent: where it starts, its raw slots, and its clusters in slot order."""

    offset: int
    block_count: int
    blockinfo: tuple[int, ...]
    clusters: tuple[Cluster, ...]
    payload: bytes = b""  # the stored blocks, in slot order (incremental runs copy them as they are)

    @property
    def size(self) -> int:
        return fmt.EXTENT_HEADER_SIZE + fmt.BLOCK_SIZE * self.block_count


class VmaReader:
    """Reads and checks an archive from a :class:`ByteSource`; the header is read on construction."""

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        self._offset = 0
        self._started = False
        fixed = self._read_exact(fmt.HEADER_FIXED_SIZE)
        if len(fixed) < fmt.HEADER_FIXED_SIZE:
            raise VmaFormatError(
                f"can't read vma header - got {len(fixed)} of {fmt.HEADER_FIXED_SIZE} bytes", len(fixed)
            )
        header_size = check_fixed_part(fixed)
        rest = self._read_exact(header_size - fmt.HEADER_FIXED_SIZE)
        if len(rest) < header_size - fmt.HEADER_FIXED_SIZE:
            raise VmaFormatError(
                f"can't read vma header data - got {len(fixed) + len(rest)} of {header_size} bytes",
                self._offset,
            )
        self.header: VmaHeader = decode_header(fixed + rest)
        self.configs: dict[str, bytes] = dict(self.header.configs)
        self.devices: dict[int, DeviceInfo] = {dev.dev_id: dev for dev in self.header.devices}
        self.run_budget = RunBudget()  # shared with any map that follows this archive (verify --checksums)
        self._seen = {dev_id: ClusterMap(dev.clusters, budget=self.run_budget) for dev_id, dev in self.devices.items()}
        self._vmstate_next = {dev_id: 0 for dev_id, dev in self.devices.items() if dev.is_vmstate}
        self.extent_count = 0
        self.end_offset: int | None = None

    @property
    def uuid(self) -> UUID:
        return self.header.uuid

    @property
    def ctime(self) -> int:
        return self.header.ctime

    @property
    def offset(self) -> int:
        """Archive bytes consumed so far."""
        return self._offset

    def _read_exact(self, n: int) -> bytes:
        """Read ``n`` bytes unless the input ends first; short only at end of input."""
        pieces, _got = self._read_pieces(n)
        if len(pieces) == 1 and type(pieces[0]) is bytes:
            return pieces[0]
        return b"".join(pieces)

    def _read_pieces(self, n: int) -> tuple[list[Piece], int]:
        """Like :meth:`_read_exact` but the pieces as the source returned them (no joining copy)."""
        pieces: list[Piece] = []
        got = 0
        try:
            while got < n:
                chunk = self._source.read(n - got)
                if not chunk:
                    break
                pieces.append(chunk)
                got += len(chunk)
        except OSError as exc:
            raise VmaError(f"cannot read archive at byte {self._offset}: {exc.strerror or exc}") from exc
        self._offset += got
        return pieces, got

    def extents(self, *, check_missing: bool = True, clusters: bool = True) -> Iterator[Extent]:
        """Validated extents until end of input; then, unless told not to, the missing-cluster check.

        ``clusters=False`` leaves ``Extent.clusters`` empty for callers that use the payload
        as stored (an incremental run copies it), which saves a copy of every cluster.
        """
        for raw in self._raw_extents(check_missing):
            yield _extent(raw, clusters)

    def cluster_views(self, *, check_missing: bool = True) -> Iterator[ClusterView]:
        """Like :meth:`clusters`, but ``data`` views the input instead of copying it (restore's fast path).

        Same checks, same errors, same order; a view stays valid as long as it is referenced.
        """
        for raw in self._raw_extents(check_missing):
            payload = _Payload(raw.pieces)
            for dev_id, cluster, mask, at in raw.placed:
                yield ClusterView(dev_id, cluster, mask, payload.cluster(mask, at))

    def _raw_extents(self, check_missing: bool) -> Iterator[_RawExtent]:
        if self._started:
            raise VmaError("a VMA archive can be read only once (it is a stream)")
        self._started = True
        while True:
            raw = self._read_extent()
            if raw is None:
                break
            self.extent_count += 1
            yield raw
        self.end_offset = self._offset
        if check_missing:
            for dev_id, dev in self.devices.items():
                if dev.is_vmstate:
                    continue  # a RAM-state stream is as long as it is (R3)
                missing = self.first_missing(dev_id)
                if missing is not None:
                    raise VmaFormatError(
                        f"detected missing cluster {missing} for stream {display_name(dev.name)}", self._offset
                    )

    def clusters(self, *, check_missing: bool = True) -> Iterator[Cluster]:
        """Every cluster slot of every extent, in archive order (see :meth:`extents`)."""
        for extent in self.extents(check_missing=check_missing):
            yield from extent.clusters

    def first_missing(self, dev_id: int) -> int | None:
        """Lowest cluster of ``dev_id`` not seen so far (final once the extents are exhausted)."""
        return self._seen[dev_id].first_missing()

    def seen_clusters(self, dev_id: int) -> int:
        return self._seen[dev_id].seen

    def _read_extent(self) -> _RawExtent | None:
        start = self._offset
        head = self._read_exact(fmt.EXTENT_HEADER_SIZE)
        if not head:
            return None
        if len(head) < fmt.EXTENT_HEADER_SIZE:
            raise VmaFormatError(f"read short extent ({len(head)} bytes)", start)
        zeroed = bytearray(head)
        zeroed[fmt.EXTENT_MD5] = _ZERO_EXTENT_MD5
        magic, reserved1, block_count, uuid_bytes, md5, *slots = fmt.EXTENT_HEADER.unpack(head)
        if hashlib.md5(zeroed).digest() != md5:
            raise VmaFormatError("wrong vma extent header checksum", start)
        if uuid_bytes != self.header.uuid.bytes:
            raise VmaFormatError("wrong vma extent uuid", start + 8)
        if magic != fmt.EXTENT_MAGIC or reserved1 != 0:
            raise VmaFormatError("wrong vma extent header magic", start)
        need = fmt.EXTENT_HEADER_SIZE + fmt.BLOCK_SIZE * block_count
        if block_count > fmt.MAX_EXTENT_BLOCKS:
            raise VmaFormatError(
                f"short vma extent (block_count {block_count} needs {need} bytes, "
                f"more than the {fmt.MAX_EXTENT_SIZE} an extent may hold)",
                start,
            )
        pieces, size = self._read_pieces(fmt.BLOCK_SIZE * block_count)
        if size < fmt.BLOCK_SIZE * block_count:
            raise VmaFormatError(f"short vma extent ({fmt.EXTENT_HEADER_SIZE + size} < {need})", start)
        placed = self._check_slots(start, slots, size)
        return _RawExtent(start, block_count, tuple(slots), pieces, placed)

    def _check_slots(self, start: int, slots: list[int], size: int) -> list[tuple[int, int, int, int]]:
        """Per-slot rules (R2.6-R2.11); the payload (``size`` bytes) is consumed in slot order, block by block."""
        pos = 0
        placed: list[tuple[int, int, int, int]] = []  # dev_id, cluster, mask, payload offset
        for index, info in enumerate(slots):
            mask, dev_id, cluster = fmt.split_blockinfo(info)
            if dev_id == 0:
                continue
            slot_offset = start + fmt.BLOCKINFO_SLOTS_OFFSET + 8 * index
            dev = self.devices.get(dev_id)
            if dev is None:
                raise VmaFormatError(f"got wrong dev id {dev_id}", slot_offset)
            try:
                added = self._seen[dev_id].add(cluster)
            except TooManyRuns as exc:
                raise VmaFormatError(f"{exc} (cluster {cluster} for stream {display_name(dev.name)})",
                                     slot_offset) from None
            if not added:
                raise VmaFormatError(
                    f"found duplicated cluster {cluster} for stream {display_name(dev.name)}", slot_offset
                )
            if dev.is_vmstate:
                if cluster != self._vmstate_next[dev_id]:
                    raise VmaFormatError("found out of order vmstate data", slot_offset)
                self._vmstate_next[dev_id] = cluster + 1
            end = dev.size // fmt.SECTOR_SIZE * fmt.SECTOR_SIZE  # the target ends at a whole sector
            cluster_start = cluster * fmt.CLUSTER_SIZE
            if mask == fmt.FULL_MASK:
                if pos + fmt.CLUSTER_SIZE > size:
                    raise VmaFormatError("short vma extent - too many blocks", slot_offset)
                if cluster_start >= end:
                    raise VmaFormatError("got wrong block address - write beyond end", slot_offset)
            elif mask:
                used = mask.bit_count()
                if pos + used * fmt.BLOCK_SIZE > size:
                    raise VmaFormatError("short vma extent - too many blocks", slot_offset)
                last_block = mask.bit_length() - 1
                if cluster_start + last_block * fmt.BLOCK_SIZE >= end:
                    raise VmaFormatError("got wrong block address - write beyond end", slot_offset)
            elif cluster_start >= end:
                raise VmaFormatError("got wrong block address - write beyond end", slot_offset)
            placed.append((dev_id, cluster, mask, pos))
            pos += mask.bit_count() * fmt.BLOCK_SIZE
        if pos != size:
            raise VmaFormatError("vma extent error - missing blocks", start)
        return placed


class _RawExtent(NamedTuple):
    """A validated extent before its clusters are made: the payload as read, and where each slot's data is."""

    offset: int
    block_count: int
    blockinfo: tuple[int, ...]
    pieces: list[Piece]
    placed: list[tuple[int, int, int, int]]  # dev_id, cluster, mask, payload offset


def _extent(raw: _RawExtent, with_clusters: bool = True) -> Extent:
    pieces = raw.pieces
    payload = pieces[0] if len(pieces) == 1 and type(pieces[0]) is bytes else b"".join(pieces)
    clusters = (tuple(_expand(payload, dev_id, cluster, mask, at) for dev_id, cluster, mask, at in raw.placed)
                if with_clusters else ())
    return Extent(raw.offset, raw.block_count, raw.blockinfo, clusters, payload)


class _Payload:
    """An extent's stored blocks as the pieces the source returned; clusters are cut out as views."""

    __slots__ = ("_ends", "_views")

    def __init__(self, pieces: Sequence[Piece]) -> None:
        self._views = [memoryview(p) for p in pieces]
        self._ends: list[int] = []
        end = 0
        for view in self._views:
            end += len(view)
            self._ends.append(end)

    def cluster(self, mask: int, at: int) -> memoryview | None:
        """The slot's cluster (stored blocks in place, omitted ones zero), or None for mask 0."""
        if mask == 0:
            return None
        if mask == fmt.FULL_MASK:
            index = bisect.bisect_right(self._ends, at)
            base = self._ends[index] - len(self._views[index])
            if at + fmt.CLUSTER_SIZE <= self._ends[index]:
                return self._views[index][at - base : at - base + fmt.CLUSTER_SIZE]
        data = bytearray(fmt.CLUSTER_SIZE)
        for start, end in fmt.stored_runs(mask):
            self._copy(data, start, at, end - start)
            at += end - start
        return memoryview(data)

    def _copy(self, dest: bytearray, dest_at: int, at: int, length: int) -> None:
        """``length`` payload bytes from ``at`` into ``dest`` at ``dest_at``, across pieces."""
        index = bisect.bisect_right(self._ends, at)
        while length:
            view = self._views[index]
            base = self._ends[index] - len(view)
            take = min(length, self._ends[index] - at)
            dest[dest_at : dest_at + take] = view[at - base : at - base + take]
            dest_at, at, length = dest_at + take, at + take, length - take
            index += 1


def _expand(payload: bytes, dev_id: int, cluster: int, mask: int, at: int) -> Cluster:
    """Turn a slot into a full cluster: stored blocks in place, omitted blocks zero."""
    if mask == 0:
        return Cluster(dev_id, cluster, 0, None)
    if mask == fmt.FULL_MASK:
        return Cluster(dev_id, cluster, mask, payload[at : at + fmt.CLUSTER_SIZE])
    data = bytearray(fmt.CLUSTER_SIZE)
    view = memoryview(payload)
    for block in range(fmt.BLOCKS_PER_CLUSTER):
        if mask & (1 << block):
            offset = block * fmt.BLOCK_SIZE
            data[offset : offset + fmt.BLOCK_SIZE] = view[at : at + fmt.BLOCK_SIZE]
            at += fmt.BLOCK_SIZE
    return Cluster(dev_id, cluster, mask, bytes(data))
