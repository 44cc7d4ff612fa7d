"""The archive index (docs/format.md section I): where each cluster lies, and a digest of its data.

VMA has no data checksums and no seek table. The index adds both, outside the VMA
stream, so Proxmox's tools never see it: for every cluster of every device its
extent, the offset of its first stored block in the uncompressed VMA stream, its
block mask and an xxh3-128 digest of its 65536 bytes (omitted blocks as zeros); the
extent table; and for a ``.vma.zst`` the table of its zstd frames. A trailer carries
an xxh3-128 checksum of the whole index, so a damaged index is refused, never
trusted.

Records are fixed-size and indexed by cluster number, so a reader maps the index
(:class:`ArchiveIndex`, ``mmap``) and touches only the pages it needs; the builder
keeps its records in a temporary file for the same reason (a 1 TiB disk has 16 Mi
clusters, 512 MiB of records).

Where it lives: a ``.vma.zst`` ends with it as a zstd skippable frame (decoders skip
it); any other archive has it in the sidecar ``<archive>.index``.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, NamedTuple, Protocol, Self, cast
from uuid import UUID

import xxhash

from qmpbackup.atomic_file import atomic_output
from qmpbackup.compress import ZSTD_MAGIC
from qmpbackup.errors import QmpBackupError
from qmpbackup.store.names import index_name, temp_name
from qmpbackup.vma import format as fmt
from qmpbackup.vma.archive_io import open_archive
from qmpbackup.vma.errors import VmaError
from qmpbackup.vma.reader import VmaReader

MAGIC: Final = b"QMPBIDX\0"
END_MAGIC: Final = b"QMPBIEND"
VERSION: Final = 1
DIGEST_XXH3_128: Final = 1
DIGEST_BLAKE2B_128: Final = 2
SKIPPABLE_MAGIC: Final = 0x184D2A5E
"""The zstd skippable-frame magic our index frame uses (any of 0x184D2A50..5F is skippable)."""
FLAG_FRAMED: Final = 1
"""Header flag: the frame table is complete and every frame is small enough to decompress alone."""

# magic, version, digest, uuid, plain_size, device_count, flags, extent_count, frame_count,
# devices_offset, extents_offset, frames_offset, records_offset
HEADER: Final = struct.Struct("<8sII16sQIIQQQQQQ")
DEVICE: Final = struct.Struct("<IIQQQ")  # dev_id, name_length, size, name_offset, records_offset
EXTENT: Final = struct.Struct("<QII")  # plain offset, block_count, used slots
FRAME: Final = struct.Struct("<QQ")  # compressed offset, plain offset
RECORD: Final = struct.Struct("<QIHH16s")  # data offset, extent, mask, flags, digest
TRAILER: Final = struct.Struct("<16sQ8s")  # checksum, index length, END_MAGIC
RECORD_PRESENT: Final = 1
MAX_FRAME_PLAIN: Final = 16 * fmt.CLUSTER_SIZE
"""Largest frame (plain bytes) random access accepts: our frames hold at most 16 clusters (or a header)."""
_CHECK_CHUNK: Final = 8 << 20

assert HEADER.size == 96 and RECORD.size == 32 and TRAILER.size == 32


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """xxh3-128 of one cluster (the only digest qmpbackup writes); a device's shorter last
    cluster is hashed as if zero-padded to 65536 bytes, as it is restored."""
    if len(data) == fmt.CLUSTER_SIZE:
        return xxhash.xxh3_128_digest(data)
    h = xxhash.xxh3_128(data)
    h.update(fmt.ZERO_CLUSTER[len(data):])
    return h.digest()


ZERO_DIGEST: Final = digest(fmt.ZERO_CLUSTER)


def stored_digest(payload: bytes | bytearray | memoryview, at: int, mask: int) -> bytes:
    """Digest of the cluster whose stored blocks (``mask``) start at ``payload[at]``, omitted blocks zero."""
    if mask == 0:
        return ZERO_DIGEST
    if mask == fmt.FULL_MASK:
        return xxhash.xxh3_128_digest(payload[at:at + fmt.CLUSTER_SIZE])
    h = xxhash.xxh3_128()
    pos = 0
    for start, end in fmt.stored_runs(mask):
        if start > pos:
            h.update(fmt.ZERO_CLUSTER[:start - pos])
        h.update(payload[at:at + end - start])
        at += end - start
        pos = end
    if pos < fmt.CLUSTER_SIZE:
        h.update(fmt.ZERO_CLUSTER[:fmt.CLUSTER_SIZE - pos])
    return h.digest()


def slot_digests(slots: Iterable[int], payload: bytes | bytearray | memoryview
                 ) -> Iterator[tuple[int, int, int, bytes]]:
    """(dev_id, cluster, mask, digest) of each used slot, hashing its blocks in ``payload`` (stored order)."""
    at = 0
    for info in slots:
        mask, dev_id, cluster = fmt.split_blockinfo(info)
        if dev_id == 0:
            continue
        yield dev_id, cluster, mask, stored_digest(payload, at, mask)
        at += mask.bit_count() * fmt.BLOCK_SIZE


class ArchiveIndexError(VmaError):
    """An index that is missing, damaged, truncated or does not belong to its archive."""


class NoIndexError(ArchiveIndexError):
    """The archive has no index at all (not a damaged one)."""


class DataChecksumError(VmaError):
    """A cluster's data does not match its digest in the index: the archive is damaged there."""

    def __init__(self, device: str, cluster: int, offset: int) -> None:
        self.device = device
        self.cluster = cluster
        self.offset = offset
        super().__init__(f"data checksum mismatch in {device} cluster {cluster} (byte offset {offset})")


