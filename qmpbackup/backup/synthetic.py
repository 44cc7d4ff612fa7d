"""Completes an incremental read into a full archive: unchanged clusters from the previous archive.

After QEMU's incremental jobs have ended (their targets deleted, every dirty cluster
received), each incremental drive's :class:`ClusterAssembler` still lacks the clusters
that did not change since the previous archive. This module streams the previous archive
once, validating every extent as it is read (:class:`qmpbackup.vma.VmaReader`, including
the final missing-cluster check), and hands each such cluster to its assembler. The
result is a complete, standard VMA: a "synthetic full".

A previous archive that turns out damaged (or replaced) fails the run with
:class:`PreviousArchiveError`; the caller then drops the base bitmaps so the next run
reads everything. Errors of the *new* archive (its writer, compressor, disk) are not
wrapped: they are not the previous archive's fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Mapping

from qmpbackup.backup.archive_config import vma_device_name
from qmpbackup.backup.assembler import ClusterAssembler
from qmpbackup.backup.datapath import DISCONNECT_TIMEOUT_S, ArchiveDataPath
from qmpbackup.backup.incremental import IncrementalPlan, PreviousArchive
from qmpbackup.errors import QmpBackupError
from qmpbackup.qemu.session import QmpSession
from qmpbackup.vma import Extent, VmaReader
from qmpbackup.vma.archive_io import open_archive

log = logging.getLogger(__name__)

#: Extents handled between two returns to the event loop (one extent is at most ~3.8 MiB).
_EXTENTS_PER_YIELD = 8
#: How long the reader thread may take for one chunk of the previous archive.
READ_STALL_S = 300.0


class PreviousArchiveError(QmpBackupError):
    """The previous archive could not be read back completely and correctly."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        super().__init__(f"previous archive {path} is damaged or unreadable ({detail}); "
                         f"the next backup will read the whole disk")


async def fill_from_previous(previous: PreviousArchive,
                             assemblers: Mapping[str, ClusterAssembler]) -> dict[str, int]:
    """Emit every cluster the assemblers (by VMA device name) lack from ``previous``.

    Returns the bytes taken per device name.
    """
    name = previous.path.name
    reused = dict.fromkeys(assemblers, 0)

    def fail(detail: str) -> PreviousArchiveError:
        return PreviousArchiveError(name, detail)

    try:
        with open_archive(str(previous.path)) as source:
            reader = VmaReader(source)
            problem = _header_problem(previous, reader, assemblers)
            if problem is not None:
                raise fail(problem)
            by_id = {dev_id: (dev.name, assemblers[dev.name]) for dev_id, dev in reader.devices.items()
                     if dev.name in assemblers}
            with _ExtentStream(reader) as extents:
                count = 0
                while True:
                    try:
                        extent = await extents.next()
                    except QmpBackupError as exc:
                        raise fail(str(exc)) from exc
                    if extent is None:
                        break
                    _apply(extent, by_id, reused)
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


class _ExtentStream:
    """Reads, decompresses and validates the previous archive's extents in a thread, a few ahead.

    The new archive's side (packing, compressing, O_DIRECT writes) runs in the caller's
    thread; file reads, decompression and our writes release the GIL, so the two sides
    overlap instead of taking turns. Errors of the reader are raised where the caller
    would have met them.
    """

    DEPTH = 8

    def __init__(self, reader: VmaReader) -> None:
        self._reader = reader
        self._queue: queue.Queue[Extent | BaseException | None] = queue.Queue(self.DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="previous-archive-reader", daemon=True)

    def __enter__(self) -> _ExtentStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)  # unblock a put
        self._thread.join()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wakes a consumer still waiting in a worker thread

    def _run(self) -> None:
        try:
            for extent in self._reader.extents():
                if not self._put(extent):
                    return
            self._put(None)
        except BaseException as exc:  # handed to the consumer, who raises it
            self._put(exc)

    def _put(self, item: Extent | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    async def next(self) -> Extent | None:
        """The next extent, None at the end (after the reader's final checks passed).

        Waits off the event loop when the reader is behind, so signals still get through.
        """
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            try:
                item = await asyncio.to_thread(self._queue.get, True, READ_STALL_S)
            except queue.Empty:
                raise QmpBackupError(f"no data from the previous archive for {READ_STALL_S:.0f} s") from None
        if isinstance(item, BaseException):
            raise item
        return item


class _NewArchiveError(QmpBackupError):
    """Carries an error of the new archive through the previous archive's error handling."""

    def __init__(self, inner: QmpBackupError) -> None:
        self.inner = inner
        super().__init__(str(inner))


def _apply(extent: Extent, by_id: Mapping[int, tuple[str, ClusterAssembler]], reused: dict[str, int]) -> None:
    for cluster in extent.clusters:
        target = by_id.get(cluster.dev_id)
        if target is None:
            continue
        devname, assembler = target
        try:
            taken = assembler.emit_reused(cluster.cluster_num, cluster.data)
        except QmpBackupError as exc:
            raise _NewArchiveError(exc) from exc
        reused[devname] += taken


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
        reused = await fill_from_previous(plan.previous, {n: by_name[n] for n in wanted})
    except PreviousArchiveError:
        await plan.drop_bases(session)
        raise
    return {wanted[n]: size for n, size in reused.items()}
