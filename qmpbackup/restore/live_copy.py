"""The copy of a live restore: QEMU block jobs fill the new images while the VM runs on them.

Each image starts as an empty qcow2 over the archive's export (see :mod:`qmpbackup.restore.live`).
One ``blockdev-mirror`` job per disk (``sync=full``) copies the whole disk, as the guest sees
it, into a fresh qcow2 without backing, and then QEMU pivots the device onto it. The mirror
reads with many requests in flight, where ``block-stream`` copies one chunk after the other;
and it keeps the guest's writes: a write during the copy marks its clusters dirty and they are
copied again, so the guest's data always wins over the archive's.

The fresh image is made under a hidden name, ``.<image>.live-target``, and takes the image's name
only after QEMU moved the VM onto it, with the VM paused from the pivot to the rename. So the
image's name is always a whole disk: before the pivot the overlay, whose backing is the export
(opening it without the export fails loudly instead of booting half a disk), after it the fresh
image. Every step can be repeated after a crash: ``--resume`` looks at what QEMU and the files say
and goes on from there. Until the VM restarts, QEMU names the fresh image by its hidden name.

A job that fails (a damaged cluster reads as an I/O error) pauses the VM instead of letting it
run on half a disk: nothing is deleted, and the error names the damaged cluster as ``verify``
does, from what the export saw (:class:`ReadFailures`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from qmpbackup.atomic_file import fsync_directory
from qmpbackup.errors import QmpBackupError
from qmpbackup.qemu.session import QmpSession
from qmpbackup.restore.errors import RestoreError
from qmpbackup.restore.qcow2 import create_qcow2
from qmpbackup.restore.placement import TEMP_SUFFIX, work_name
from qmpbackup.vma.index import DataChecksumError
from qmpbackup.vma.random_access import ALLOCATION_RUNS, DeviceReader, Piece

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
JOB_PREFIX = "live-restore-"  # the job's id, and the fresh image's node name
TARGET_SUFFIX = ".live-target"
_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR", "BLOCK_JOB_READY", "BLOCK_JOB_CANCELLED")


class CopyFailed(RestoreError):
    """A copy job failed or was cancelled; the VM was paused for it."""


class CopyTarget(Protocol):
    """What the copy needs of an image: its final name and size, and the archive device it comes from."""

    @property
    def final(self) -> Path: ...

    @property
    def size(self) -> int: ...

    @property
    def source(self) -> str: ...

    @property
    def discard(self) -> bool: ...


class ReadFailures:
    """The last failed read of each served device, kept for the job's error (QEMU reports only EIO)."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def watch(self, reader: DeviceReader) -> WatchedDevice:
        return WatchedDevice(reader, self._last)

    def of(self, device: str) -> str | None:
        return self._last.get(device)


class WatchedDevice:
    """An archive device as an export source that remembers why a read failed."""

    def __init__(self, reader: DeviceReader, last: dict[str, str]) -> None:
        self._reader = reader
        self._last = last

    @property
    def size(self) -> int:
        return self._reader.size

    def pieces(self, offset: int, length: int, /) -> list[Piece]:
        try:
            return self._reader.pieces(offset, length)
        except DataChecksumError as exc:
            self._last[self._reader.name] = str(exc)
            raise
        except QmpBackupError as exc:  # e.g. a damaged zstd frame: name the first cluster that fails
            self._last[self._reader.name] = f"{exc} ({self._first_bad_cluster(offset, length)})"
            raise

    def _first_bad_cluster(self, offset: int, length: int) -> str:
        cluster_size = 1 << 16
        for start in range(offset - offset % cluster_size, offset + length, cluster_size):
            try:
                self._reader.read(start, min(cluster_size, self._reader.size - start))
            except QmpBackupError:
                return f"in {self._reader.name} cluster {start // cluster_size}"
        return f"reading {self._reader.name} at {offset}+{length}"

    def allocation(self, offset: int, length: int, max_runs: int = ALLOCATION_RUNS, /
                   ) -> list[tuple[int, int, bool]]:
        return self._reader.allocation(offset, length, max_runs)


async def copy_disks(session: QmpSession, devices: Mapping[str, CopyTarget], speed: int, started: float,
                     failures: ReadFailures, paused_marker: Path) -> None:
    """Copy every disk still on its archive overlay (jobs left by a killed run go on); progress lines;
    the VM paused when a job fails, or when anything else fails once the VM runs: its export ends with
    us, and a guest left running would see read errors once QEMU stops waiting for it.
    ``paused_marker`` exists while the VM is paused by us."""
    pivot = _Pivot(session, paused_marker)
    try:
        await _copy(session, devices, speed, started, failures, pivot)
    except Exception:
        await pivot.pause()
        raise