class Record(NamedTuple):
    """One cluster's place: extent number, plain offset of its first stored block, mask, digest."""

    extent: int
    data_offset: int
    mask: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class IndexDevice:
    dev_id: int
    name: str
    size: int
    records_offset: int

    @property
    def clusters(self) -> int:
        return fmt.cluster_count(self.size)


def sidecar_path(archive: Path) -> Path:
    """Where the index of a ``.vma``, ``.vma.gz`` or ``.vma.lzo`` archive lives."""
    return index_name(archive)


# ------------------------------------------------------------------------------ building


class IndexBuilder:
    """Collects the index while an archive is written (or read once): extents in stream order.

    Call :meth:`add_extent` for every extent, :meth:`set_frames` for a framed zstd
    archive, then :meth:`write` (or :meth:`to_bytes`) once. ``close`` frees the
    temporary record file.
    """

    def __init__(self, uuid: UUID, devices: Sequence[tuple[int, str, int]]) -> None:
        self.uuid = uuid
        self._devices: list[IndexDevice] = []
        self._by_id: dict[int, tuple[int, int]] = {}  # dev_id -> (records base, clusters)
        names = b""
        base = 0
        for dev_id, name, size in devices:
            self._devices.append(IndexDevice(dev_id, name, size, base))
            self._by_id[dev_id] = (base, fmt.cluster_count(size))
            base += fmt.cluster_count(size) * RECORD.size
            names += name.encode()
        self._names_size = len(names)
        self._records_size = base
        self._file = tempfile.TemporaryFile(prefix="qmpbackup-index-")  # noqa: SIM115 - closed by close()
        self._map: mmap.mmap | None = None
        if base:
            self._file.truncate(base)
            self._map = mmap.mmap(self._file.fileno(), base)
        self._extents = bytearray()
        self._extent_count = 0
        self._frames: list[tuple[int, int]] | None = None
        self._framed = False
        self._missing = sum(c for _, c in self._by_id.values())

    def add_extent(self, plain_offset: int, block_count: int,
                   clusters: Iterable[tuple[int, int, int, bytes]]) -> None:
        """Record one extent that starts at ``plain_offset``: its used slots in order as
        (dev_id, cluster, mask, digest) (see :func:`slot_digests`)."""
        self.add_records(plain_offset, block_count, _with_places(clusters))

    def add_records(self, plain_offset: int, block_count: int,
                    records: Iterable[tuple[int, int, int, int, bytes]]) -> None:
        """Record one extent that starts at ``plain_offset``: its used slots in order as
        (dev_id, cluster, offset of the first stored block from the extent's start, mask, digest).

        The writer's way (:class:`qmpbackup.vma.writer.VmaWriter` knows each cluster's place
        and digest when it packs it): one ``pack_into`` per cluster, nothing else.
        """
        extent = self._extent_count
        used = 0
        buf = self._map
        by_id = self._by_id
        pack = RECORD.pack_into
        for dev_id, cluster, at, mask, value in records:
            used += 1
            place = by_id.get(dev_id)
            if place is not None and cluster < place[1] and buf is not None:
                pack(buf, place[0] + cluster * RECORD.size, plain_offset + at if mask else 0,
                     extent, mask, RECORD_PRESENT, value)
                self._missing -= 1
        self._extents += EXTENT.pack(plain_offset, block_count, used)
        self._extent_count += 1

    def set_frames(self, frames: Sequence[tuple[int, int]], framed: bool) -> None:
        """The zstd frame table: (compressed offset, plain offset) per frame, then the end of both.

        ``framed``: every frame is small enough to be decompressed on its own (ours are).
        """
        self._frames = list(frames)
        self._framed = framed

    @property
    def complete(self) -> bool:
        """Every cluster of every device was recorded."""
        return self._missing == 0

    def _layout(self) -> tuple[int, int, int, int, int]:
        devices_offset = HEADER.size
        names_offset = devices_offset + DEVICE.size * len(self._devices)
        extents_offset = _align(names_offset + self._names_size, 16)
        frames_offset = extents_offset + len(self._extents)
        frame_bytes = FRAME.size * len(self._frames or ())
        records_offset = _align(frames_offset + frame_bytes, 32)
        return devices_offset, names_offset, extents_offset, frames_offset, records_offset

    def size(self) -> int:
        """Bytes :meth:`write` produces."""
        return self._layout()[4] + self._records_size + TRAILER.size

    def _chunks(self, plain_size: int) -> Iterator[bytes | bytearray | memoryview]:
        devices_offset, names_offset, extents_offset, frames_offset, records_offset = self._layout()
        frames = self._frames or []
        head = bytearray(records_offset)
        flags = FLAG_FRAMED if self._framed and frames else 0
        HEADER.pack_into(head, 0, MAGIC, VERSION, DIGEST_XXH3_128, self.uuid.bytes, plain_size,
                         len(self._devices), flags, self._extent_count, max(0, len(frames) - 1),
                         devices_offset, extents_offset, frames_offset, records_offset)
        name_at = names_offset
        for i, dev in enumerate(self._devices):
            name = dev.name.encode()
            DEVICE.pack_into(head, devices_offset + i * DEVICE.size, dev.dev_id, len(name), dev.size,
                             name_at, records_offset + dev.records_offset)
            head[name_at:name_at + len(name)] = name
            name_at += len(name)
        head[extents_offset:extents_offset + len(self._extents)] = self._extents
        for i, (compressed, plain) in enumerate(frames):
            FRAME.pack_into(head, frames_offset + i * FRAME.size, compressed, plain)
        yield head
        if self._map is not None:
            for start in range(0, self._records_size, _CHECK_CHUNK):
                yield memoryview(self._map)[start:start + _CHECK_CHUNK]

    def write(self, dest: IO[bytes], plain_size: int) -> None:
        """Write the index (with its trailer) to ``dest``; refuses an index with unrecorded clusters."""
        if not self.complete:
            raise ArchiveIndexError(f"index incomplete: {self._missing} clusters were never recorded")
        h = xxhash.xxh3_128()
        total = 0
        for chunk in self._chunks(plain_size):
            h.update(chunk)
            dest.write(chunk)
            total += len(chunk)
            if isinstance(chunk, memoryview):
                chunk.release()
        dest.write(TRAILER.pack(h.digest(), total + TRAILER.size, END_MAGIC))

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_places(clusters: Iterable[tuple[int, int, int, bytes]]) -> Iterator[tuple[int, int, int, int, bytes]]:
    """(dev_id, cluster, mask, digest) in stored order, with each one's offset from its extent's start."""
    at = fmt.EXTENT_HEADER_SIZE
    for dev_id, cluster, mask, value in clusters:
        yield dev_id, cluster, at, mask, value
        at += mask.bit_count() * fmt.BLOCK_SIZE


