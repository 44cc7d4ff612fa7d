"""Streaming, validating VMA reader (docs/format.md R1-R3).

It reads the header, then one extent at a time, checking every rule the
Proxmox reader checks and in the same order, so the first broken rule is the
one reported. Memory is bounded by one extent (at most 944 payload blocks)
plus a seen-cluster bitmap that grows only with the clusters actually present.
Anything wrong in the archive raises :class:`VmaFormatError` naming the byte
offset and the rule.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from qmpbackup.vma import format as fmt
from qmpbackup.vma.cluster_map import ClusterMap
from qmpbackup.vma.errors import VmaError, VmaFormatError
from qmpbackup.vma.header import DeviceInfo, VmaHeader, check_fixed_part, decode_header, display_name

log = logging.getLogger(__name__)

_ZERO_EXTENT_MD5 = bytes(16)


class ByteSource(Protocol):
    """Where the reader gets archive bytes: a file, a decompressor, a pipe."""

    def read(self, n: int, /) -> bytes:
        """Up to ``n`` bytes; ``b""`` only at end of input."""
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


@dataclass(frozen=True, slots=True)
class Extent:
    """One validated extent: where it starts, its raw slots, and its clusters in slot order."""

    offset: int
    block_count: int
    blockinfo: tuple[int, ...]
    clusters: tuple[Cluster, ...]

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
        self._seen = {dev_id: ClusterMap(dev.clusters) for dev_id, dev in self.devices.items()}
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
        try:
            chunk = self._source.read(n)
            if len(chunk) == n or not chunk:
                self._offset += len(chunk)
                return chunk
            parts = [chunk]
            got = len(chunk)
            while got < n:
                chunk = self._source.read(n - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        except OSError as exc:
            raise VmaError(f"cannot read archive at byte {self._offset}: {exc.strerror or exc}") from exc
        data = b"".join(parts)
        self._offset += len(data)
        return data

    def extents(self, *, check_missing: bool = True) -> Iterator[Extent]:
        """Validated extents until end of input; then, unless told not to, the missing-cluster check."""
        if self._started:
            raise VmaError("a VMA archive can be read only once (it is a stream)")
        self._started = True
        while True:
            extent = self._read_extent()
            if extent is None:
                break
            self.extent_count += 1
            yield extent
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

    def _read_extent(self) -> Extent | None:
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
        payload = self._read_exact(fmt.BLOCK_SIZE * block_count)
        if len(payload) < fmt.BLOCK_SIZE * block_count:
            raise VmaFormatError(f"short vma extent ({fmt.EXTENT_HEADER_SIZE + len(payload)} < {need})", start)
        clusters = self._check_slots(start, slots, payload)
        return Extent(start, block_count, tuple(slots), clusters)

    def _check_slots(self, start: int, slots: list[int], payload: bytes) -> tuple[Cluster, ...]:
        """Per-slot rules (R2.6-R2.11); the payload is consumed in slot order, block by block."""
        pos = 0
        size = len(payload)
        placed: list[tuple[int, int, int, int]] = []  # dev_id, cluster, mask, payload offset
        for index, info in enumerate(slots):
            mask, dev_id, cluster = fmt.split_blockinfo(info)
            if dev_id == 0:
                continue
            slot_offset = start + fmt.BLOCKINFO_SLOTS_OFFSET + 8 * index
            dev = self.devices.get(dev_id)
            if dev is None:
                raise VmaFormatError(f"got wrong dev id {dev_id}", slot_offset)
            if not self._seen[dev_id].add(cluster):
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
        return tuple(_expand(payload, dev_id, cluster, mask, at) for dev_id, cluster, mask, at in placed)


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