async def _copy(session: QmpSession, devices: Mapping[str, CopyTarget], speed: int, started: float,
                failures: ReadFailures, pivot: _Pivot) -> None:
    async with session.events(_EVENTS) as events:
        running = {j["device"]: j for j in await session.execute("query-block-jobs")}
        backed = {name for name, inserted in (await inserted_by_device(session)).items()
                  if inserted.get("backing_file")}
        nodes = {n.get("node-name") for n in await session.execute("query-named-block-nodes")}
        pending: dict[str, str] = {}  # job -> device
        for device, image in devices.items():
            job = JOB_PREFIX + device
            if job in running:
                await _go_on(session, job, running[job], pivot)
                pending[job] = device
            elif device in backed:
                await _start_mirror(session, device, image, speed, stale_node=JOB_PREFIX + device in nodes)
                pending[job] = device
            else:
                _take_final_name(image.final)
        await pivot.resume_vm_if_done()
        total = sum(p.size for p in devices.values())
        last = time.monotonic()
        while pending:
            try:
                event = await events.wait_for(lambda e: e["data"].get("device") in pending, PROGRESS_EVERY_S)
            except (TimeoutError, QmpBackupError):
                event = None
            if event is not None:
                job, data = event["data"]["device"], event["data"]
                device = pending[job]
                if event["event"] == "BLOCK_JOB_READY":
                    await pivot.start(job)
                elif event["event"] == "BLOCK_JOB_CANCELLED":
                    raise CopyFailed(f"live restore of {device}: its copy job was cancelled; the VM is paused, "
                                     "nothing was deleted")
                elif event["event"] == "BLOCK_JOB_ERROR" or data.get("error"):
                    seen = failures.of(devices[device].source) if data.get("operation") != "write" else None
                    reason = seen or data.get("error") or f"{data.get('operation', 'I/O')} error"
                    raise CopyFailed(f"live restore of {device} failed: {reason}; the VM is paused, nothing "
                                     "was deleted")
                else:
                    _take_final_name(devices[device].final)
                    del pending[job]
                    await pivot.done(job)
            if time.monotonic() - last >= PROGRESS_EVERY_S or not pending:
                last = time.monotonic()
                jobs = {j["device"]: j for j in await session.execute("query-block-jobs")}
                done = sum(_copied(p.size, jobs.get(JOB_PREFIX + d)) for d, p in devices.items())
                log.info("progress %d%% (copied %d of %d bytes, duration %d sec)", done * 100 // max(total, 1),
                         done, total, time.monotonic() - started)


def _copied(size: int, job: dict[str, Any] | None) -> int:
    if job is None:
        return size
    return size * int(job["offset"]) // max(int(job["len"]), 1)  # a mirror's len grows with guest writes


async def inserted_by_device(session: QmpSession) -> dict[str, dict[str, Any]]:
    """Each block device's ``inserted`` record, by device name (or node name)."""
    out: dict[str, dict[str, Any]] = {}
    for dev in await session.execute("query-block"):
        inserted = dev.get("inserted") or {}
        name = dev.get("device") or inserted.get("node-name")
        if name:
            out[name] = inserted
    return out


async def _go_on(session: QmpSession, job: str, info: dict[str, Any], pivot: _Pivot) -> None:
    """A job a killed run left: resume it when paused, pivot it when ready."""
    if info.get("status") == "paused" or info.get("paused"):
        await session.execute("block-job-resume", {"device": job})
    if info.get("status") == "ready" or info.get("ready"):
        await pivot.start(job)


class _Pivot:
    """Completes ready jobs with the VM paused, so that no guest write reaches the fresh image before
    it has the image's name: a crash in between leaves the overlay, equal to it, under that name."""

    def __init__(self, session: QmpSession, marker: Path) -> None:
        self._session = session
        self._marker = marker
        self._jobs: set[str] = set()

    async def start(self, job: str) -> None:
        if not self._marker.exists() and (await self._session.execute("query-status")).get("running"):
            await self.pause()
        self._jobs.add(job)
        await self._session.execute("block-job-complete", {"device": job})

    async def done(self, job: str) -> None:
        self._jobs.discard(job)
        await self.resume_vm_if_done()

    async def pause(self) -> None:
        """Pause the VM; the marker first, so that a run killed in between leaves it to ``--resume``."""
        self._marker.touch()
        with contextlib.suppress(QmpBackupError):
            await self._session.execute("stop")

    async def resume_vm_if_done(self) -> None:
        if not self._jobs and self._marker.exists():
            await self._session.execute("cont")
            self._marker.unlink()


async def _start_mirror(session: QmpSession, device: str, image: CopyTarget, speed: int, *,
                        stale_node: bool) -> None:
    job = node = JOB_PREFIX + device
    if stale_node:  # added by a run killed before its job started
        await session.execute("blockdev-del", {"node-name": node})
    inserted = (await inserted_by_device(session)).get(device, {})
    target = await asyncio.to_thread(_fresh_target, image)
    cache = inserted.get("cache") or {}
    await session.execute("blockdev-add", {
        "driver": "qcow2", "node-name": node, "discard": "unmap" if image.discard else "ignore",
        "cache": {"direct": bool(cache.get("direct")), "no-flush": bool(cache.get("no-flush"))},
        "file": {"driver": "file", "filename": str(target)}})
    args: dict[str, object] = {"job-id": job, "device": device, "target": node, "sync": "full",
                               "on-source-error": "stop", "on-target-error": "stop"}
    if speed:
        args["speed"] = speed
    await session.execute("blockdev-mirror", args)


def _fresh_target(image: CopyTarget) -> Path:
    """An empty qcow2 under the hidden name (made again when an earlier try left one)."""
    target, temp = work_name(image.final, TARGET_SUFFIX), work_name(image.final, TEMP_SUFFIX)
    temp.unlink(missing_ok=True)
    create_qcow2(temp, image.size)
    os.replace(temp, target)
    fsync_directory(target.parent)
    return target


def _take_final_name(final: Path) -> None:
    """The fresh image, now the VM's disk, replaces the overlay under the image's name."""
    target = work_name(final, TARGET_SUFFIX)
    if target.exists():
        os.replace(target, final)
        fsync_directory(final.parent)
