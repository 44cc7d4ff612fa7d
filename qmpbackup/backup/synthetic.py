"""Completes an incremental read into a full archive: unchanged clusters from the previous archive.

After QEMU's incremental jobs have ended (their targets deleted, every dirty cluster
received), each incremental drive's :class:`ClusterAssembler` still lacks the clusters
that did not change since the previous archive. This module streams the previous archive
once, validating every extent as it is read (:class:`qmpbackup.vma.VmaReader`, including
the final missing-cluster check), and writes each old extent again without its changed
clusters: the stored blocks as they are, no zero scan, no repacking. Where the previous
archive is zstd in frames (:mod:`qmpbackup.zstd_frames`) and the new one is too, a frame
whose clusters all stayed goes over compressed as it is; every frame is still
decompressed and checked. The result is a complete, standard VMA: a "synthetic full".

A previous archive that turns out damaged (or replaced) fails the run with
:class:`PreviousArchiveError`; the caller then drops the base bitmaps so the next run
reads everything. Errors of the *new* archive (its writer, compressor, disk) are not
wrapped: they are not the previous archive's fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

from qmpbackup.backup.archive_config import vma_device_name
from qmpbackup.backup.assembler import ClusterAssembler
from qmpbackup.backup.datapath import DISCONNECT_TIMEOUT_S, ArchiveDataPath
from qmpbackup.backup.incremental import IncrementalPlan, PreviousArchive
from qmpbackup.errors import QmpBackupError
from qmpbackup.handoff import Handoff, Owner
from qmpbackup.qemu.session import QmpSession
from qmpbackup.compress import ZSTD_MAGIC
from qmpbackup.vma import Extent, VmaReader
from qmpbackup.vma import format as fmt
from qmpbackup.vma.archive_io import archive_head, open_archive, open_input
from qmpbackup.vma.index import ArchiveIndex, ArchiveIndexError, IndexDevice, stored_digest
from qmpbackup.vma.reader import ByteSource
from qmpbackup.vma.writer import ReusedPart, VmaWriter
from qmpbackup.zstd_frames import Frame, FrameTrackingSource

log = logging.getLogger(__name__)

#: Extents handled between two returns to the event loop (one extent is at most ~3.8 MiB).
_EXTENTS_PER_YIELD = 8


class PreviousArchiveError(QmpBackupError):
    """The previous archive could not be read back completely and correctly.

    The run is then repeated reading every disk in full (:func:`qmpbackup.backup.guest_backup.backup_guest`).
    """

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        super().__init__(f"previous archive {path} is damaged or unreadable ({detail}): reading the whole disk")


class PreviousClusterDamaged(PreviousArchiveError):
    """A cluster of the previous archive does not match its digest in that archive's index."""

    def __init__(self, path: str, device: str, cluster: int) -> None:
        self.path = path
        QmpBackupError.__init__(self, f"previous archive {path} damaged at {device} cluster {cluster}: "
                                      f"reading the whole disk")


async def fill_from_previous(previous: PreviousArchive, assemblers: Mapping[str, ClusterAssembler],
                             writer: VmaWriter) -> dict[str, int]:
    """Write every cluster the assemblers (by VMA device name) lack from ``previous`` into ``writer``.

    Returns the bytes taken per device name.
    """
    name = previous.path.name
    reused = dict.fromkeys(assemblers, 0)

    def fail(detail: str) -> PreviousArchiveError:
        return PreviousArchiveError(name, detail)

    try:
        index = ArchiveIndex.open(previous.path)
    except ArchiveIndexError as exc:
        raise fail(str(exc)) from exc
    try:
        with index, _open_previous(str(previous.path)) as (source, take_frames):
            reader = VmaReader(source)
            problem = _header_problem(previous, reader, assemblers)
            if problem is not None:
                raise fail(problem)
            by_id: dict[int, _Target] = {}
            for dev_id, dev in reader.devices.items():
                if dev.name in assemblers:
                    found = index.device(dev.name)
                    if found is None or found.size != dev.size:
                        raise fail(f"its index does not describe {dev.name}")
                    by_id[dev_id] = _Target(dev.name, assemblers[dev.name], found)
            check = _DigestCheck(name, index)
            with _ExtentStream(reader, take_frames) as extents:
                count = 0
                while True:
                    try:
                        item = await extents.next()
                    except QmpBackupError as exc:
                        raise fail(str(exc)) from exc
                    if item is None:
                        break
                    _reuse(*item, by_id, writer, reused, check)
                    count += 1
                    if count % _EXTENTS_PER_YIELD == 0:
                        await asyncio.sleep(0)
    except PreviousArchiveError:
        raise
    except QmpBackupError as exc:
        # Opening, the header, or the decompressor's end-of-stream check.
        if isinstance(exc, _NewArchiveError):
            raise exc.inner  # noqa: B904 - the new archive's own error, unchanged
        raise fail(str(exc)) from exc
    for devname, assembler in assemblers.items():
        missing = assembler.first_missing()
        if missing is not None:
            raise fail(f"{devname}: cluster {missing} is in neither the VM's changes nor the archive")
    log.debug("reused from %s: %s", name, reused)
    return reused


