"""Helpers that build valid and deliberately broken VMA archives for the tests."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

from qmpbackup.vma import VmaReader, VmaWriter
from qmpbackup.vma import format as fmt
from qmpbackup.vma.header import encode_header, encode_name

TEST_UUID = UUID("12345678-9abc-4def-8123-456789abcdef")
TEST_CTIME = 1700000000


def block_bytes(kind: int, seed: int) -> bytes:
    """One 4 KiB block: kind 0 zero, 1 a repeated byte, 2 pseudo-random, 3 zero except the last byte."""
    if kind == 0:
        return bytes(fmt.BLOCK_SIZE)
    if kind == 1:
        return bytes([seed % 255 + 1]) * fmt.BLOCK_SIZE
    if kind == 2:
        return random.Random(seed).randbytes(fmt.BLOCK_SIZE)
    return bytes(fmt.BLOCK_SIZE - 1) + b"\x01"


def disk_image(size: int, kinds: Sequence[int], seed: int = 0) -> bytes:
    blocks = [block_bytes(kinds[i % len(kinds)], seed * 7919 + i) for i in range(-(-size // fmt.BLOCK_SIZE))]
    return b"".join(blocks)[:size]


def write_archive(
    disks: Sequence[tuple[str, bytes]],
    configs: Sequence[tuple[str, bytes]] = (("qemu-server.conf", b"memory: 512\n"),),
    order: Sequence[tuple[int, int]] | None = None,
) -> bytes:
    """A valid archive of ``disks`` (name, data); clusters in ``order`` ((dev index, cluster)) or sequential."""
    out = io.BytesIO()
    writer = VmaWriter(out, uuid=TEST_UUID, ctime=TEST_CTIME)
    for name, data in configs:
        writer.add_config(name, data)
    dev_ids = [writer.add_device(name, len(data)) for name, data in disks]
    if order is None:
        order = [(d, c) for d, (_n, data) in enumerate(disks) for c in range(fmt.cluster_count(len(data)))]
    for dev_index, cluster in order:
        data = disks[dev_index][1]
        chunk = data[cluster * fmt.CLUSTER_SIZE : (cluster + 1) * fmt.CLUSTER_SIZE]
        writer.write_cluster(dev_ids[dev_index], cluster, chunk)
    writer.close()
    return out.getvalue()


def read_disks(archive: bytes, *, check_missing: bool = True) -> tuple[VmaReader, dict[int, bytearray]]:
    """Read an archive fully; returns the reader and each device's reassembled bytes."""
    reader = VmaReader(io.BytesIO(archive))
    disks = {dev_id: bytearray(dev.size) for dev_id, dev in reader.devices.items()}
    for cluster in reader.clusters(check_missing=check_missing):
        if cluster.data is not None:
            disk = disks[cluster.dev_id]
            start = cluster.cluster_num * fmt.CLUSTER_SIZE
            end = min(start + fmt.CLUSTER_SIZE, len(disk))
            disk[start:end] = cluster.data[: end - start]
    return reader, disks


def header_size_of(archive: bytes) -> int:
    return int.from_bytes(archive[56:60], "big")


def extent_offsets(archive: bytes) -> list[int]:
    """Offsets of the extents of a structurally sound archive (walks block counts)."""
    offsets = []
    pos = header_size_of(archive)
    while pos + fmt.EXTENT_HEADER_SIZE <= len(archive):
        offsets.append(pos)
        block_count = int.from_bytes(archive[pos + 6 : pos + 8], "big")
        pos += fmt.EXTENT_HEADER_SIZE + fmt.BLOCK_SIZE * block_count
    return offsets


def rehash_header(buf: bytearray) -> None:
    """Recompute the header MD5 after a deliberate change."""
    size = min(header_size_of(bytes(buf[:60])), len(buf))
    buf[32:48] = bytes(16)
    buf[32:48] = hashlib.md5(bytes(buf[:size])).digest()


def rehash_extent(buf: bytearray, offset: int) -> None:
    buf[offset + 24 : offset + 40] = bytes(16)
    buf[offset + 24 : offset + 40] = hashlib.md5(bytes(buf[offset : offset + 512])).digest()


@dataclass
class RawExtent:
    """An extent built slot by slot, for archives the writer would refuse to make."""

    slots: list[int] = field(default_factory=list)
    payload: bytes = b""
    block_count: int | None = None
    magic: bytes = fmt.EXTENT_MAGIC
    reserved1: int = 0
    uuid: UUID = TEST_UUID

    def encode(self) -> bytes:
        count = len(self.payload) // fmt.BLOCK_SIZE if self.block_count is None else self.block_count
        slots = self.slots + [0] * (fmt.EXTENT_SLOTS - len(self.slots))
        head = bytearray(
            fmt.EXTENT_HEADER.pack(self.magic, self.reserved1, count, self.uuid.bytes, bytes(16), *slots)
        )
        head[24:40] = hashlib.md5(head).digest()
        return bytes(head) + self.payload


def raw_archive(
    devices: Sequence[tuple[str, int]],
    extents: Sequence[RawExtent],
    configs: Sequence[tuple[bytes, bytes]] = ((b"qemu-server.conf", b"x"),),
) -> bytes:
    header = encode_header(TEST_UUID, TEST_CTIME, configs, [(encode_name(name), size) for name, size in devices])
    return header + b"".join(e.encode() for e in extents)


def mutate(base: bytes, offsets: list[int], ops: list[tuple[str, int, object]], rehash: bool) -> bytes:
    """``base`` with the fuzzers' mutations applied: ``flip`` a bit, ``set`` a byte, ``truncate``,
    ``insert`` bytes, overwrite a 4-byte ``field`` or 8-byte ``size`` (big-endian), an extent's
    ``slot`` or the block ``count`` of extent ``offsets[pos]``. ``rehash`` makes the header and
    extent checksums right again, so that the checks behind them are reached."""
    buf = bytearray(base)
    for op, pos, value in ops:
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << int(value)  # type: ignore[call-overload]
        elif op == "set" and pos < len(buf):
            buf[pos] = int(value)  # type: ignore[call-overload]
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = value  # type: ignore[index]
        elif op == "field" and pos + 4 <= len(buf):
            buf[pos : pos + 4] = int(value).to_bytes(4, "big")  # type: ignore[call-overload]
        elif op == "size" and pos + 8 <= len(buf):
            buf[pos : pos + 8] = int(value).to_bytes(8, "big")  # type: ignore[call-overload]
        elif op == "slot" and offsets[0] + 48 + 8 * pos <= len(buf):
            at = offsets[0] + 40 + 8 * pos
            buf[at : at + 8] = int(value).to_bytes(8, "big")  # type: ignore[call-overload]
        elif op == "count" and offsets[pos] + 8 <= len(buf):
            buf[offsets[pos] + 6 : offsets[pos] + 8] = int(value).to_bytes(2, "big")  # type: ignore[call-overload]
    if rehash:
        if len(buf) >= 60:
            rehash_header(buf)
        for offset in offsets:
            if offset + 512 <= len(buf):
                rehash_extent(buf, offset)
    return bytes(buf)