def _align(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def skippable_frame_header(length: int) -> bytes:
    """The 8 bytes before an index stored as a zstd skippable frame."""
    if length >= 1 << 32:
        raise ArchiveIndexError(f"index of {length} bytes does not fit a zstd skippable frame (4 GiB)")
    return struct.pack("<II", SKIPPABLE_MAGIC, length)


class _RawSink(Protocol):
    def frame_table(self) -> list[tuple[int, int]] | None: ...

    def write_raw(self, data: bytes | memoryview, /) -> None: ...


class _Raw:
    def __init__(self, sink: _RawSink) -> None:
        self._sink = sink

    def write(self, data: bytes | memoryview) -> None:
        self._sink.write_raw(data)


def embed_index(builder: IndexBuilder, sink: object, plain_size: int) -> bool:
    """After the writer closed, before the compressor does: end a framed zstd archive with its index.

    False when the sink is no framed zstd stream (the caller writes a sidecar after publishing).
    """
    table = getattr(sink, "frame_table", None)
    if table is None or not getattr(sink, "takes_frames", False):
        return False
    raw = cast(_RawSink, sink)
    frames = raw.frame_table()
    if frames is None:
        return False
    small = all(b[1] - a[1] <= MAX_FRAME_PLAIN for a, b in itertools.pairwise(frames))
    builder.set_frames(frames, framed=small)
    raw.write_raw(skippable_frame_header(builder.size()))
    builder.write(cast(IO[bytes], _Raw(raw)), plain_size)
    return True


def write_sidecar(builder: IndexBuilder, archive: Path, plain_size: int) -> None:
    """Write ``<archive>.index`` atomically (temporary name, fsync, rename)."""
    sidecar = sidecar_path(archive)
    with atomic_output(sidecar, temp_name(sidecar)) as out:
        builder.write(out, plain_size)


# ------------------------------------------------------------------------------ reading


class ArchiveIndex:
    """A checked index, mapped from its file; records are read on demand.

    :meth:`open` finds it (trailing skippable frame of a ``.vma.zst``, else the
    sidecar) and checks magic, version, bounds and the whole-index checksum.
    """

    def __init__(self, buf: mmap.mmap, start: int, length: int, source: str) -> None:
        self._map = buf
        self._view = memoryview(buf)[start:start + length]
        self.source = source
        try:
            self._parse(length)
        except BaseException:
            self._view.release()
            raise

    def _parse(self, length: int) -> None:
        source = self.source
        v = self._view
        if length < HEADER.size + TRAILER.size:
            raise ArchiveIndexError(f"index in {source} truncated ({length} bytes)")
        checksum, total, end_magic = TRAILER.unpack_from(v, length - TRAILER.size)
        if end_magic != END_MAGIC or total != length:
            raise ArchiveIndexError(f"index in {source} truncated or damaged (no valid trailer)")
        (magic, version, algo, uuid, self.plain_size, device_count, flags, self.extent_count,
         self.frame_count, devices_offset, extents_offset, frames_offset, _records_offset) = HEADER.unpack_from(v, 0)
        if magic != MAGIC:
            raise ArchiveIndexError(f"index in {source} damaged (wrong magic)")
        if version != VERSION:
            raise ArchiveIndexError(f"index in {source} has version {version}; this qmpbackup reads {VERSION}")
        if algo not in (DIGEST_XXH3_128, DIGEST_BLAKE2B_128):
            raise ArchiveIndexError(f"index in {source} uses unknown digest {algo}")
        h = xxhash.xxh3_128()
        body = length - TRAILER.size
        for at in range(0, body, _CHECK_CHUNK):
            h.update(v[at:min(body, at + _CHECK_CHUNK)])
        if h.digest() != checksum:
            raise ArchiveIndexError(f"index in {source} damaged (checksum mismatch)")
        self.algorithm = algo
        self.zero_digest = ZERO_DIGEST if algo == DIGEST_XXH3_128 else self.digest_of(fmt.ZERO_CLUSTER)
        """The digest of an all-zero cluster: a stored cluster with it reads as zeros (allocation)."""
        self.uuid = UUID(bytes=uuid)
        self.framed = bool(flags & FLAG_FRAMED)
        self._extents_offset = extents_offset
        self._frames_offset = frames_offset
        body_end = body
        if (extents_offset + EXTENT.size * self.extent_count > body_end
                or frames_offset + FRAME.size * (self.frame_count + (1 if self.frame_count else 0)) > body_end
                or devices_offset + DEVICE.size * device_count > body_end):
            raise ArchiveIndexError(f"index in {source} damaged (tables out of bounds)")
        self.devices: list[IndexDevice] = []
        for i in range(device_count):
            dev_id, name_len, size, name_offset, recs = DEVICE.unpack_from(v, devices_offset + DEVICE.size * i)
            if name_offset + name_len > body_end or recs + fmt.cluster_count(size) * RECORD.size > body_end:
                raise ArchiveIndexError(f"index in {source} damaged (device {i} out of bounds)")
            name = bytes(v[name_offset:name_offset + name_len]).decode("utf-8", "replace")
            self.devices.append(IndexDevice(dev_id, name, size, recs))
        self._frame_plain: _FramePlainOffsets | None = None

    @classmethod
    def open(cls, archive: Path) -> ArchiveIndex:
        """The checked index of ``archive``: its trailing index frame, else its sidecar.

        Raises ArchiveIndexError (one line, naming the command that makes a new one) when
        there is none, it is damaged or truncated, or it belongs to another archive.
        """
        try:
            index = cls._find(archive)
        except ArchiveIndexError as exc:
            raise type(exc)(f"{exc} (run: qmpbackup index {archive})") from exc
        try:
            uuid = archive_uuid(archive)
        except QmpBackupError as exc:
            index.close()
            raise ArchiveIndexError(f"cannot read the header of {archive.name}: {exc}") from exc
        if uuid != index.uuid:
            index.close()
            raise ArchiveIndexError(f"index in {index.source} belongs to another archive (uuid {index.uuid}, "
                                    f"archive {uuid}) (run: qmpbackup index {archive})")
        return index

    @classmethod
    def _find(cls, archive: Path) -> ArchiveIndex:
        embedded: ArchiveIndexError | None = None
        try:
            with open(archive, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if f.read(4) == ZSTD_MAGIC:
                    try:
                        return cls._embedded(f, size, archive.name)
                    except ArchiveIndexError as exc:
                        embedded = exc
        except OSError as exc:
            raise ArchiveIndexError(f"cannot read {archive}: {exc.strerror or exc}") from exc
        sidecar = sidecar_path(archive)
        try:
            with open(sidecar, "rb") as f:
                length = os.fstat(f.fileno()).st_size
                if length == 0:
                    raise ArchiveIndexError(f"index {sidecar.name} truncated (0 bytes)")
                buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        except FileNotFoundError:
            raise embedded or NoIndexError(f"{archive.name} has no index") from None
        except OSError as exc:
            raise ArchiveIndexError(f"cannot read index {sidecar}: {exc.strerror or exc}") from exc
        return cls._checked(buf, 0, length, sidecar.name)

    @classmethod
    def _embedded(cls, f: IO[bytes], size: int, name: str) -> ArchiveIndex:
        """The index frame at the end of a ``.vma.zst`` (found through the trailer's length)."""
        if size >= TRAILER.size + 8:
            f.seek(size - TRAILER.size)
            _, length, end_magic = TRAILER.unpack(f.read(TRAILER.size))
            if end_magic == END_MAGIC:
                if not 0 < length <= size - 8:
                    raise ArchiveIndexError(f"index in {name} damaged (length {length})")
                f.seek(size - length - 8)
                magic, frame_len = struct.unpack("<II", f.read(8))
                if magic != SKIPPABLE_MAGIC or frame_len != length:
                    raise ArchiveIndexError(f"index in {name} damaged (no index frame {length} bytes before the end)")
                buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                return cls._checked(buf, size - length, length, name)
        raise NoIndexError(f"{name} has no index")

    @classmethod
    def _checked(cls, buf: mmap.mmap, start: int, length: int, source: str) -> ArchiveIndex:
        try:
            return cls(buf, start, length, source)
        except BaseException:
            with contextlib.suppress(BufferError):
                buf.close()
            raise

    def device(self, name: str) -> IndexDevice | None:
        return next((d for d in self.devices if d.name == name), None)

    def record(self, dev: IndexDevice, cluster: int) -> Record:
        """The record of ``cluster`` of ``dev``; ArchiveIndexError if it was never written or is out of range."""
        if not 0 <= cluster < dev.clusters:
            raise ArchiveIndexError(f"cluster {cluster} beyond the end of {dev.name}")
        data_offset, extent, mask, flags, value = RECORD.unpack_from(
            self._view, dev.records_offset + cluster * RECORD.size)
        if not flags & RECORD_PRESENT or extent >= self.extent_count:
            raise ArchiveIndexError(f"index in {self.source} damaged: no record of {dev.name} cluster {cluster}")
        if mask and data_offset + mask.bit_count() * fmt.BLOCK_SIZE > self.plain_size:
            raise ArchiveIndexError(f"index in {self.source} damaged: {dev.name} cluster {cluster} "
                                    f"points past the end of the archive")
        return Record(extent, data_offset, mask, bytes(value))

    def masks(self, dev: IndexDevice, first: int, count: int) -> Iterator[tuple[int, bool]]:
        """(mask, digest is the all-zero one) of clusters ``first..first+count-1``, unpacked in bulk
        (allocation walks whole devices; :meth:`record` per cluster costs 10x more)."""
        if not 0 <= first <= first + count <= dev.clusters:
            raise ArchiveIndexError(f"clusters {first}+{count} beyond the end of {dev.name}")
        zero = self.zero_digest
        at = dev.records_offset + first * RECORD.size
        for _, extent, mask, flags, value in RECORD.iter_unpack(self._view[at:at + count * RECORD.size]):
            if not flags & RECORD_PRESENT or extent >= self.extent_count:
                raise ArchiveIndexError(f"index in {self.source} damaged: no record of a {dev.name} cluster")
            yield mask, value == zero

    def check_cluster(self, dev: IndexDevice, cluster: int, mask: int,
                      data: bytes | bytearray | memoryview | None) -> None:
        """Raise DataChecksumError unless a cluster as read from the archive is the one the index recorded.

        ``data`` is the whole cluster (omitted blocks zero), None for mask 0.
        """
        record = self.record(dev, cluster)
        value = self.zero_digest if data is None else self.digest_of(data)
        if value != record.digest or mask != record.mask:
            raise DataChecksumError(dev.name, cluster, record.data_offset)

    def digest_of(self, data: bytes | bytearray | memoryview) -> bytes:
        """This index's digest of a full cluster (xxh3-128, or BLAKE2b-128 for an index that says so)."""
        if self.algorithm == DIGEST_XXH3_128:
            return xxhash.xxh3_128_digest(data)
        return hashlib.blake2b(data, digest_size=16).digest()

    def extent(self, n: int) -> tuple[int, int, int]:
        """(plain offset, block_count, used slots) of extent ``n``."""
        offset, block_count, used = EXTENT.unpack_from(self._view, self._extents_offset + n * EXTENT.size)
        return int(offset), int(block_count), int(used)

    def frame(self, n: int) -> tuple[int, int]:
        """(compressed offset, plain offset) of frame ``n``; ``n == frame_count`` gives the ends."""
        compressed, plain = FRAME.unpack_from(self._view, self._frames_offset + n * FRAME.size)
        return int(compressed), int(plain)

    def frame_at(self, plain_offset: int) -> int:
        """The frame holding plain byte ``plain_offset`` (binary search over the mapped table)."""
        if self._frame_plain is None:
            self._frame_plain = _FramePlainOffsets(self)
        n = bisect.bisect_right(self._frame_plain, plain_offset) - 1
        if not 0 <= n < self.frame_count:
            raise ArchiveIndexError(f"index in {self.source} damaged: no frame holds plain byte {plain_offset}")
        return n

    def close(self) -> None:
        self._view.release()
        with contextlib.suppress(BufferError):
            self._map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def archive_uuid(archive: Path) -> UUID:
    """The uuid in the archive's VMA header (only the header is read)."""
    with open_archive(str(archive), read_to_end=False) as source:
        return VmaReader(source).uuid


class _FramePlainOffsets(Sequence[int]):
    """The frame table's plain offsets as a sequence for :mod:`bisect`, read from the map."""

    def __init__(self, index: ArchiveIndex) -> None:
        self._index = index

    def __len__(self) -> int:
        return int(self._index.frame_count) + 1

    def __getitem__(self, n: int) -> int:  # type: ignore[override]
        return int(self._index.frame(n)[1])