@contextlib.contextmanager
def _open_previous(path: str) -> Iterator[tuple[ByteSource, Callable[[int], list[Frame]] | None]]:
    """The previous archive's plain bytes, and for zstd a way to get its frames by plain offset."""
    if archive_head(path, len(ZSTD_MAGIC)) != ZSTD_MAGIC:
        with open_archive(path) as source:
            yield source, None
        return
    with open_input(path) as raw:
        frames = FrameTrackingSource(raw)
        yield frames, frames.take_frames


class _ExtentStream:
    """Reads, decompresses and validates the previous archive's extents in a thread, a few ahead.

    The new archive's side (packing, compressing, O_DIRECT writes) runs in the caller's
    thread; file reads, decompression and our writes release the GIL, so the two sides
    overlap instead of taking turns. Errors of the reader are raised where the caller
    would have met them; it stalls as every hand-off does (:mod:`qmpbackup.handoff`).
    """

    DEPTH = 8

    def __init__(self, reader: VmaReader, take_frames: Callable[[int], list[Frame]] | None) -> None:
        self._reader = reader
        self._take_frames = take_frames
        self._handoff: Handoff[tuple[Extent, list[Frame]]] = Handoff(
            self.DEPTH, "reading the previous archive", owner=Owner.CONSUMER)

    def __enter__(self) -> _ExtentStream:
        self._handoff.start(self._run, "previous-archive-reader")
        return self

    def __exit__(self, *exc: object) -> None:
        self._handoff.stop()

    def _run(self) -> None:
        for extent in self._reader.extents(clusters=False):
            frames = [] if self._take_frames is None else self._take_frames(extent.offset + extent.size)
            if not self._handoff.put((extent, frames)):
                return

    async def next(self) -> tuple[Extent, list[Frame]] | None:
        """The next extent and its frames, None at the end (after the reader's final checks passed).

        Waits off the event loop when the reader is behind, so signals still get through.
        """
        return await self._handoff.get_async()


class _NewArchiveError(QmpBackupError):
    """Carries an error of the new archive through the previous archive's error handling."""

    def __init__(self, inner: QmpBackupError) -> None:
        self.inner = inner
        super().__init__(str(inner))


class _Target(NamedTuple):
    """A device of the previous archive that the new one takes clusters from."""

    name: str
    assembler: ClusterAssembler
    indexed: IndexDevice


class _DigestCheck:
    """Every cluster taken from the previous archive must match that archive's index."""

    def __init__(self, path: str, index: ArchiveIndex) -> None:
        self._path = path
        self._index = index

    def __call__(self, target: _Target, cluster: int, mask: int, payload: memoryview, at: int) -> bytes:
        """The cluster's digest; PreviousClusterDamaged when its stored blocks are not what was backed up."""
        try:
            record = self._index.record(target.indexed, cluster)
        except ArchiveIndexError as exc:
            raise PreviousArchiveError(self._path, str(exc)) from exc
        value = stored_digest(payload, at, mask)
        if value != record.digest or mask != record.mask:
            raise PreviousClusterDamaged(self._path, target.name, cluster)
        return value


