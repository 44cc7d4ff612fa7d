"""The copy of a live restore: QEMU block jobs fill the new images while the VM runs on them.

Each image starts as an empty qcow2 over the archive's export (see :mod:`qmpbackup.restore.live`).
One ``blockdev-mirror`` job per disk (``sync=full``) copies the whole disk, as the guest sees
it, into a fresh qcow2 without backing, and then QEMU pivots the device onto it. The mirror
reads with many requests in flight, where ``block-stream`` copies one chunk after the other;
and it keeps the guest's writes: a write during the copy marks its clusters dirty and they are
copied again, so the guest's data always wins over the archive's.

The fresh image takes the image's name before the job starts (the overlay keeps a second
name, ``.<image>.live-source``, removed when the job completed), so that after the pivot the
VM's node opens the file the definition names. Every step can be repeated after a crash:
``--resume`` looks at what QEMU and the files say and goes on from there.

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
from qmpbackup.vma.random_access import ALLOCATION_RUNS, DeviceReader

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
JOB_PREFIX = "live-restore-"  # the job's id, and the fresh image's node name
SOURCE_SUFFIX = ".live-source"
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

    def read(self, offset: int, length: int, /) -> bytes | bytearray:
        try:
            return self._reader.read(offset, length)
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
                     failures: ReadFailures) -> None:
    """Copy every disk still on its archive overlay (jobs left by a killed run go on); progress lines;
    the VM paused when a job fails."""
    async with session.events(_EVENTS) as events:
        running = {j["device"]: j for j in await session.execute("query-block-jobs")}
        backed = {name for name, inserted in (await _inserted(session)).items() if inserted.get("backing_file")}
        nodes = {n.get("node-name") for n in await session.execute("query-named-block-nodes")}
        pending: dict[str, str] = {}  # job -> device
        for device, image in devices.items():
            job = JOB_PREFIX + device
            if job in running:
                await _go_on(session, job, running[job])
                pending[job] = device
            elif device in backed:
                await _start_mirror(session, device, image, speed, stale_node=JOB_PREFIX + device in nodes)
                pending[job] = device
            else:
                _drop_source(image.final)
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
                    await session.execute("block-job-complete", {"device": job})
                elif event["event"] == "BLOCK_JOB_CANCELLED":
                    await _pause(session)
                    raise CopyFailed(f"live restore of {device}: its copy job was cancelled; the VM is paused, "
                                     "nothing was deleted")
                elif event["event"] == "BLOCK_JOB_ERROR" or data.get("error"):
                    await _pause(session)
                    seen = failures.of(devices[device].source) if data.get("operation") != "write" else None
                    reason = seen or data.get("error") or f"{data.get('operation', 'I/O')} error"
                    raise CopyFailed(f"live restore of {device} failed: {reason}; the VM is paused, nothing "
                                     "was deleted")
                else:
                    _drop_source(devices[device].final)
                    del pending[job]
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


async def _inserted(session: QmpSession) -> dict[str, dict[str, Any]]:
    """Each block device's ``inserted`` record, by device name (or node name)."""
    out: dict[str, dict[str, Any]] = {}
    for dev in await session.execute("query-block"):
        inserted = dev.get("inserted") or {}
        name = dev.get("device") or inserted.get("node-name")
        if name:
            out[name] = inserted
    return out


async def _go_on(session: QmpSession, job: str, info: dict[str, Any]) -> None:
    """A job a killed run left: resume it when paused, pivot it when ready."""
    if info.get("status") == "paused" or info.get("paused"):
        await session.execute("block-job-resume", {"device": job})
    if info.get("status") == "ready" or info.get("ready"):
        await session.execute("block-job-complete", {"device": job})


async def _start_mirror(session: QmpSession, device: str, image: CopyTarget, speed: int, *,
                        stale_node: bool) -> None:
    job = node = JOB_PREFIX + device
    if stale_node:  # added by a run killed before its job started
        await session.execute("blockdev-del", {"node-name": node})
    inserted = (await _inserted(session)).get(device, {})
    await asyncio.to_thread(_fresh_image_under_final_name, image)
    cache = inserted.get("cache") or {}
    await session.execute("blockdev-add", {
        "driver": "qcow2", "node-name": node, "discard": "unmap" if image.discard else "ignore",
        "cache": {"direct": bool(cache.get("direct")), "no-flush": bool(cache.get("no-flush"))},
        "file": {"driver": "file", "filename": str(image.final)}})
    args: dict[str, object] = {"job-id": job, "device": device, "target": node, "sync": "full",
                               "on-source-error": "stop", "on-target-error": "stop"}
    if speed:
        args["speed"] = speed
    await session.execute("blockdev-mirror", args)


def _fresh_image_under_final_name(image: CopyTarget) -> None:
    """The overlay keeps the name ``.<image>.live-source``; the image's name gets an empty qcow2
    (each step can be repeated: a name left by an earlier try is made again)."""
    final, source, temp = image.final, work_name(image.final, SOURCE_SUFFIX), work_name(image.final, TEMP_SUFFIX)
    if not os.path.lexists(source):
        os.link(final, source)
    temp.unlink(missing_ok=True)
    create_qcow2(temp, image.size)
    os.replace(temp, final)
    fsync_directory(final.parent)


def _drop_source(final: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(work_name(final, SOURCE_SUFFIX))


async def _pause(session: QmpSession) -> None:
    with contextlib.suppress(QmpBackupError):
        await session.execute("stop")
