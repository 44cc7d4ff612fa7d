"""Streaming VMA writer that lays archives out the way Proxmox does (docs/format.md W1-W6).

Clusters of any device arrive in any order. Each is zero-checked block by
block, packed into a preallocated extent buffer, and the extent goes to the
sink once 58 slots are used. Memory is one extent buffer plus a seen-cluster
bitmap (1 bit per cluster).

A sink that compresses in frames (``end_frame``, see :mod:`qmpbackup.zstd_frames`)
is told where to cut: after the extent header and after the data of every 16
slots. An incremental run can then take whole frames of the previous archive
(:meth:`VmaWriter.write_reused_extent`) instead of compressing their clusters again.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
import uuid as uuid_module
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from qmpbackup.errors import StateError
from qmpbackup.vma import format as fmt
from qmpbackup.vma.cluster_map import ClusterMap
from qmpbackup.vma.errors import VmaError
from qmpbackup.vma.header import encode_header, encode_name
from qmpbackup.vma.index import ZERO_DIGEST, IndexBuilder, digest, slot_digests

log = logging.getLogger(__name__)

_BLOCK_BOUNDS = tuple((j * fmt.BLOCK_SIZE, (j + 1) * fmt.BLOCK_SIZE, 1 << j) for j in range(fmt.BLOCKS_PER_CLUSTER))
_EXTENT_BUFFER_SIZE = fmt.EXTENT_HEADER_SIZE + fmt.WRITER_SLOTS * fmt.CLUSTER_SIZE
FRAME_SLOTS = 16
"""Slots whose data make one compressed frame (at most 1 MiB of data)."""


class ByteSink(Protocol):
    """Where archive bytes go. ``write`` must take all of ``data`` before returning and keep no
    reference to it: the writer reuses its extent buffer (files, pipes and compressors do this)."""

    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...


@dataclass(frozen=True, slots=True)
class ReusedPart:
    """Clusters taken as they are from another archive, for :meth:`VmaWriter.write_reused_extent`.

    ``slots`` are (dev_id in this archive, cluster_num, mask); ``payload`` their stored
    blocks in slot order; ``frame`` the same payload as one compressed zstd frame of
    the other archive, when it was one; ``digests`` the clusters' digests (one per slot)
    when they are known already (checked against the other archive's index).
    """

    slots: tuple[tuple[int, int, int], ...]
    payload: bytes | memoryview
    frame: bytes | None = None
    digests: tuple[bytes, ...] | None = None


class WriterState(enum.Enum):
    COLLECTING = "collecting"  # configs and devices may be added
    WRITING = "writing"  # header written, clusters arriving
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(slots=True)
class _Device:
    dev_id: int
    name: str
    size: int
    clusters: int
    tail: int  # valid bytes in the last cluster (CLUSTER_SIZE when the size is a multiple)
    seen: ClusterMap


def _basename(name: str) -> str:
    """What g_path_get_basename keeps of a config path: the last non-empty component."""
    stripped = name.rstrip("/")
    return stripped.rsplit("/", 1)[-1] if stripped else ""


class VmaWriter:
    """Writes one VMA archive to a :class:`ByteSink`.

    Usage: ``add_config``/``add_device`` first, then ``write_cluster`` for every
    cluster of every device exactly once (any order), then ``close``.
    """

    def __init__(
        self,
        sink: ByteSink,
        *,
        uuid: uuid_module.UUID | None = None,
        ctime: int | None = None,
    ) -> None:
        self._sink = sink
        self._uuid = uuid if uuid is not None else uuid_module.uuid4()
        self._ctime = ctime
        self._configs: list[tuple[bytes, bytes]] = []
        self._config_names: set[str] = set()
        self._devices: list[_Device] = []
        self._state = WriterState.COLLECTING
        self._failure: BaseException | None = None  # what failed the writer: raised again on every call
        self._buf = bytearray(_EXTENT_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._slots: list[int] = []
        self._records: list[tuple[int, int, int, int, bytes]] = []  # the slots' index records (add_records)
        self._pos = fmt.EXTENT_HEADER_SIZE
        self._cuts: list[int] = []  # payload positions after every FRAME_SLOTS slots
        self._end_frame = getattr(sink, "end_frame", None)
        self._takes_frames = bool(getattr(sink, "takes_frames", False))
        self.bytes_written = 0
        self.extents_written = 0
        self.frames_reused = 0
        self.index: IndexBuilder | None = None
        """The archive's index (docs/format.md I), built as extents go out; the owner writes and closes it."""

    def __repr__(self) -> str:
        return f"<VmaWriter {self._uuid} {self._state.value}>"

    @property
    def uuid(self) -> uuid_module.UUID:
        return self._uuid

    @property
    def state(self) -> WriterState:
        return self._state

    def _require(self, *states: WriterState) -> None:
        if self._state not in states:
            raise StateError("VMA writer", self._state.value, "/".join(s.value for s in states))

    def add_config(self, name: str, data: bytes) -> None:
        """Store a config file under its basename (F3); at most 256, each at most 65535 bytes."""
        self._require(WriterState.COLLECTING)
        base = _basename(name)
        if not base or base in (".", "..") or "\0" in base:
            raise VmaError(f"invalid config file name {name!r}")
        if base in self._config_names:
            raise VmaError(f"duplicate config file name {base!r}")
        raw_name = encode_name(base)
        if len(raw_name) + 1 > fmt.MAX_BLOB_SIZE:
            raise VmaError(f"config file name too long: {base!r}")
        if len(data) > fmt.MAX_BLOB_SIZE:
            raise VmaError(f"config file {base!r} too large: {len(data)} bytes (at most {fmt.MAX_BLOB_SIZE})")
        if len(self._configs) >= fmt.MAX_CONFIGS:
            raise VmaError(f"too many config files (at most {fmt.MAX_CONFIGS})")
        self._configs.append((raw_name, bytes(data)))
        self._config_names.add(base)

    def add_device(self, name: str, size: int) -> int:
        """Register a disk (F4) and return its dev_id (1, 2, ... in registration order)."""
        self._require(WriterState.COLLECTING)
        if not name or "\0" in name or "/" in name or any(c.isspace() for c in name):
            raise VmaError(f"invalid device name {name!r} (no '/', NUL or white space)")
        if name == fmt.VMSTATE_NAME:
            raise VmaError("the device name 'vmstate' is reserved for RAM state")
        if any(dev.name == name for dev in self._devices):
            raise VmaError(f"duplicate device name {name!r}")
        if len(encode_name(name)) + 1 > fmt.MAX_BLOB_SIZE:
            raise VmaError(f"device name too long: {name!r}")
        if size <= 0 or size % fmt.SECTOR_SIZE:
            raise VmaError(f"device {name}: size {size} is not a positive multiple of {fmt.SECTOR_SIZE} bytes")
        clusters = fmt.cluster_count(size)
        if clusters > fmt.MAX_CLUSTERS:
            raise VmaError(f"device {name}: size {size} exceeds the format's 256 TiB")
        if len(self._devices) >= fmt.MAX_DEV_ID:
            raise VmaError(f"too many devices (at most {fmt.MAX_DEV_ID})")
        dev_id = len(self._devices) + 1
        tail = size - (clusters - 1) * fmt.CLUSTER_SIZE
        self._devices.append(_Device(dev_id, name, size, clusters, tail, ClusterMap(clusters)))
        log.debug("VMA device %d: %s, %d bytes", dev_id, name, size)
        return dev_id

    def _start(self) -> None:
        """Emit the header: from now on the configs and devices are fixed."""
        ctime = self._ctime if self._ctime is not None else int(time.time())
        self._ctime = ctime
        header = encode_header(
            self._uuid,
            ctime,
            self._configs,
            [(encode_name(dev.name), dev.size) for dev in self._devices],
        )
        self._state = WriterState.WRITING
        self.index = IndexBuilder(self._uuid, [(dev.dev_id, dev.name, dev.size) for dev in self._devices])
        self._emit(header)
        self._cut()

    def _fail(self, exc: BaseException) -> BaseException:
        """From now on the archive is lost: every later call raises ``exc`` again, nothing reaches the sink."""
        self._state = WriterState.FAILED
        if self._failure is None:
            self._failure = exc
        return exc

    def _check_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._sink.write(data)
        except BaseException as exc:
            self._fail(exc)
            raise
        self.bytes_written += len(data)

    def _new_cluster(self, dev_id: int, cluster_num: int) -> _Device:
        """The device of a cluster about to be written; refuses unknown, out-of-range and repeated ones."""
        if not 1 <= dev_id <= len(self._devices):
            raise VmaError(f"unknown VMA device id {dev_id}")
        dev = self._devices[dev_id - 1]
        if not 0 <= cluster_num < dev.clusters:
            raise VmaError(f"device {dev.name}: cluster {cluster_num} beyond the end ({dev.clusters} clusters)")
        if cluster_num in dev.seen:
            raise VmaError(f"device {dev.name}: cluster {cluster_num} written twice")
        return dev

    def write_cluster(self, dev_id: int, cluster_num: int, data: bytes | bytearray | memoryview | None) -> None:
        """Add one cluster (F6, W3): 65536 bytes, fewer for a last partial cluster, None = all zero."""
        self._check_failed()
        if self._state is not WriterState.WRITING:
            self._require(WriterState.COLLECTING)
            self._start()
        dev = self._new_cluster(dev_id, cluster_num)
        last = cluster_num == dev.clusters - 1
        valid = dev.tail if last else fmt.CLUSTER_SIZE
        mask = 0
        value = ZERO_DIGEST
        at = self._pos
        if data is not None:
            view = data if isinstance(data, memoryview) else memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            length = len(view)
            if length != valid and not (last and length == fmt.CLUSTER_SIZE):
                raise VmaError(f"device {dev.name}: cluster {cluster_num} has {length} bytes, expected {valid}")
            mask = self._pack(view, valid)
            if mask:
                # The blocks _pack left out are zero in ``view`` too, so the cluster as restored is
                # ``view`` (cut to the device): hashed here, once, while it is still in the cache.
                value = digest(view if valid == fmt.CLUSTER_SIZE else view[:valid])
        dev.seen.add(cluster_num)
        self._slots.append(fmt.blockinfo(mask, dev_id, cluster_num))
        self._records.append((dev_id, cluster_num, at, mask, value))
        if len(self._slots) % FRAME_SLOTS == 0:
            self._cuts.append(self._pos)
        if len(self._slots) >= fmt.WRITER_SLOTS:
            self._flush()

    def write_reused_extent(self, parts: list[ReusedPart]) -> None:
        """Write one extent of clusters taken from another archive, their stored blocks as they are.

        Zero clusters (mask 0) may be given as parts with an empty payload. A part's
        ``frame`` is copied when the sink takes frames; otherwise its payload is written.
        """
        self._check_failed()
        if self._state is not WriterState.WRITING:
            self._require(WriterState.COLLECTING)
            self._start()
        slots: list[int] = []
        try:
            for part in parts:
                stored = 0
                for dev_id, cluster_num, mask in part.slots:
                    self._new_cluster(dev_id, cluster_num).seen.add(cluster_num)
                    stored += mask.bit_count()
                    slots.append(fmt.blockinfo(mask, dev_id, cluster_num))
                if stored * fmt.BLOCK_SIZE != len(part.payload):
                    raise VmaError(f"reused clusters hold {stored} blocks but {len(part.payload)} bytes came")
            if len(slots) > fmt.EXTENT_SLOTS:
                raise VmaError(f"{len(slots)} reused clusters do not fit one extent ({fmt.EXTENT_SLOTS} slots)")
        except VmaError as exc:
            self._fail(exc)  # some clusters are marked written: this archive is lost
            raise
        if not slots:
            return
        block_count = sum(len(part.payload) for part in parts) // fmt.BLOCK_SIZE
        assert self.index is not None
        self.index.add_extent(self.bytes_written, block_count, _part_digests(parts))
        header = bytearray(fmt.EXTENT_HEADER_SIZE)
        fmt.EXTENT_HEADER.pack_into(header, 0, fmt.EXTENT_MAGIC, 0, block_count, self._uuid.bytes, bytes(16),
                                    *slots, *[0] * (fmt.EXTENT_SLOTS - len(slots)))
        header[fmt.EXTENT_MD5] = hashlib.md5(header).digest()
        self._emit(header)
        self._cut()
        for part in parts:
            if not part.payload:
                continue
            if part.frame is not None and self._takes_frames:
                self._emit_frame(part.frame, len(part.payload))
            else:
                self._emit(part.payload)
                self._cut()
        self.extents_written += 1

    def _cut(self) -> None:
        if self._end_frame is not None:
            try:
                self._end_frame()
            except BaseException as exc:
                self._fail(exc)
                raise

    def _emit_frame(self, frame: bytes, plain_length: int) -> None:
        try:
            self._sink.write_frame(frame)  # type: ignore[attr-defined]
        except BaseException as exc:
            self._fail(exc)
            raise
        self.bytes_written += plain_length
        self.frames_reused += 1

    def _pack(self, view: memoryview, valid: int) -> int:
        """Copy the non-zero blocks of one cluster into the extent buffer; return the mask."""
        buf = self._buf
        pos = self._pos
        if valid == fmt.CLUSTER_SIZE:
            if fmt.ZERO_CLUSTER.startswith(view):
                return 0
            # A block whose first byte is not zero is not a zero block: only blocks that
            # start with a zero byte need the full 4 KiB comparison.
            firsts = view[:: fmt.BLOCK_SIZE].tobytes()
            mask = fmt.FULL_MASK
            block = firsts.find(0)
            while block >= 0:
                start = block * fmt.BLOCK_SIZE
                if fmt.ZERO_BLOCK.startswith(view[start : start + fmt.BLOCK_SIZE]):
                    mask &= ~(1 << block)
                block = firsts.find(0, block + 1)
            if mask == fmt.FULL_MASK:
                buf[pos : pos + fmt.CLUSTER_SIZE] = view
                self._pos = pos + fmt.CLUSTER_SIZE
                return mask
        else:
            # Last partial cluster (W4): blocks starting at or past the end are never stored.
            view = view[:valid]
            mask = 0
            for start, end, bit in _BLOCK_BOUNDS:
                if start >= valid:
                    break
                if not fmt.ZERO_BLOCK.startswith(view[start:end]):
                    mask |= bit
        for start, end in fmt.stored_runs(mask):
            chunk = view[start:end]
            buf[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
            if len(chunk) < end - start:  # the last block straddles the device end: pad with zeros
                buf[pos : pos + end - start - len(chunk)] = fmt.ZERO_BLOCK[: end - start - len(chunk)]
                pos += end - start - len(chunk)
        self._pos = pos
        return mask

    def _flush(self) -> None:
        """Write the pending extent (W5): header with block count and MD5, then the payload."""
        buf = self._buf
        block_count = (self._pos - fmt.EXTENT_HEADER_SIZE) // fmt.BLOCK_SIZE
        slots = self._slots + [0] * (fmt.EXTENT_SLOTS - len(self._slots))
        fmt.EXTENT_HEADER.pack_into(
            buf, 0, fmt.EXTENT_MAGIC, 0, block_count, self._uuid.bytes, bytes(16), *slots
        )
        buf[fmt.EXTENT_MD5] = hashlib.md5(self._view[: fmt.EXTENT_HEADER_SIZE]).digest()
        assert self.index is not None
        self.index.add_records(self.bytes_written, block_count, self._records)
        if self._end_frame is None:
            self._emit(self._view[: self._pos])
        else:
            start = 0
            for cut in [fmt.EXTENT_HEADER_SIZE, *self._cuts, self._pos]:
                if cut > start:
                    self._emit(self._view[start:cut])
                    self._cut()
                    start = cut
        self.extents_written += 1
        self._slots = []
        self._records = []
        self._cuts = []
        self._pos = fmt.EXTENT_HEADER_SIZE

    def close(self) -> None:
        """Flush the last extent, empty or not, as Proxmox does (W6); fail on missing clusters.

        The coverage check comes first: an archive with a gap is never finished.
        """
        if self._state is WriterState.CLOSED:
            return
        self._check_failed()
        self._require(WriterState.COLLECTING, WriterState.WRITING)
        for dev in self._devices:
            missing = dev.seen.first_missing()
            if missing is not None:
                raise self._fail(VmaError(
                    f"device {dev.name}: cluster {missing} was never written "
                    f"({dev.clusters - dev.seen.seen} of {dev.clusters} clusters missing)"
                ))
        if self._state is WriterState.COLLECTING:
            self._start()
        self._flush()
        self._state = WriterState.CLOSED
        log.debug("VMA archive %s closed: %d bytes, %d extents", self._uuid, self.bytes_written, self.extents_written)


def _part_digests(parts: list[ReusedPart]) -> Iterator[tuple[int, int, int, bytes]]:
    """Index entries of reused clusters: their known digests, or hashed from their stored blocks."""
    for part in parts:
        if part.digests is not None:
            for (dev_id, cluster, mask), value in zip(part.slots, part.digests, strict=True):
                yield dev_id, cluster, mask, value
        else:
            yield from slot_digests((fmt.blockinfo(m, d, c) for d, c, m in part.slots), part.payload)