def _reuse(extent: Extent, frames: list[Frame], by_id: Mapping[int, _Target],
           writer: VmaWriter, reused: dict[str, int], check: _DigestCheck) -> None:
    """Write ``extent`` again without the clusters QEMU sent (or that belong to no wanted drive).

    Its stored blocks are split where its frames end; a part whose clusters all stay
    carries its frame along, the others only their kept blocks. Every cluster taken is
    checked against the previous archive's index first.
    """
    data_start = extent.offset + fmt.EXTENT_HEADER_SIZE
    frame_at = {f.plain_start - data_start: f for f in frames if f.plain_start >= data_start}
    ends = {f.plain_end - data_start for f in frames}
    payload = memoryview(extent.payload)
    zero_slots: list[tuple[int, int, int]] = []
    zero_digests: list[bytes] = []
    parts: list[ReusedPart] = []
    kept: list[tuple[int, int, int]] = []
    kept_digests: list[bytes] = []
    kept_ranges: list[tuple[int, int]] = []
    whole = True
    group_start = pos = 0
    try:
        for info in extent.blockinfo:
            mask, dev_id, cluster_num = fmt.split_blockinfo(info)
            if dev_id == 0:
                continue
            target = by_id.get(dev_id)
            taken = 0 if target is None else target.assembler.adopt_reused(cluster_num, mask)
            if taken:
                assert target is not None
                assembler = target.assembler
                reused[target.name] += taken
                value = check(target, cluster_num, mask, payload, pos)
            if mask == 0:
                if taken:
                    zero_slots.append((assembler.dev_id, cluster_num, 0))
                    zero_digests.append(value)
                continue
            length = mask.bit_count() * fmt.BLOCK_SIZE
            if taken:
                kept.append((assembler.dev_id, cluster_num, mask))
                kept_digests.append(value)
                kept_ranges.append((pos, pos + length))
            else:
                whole = False
            pos += length
            if pos in ends or pos == len(payload):
                if kept:
                    parts.append(_part(payload, group_start, pos, kept, kept_ranges, whole, frame_at,
                                       tuple(kept_digests)))
                kept, kept_digests, kept_ranges, whole, group_start = [], [], [], True, pos
        if zero_slots:
            parts.insert(0, ReusedPart(tuple(zero_slots), b"", digests=tuple(zero_digests)))
        writer.write_reused_extent(parts)
    except PreviousArchiveError:
        raise
    except QmpBackupError as exc:
        raise _NewArchiveError(exc) from exc


def _part(payload: memoryview, start: int, end: int, kept: list[tuple[int, int, int]],
          ranges: list[tuple[int, int]], whole: bool, frame_at: Mapping[int, Frame],
          digests: tuple[bytes, ...]) -> ReusedPart:
    if whole:
        frame = frame_at.get(start)
        copy = frame is not None and frame.compressed is not None and frame.plain_end - frame.plain_start == end - start
        return ReusedPart(tuple(kept), payload[start:end], frame.compressed if copy else None,  # type: ignore[union-attr]
                          digests)
    return ReusedPart(tuple(kept), b"".join(payload[a:b] for a, b in ranges), digests=digests)


def _header_problem(previous: PreviousArchive, reader: VmaReader,
                    assemblers: Mapping[str, ClusterAssembler]) -> str | None:
    if reader.uuid != previous.uuid:
        return f"its uuid changed from {previous.uuid} to {reader.uuid} since the run started"
    sizes = {dev.name: dev.size for dev in reader.devices.values()}
    for devname, assembler in assemblers.items():
        if sizes.get(devname) != assembler.size:
            return f"device {devname} has size {sizes.get(devname)}, expected {assembler.size}"
    return None


async def complete_from_previous(plan: IncrementalPlan, datapath: ArchiveDataPath,
                                 session: QmpSession) -> dict[str, int]:
    """After the jobs' targets were deleted: fill the incremental drives; bytes reused per drive key.

    A damaged previous archive fails the run and drops the base bitmaps, so the next run
    falls back to a full read instead of failing the same way again.
    """
    if not plan.incremental or plan.previous is None:
        return {}
    for export in datapath.assemblers:
        await datapath.server.wait_disconnected(export, DISCONNECT_TIMEOUT_S)
    datapath.server.check()
    by_name = {a.name: a for a in datapath.assemblers.values()}
    wanted = {vma_device_name(d.key): d.key for d in plan.incremental}
    try:
        reused = await fill_from_previous(plan.previous, {n: by_name[n] for n in wanted}, datapath.writer)
    except PreviousArchiveError:
        await plan.drop_bases(session)
        raise
    return {wanted[n]: size for n, size in reused.items()}
