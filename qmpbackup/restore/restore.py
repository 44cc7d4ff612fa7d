"""``qmpbackup restore``: an archive becomes images plus a guest definition, or nothing changes.

Order of work, each step only after the previous one succeeded:

1. read the archive header; map devices to drives; decide image names and
   the new definition, and check it parses; refuse what exists (no
   ``--force``) or runs;
2. write every device to a hidden work file (sparse), checking every
   cluster; the reader's end-of-archive check finds missing clusters and the
   decompressor's end check finds damaged compression;
3. make qcow2 images from the raw work files, fsync everything;
4. publish: images, then the definition, renamed into place all or nothing.

Any failure or signal before step 4 removes the work files (and a storage
image directory this run created), so what existed before is untouched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from qmpbackup.errors import UsageError
from qmpbackup.guest_config import GuestDefinition, check_vmid, guest_path
from qmpbackup.restore.errors import RestoreError, RestoreRefusedError
from qmpbackup.restore.guest import ExistingGuest, read_existing, start_guest
from qmpbackup.restore.phases import (
    RestoreOptions, RestorePlan, log_header, make_dirs, plan_restore, refuse_existing, remove_leftovers,
    remove_work_files, restore_lock, write_definition_temp,
)
from qmpbackup.restore.placement import TEMP_SUFFIX, ImagePlan, work_name
from qmpbackup.restore.publish import publish, signals_held
from qmpbackup.restore.qcow2 import convert_raw_to_qcow2
from qmpbackup.restore.raw_image import RawImage, WritePool
from qmpbackup.restore.source import ArchiveStream, open_archive_stream
from qmpbackup.vma import format as fmt
from qmpbackup.vma.reader import VmaReader

log = logging.getLogger(__name__)

PROGRESS_STEP = 10  # percent between progress lines


@dataclass(frozen=True, slots=True)
class RestoreResult:
    definition: GuestDefinition
    images: tuple[ImagePlan, ...]
    bytes_read: int
    bytes_written: int


def _check_start_possible(opts: RestoreOptions, existing: ExistingGuest | None) -> None:
    has_start = existing is not None and existing.definition is not None and existing.definition.reach.start
    if opts.start and not (opts.force and has_start):
        raise RestoreRefusedError(
            f"--start needs a start command, and an archive has none: give VM {opts.vmid} a definition with "
            f"'start:' in its [qmpbackup] section and restore over it with --force, or start the VM yourself"
        )


class _Progress:
    def __init__(self, total: int) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.started = time.monotonic()
        self._next = PROGRESS_STEP

    def add(self, n: int, read: int) -> None:
        self.done += n
        percent = self.done * 100 // self.total
        if percent >= self._next:
            self._next = (percent // PROGRESS_STEP + 1) * PROGRESS_STEP
            log.info("progress %d%% (read %d bytes, duration %d sec)", percent, read, time.monotonic() - self.started)


def _write_devices(
    reader: VmaReader, plans: list[ImagePlan], images: dict[int, RawImage], pool: WritePool
) -> None:
    """Every cluster into its image; the reader raises on any broken rule, missing clusters included."""
    for plan in plans:
        images[plan.mapped.device.dev_id] = RawImage(plan.staging, plan.size, pool)
    progress = _Progress(sum(p.size for p in plans))
    for cluster in reader.cluster_views():
        image = images.get(cluster.dev_id)
        if image is None:
            continue  # a vmstate stream: RAM state is not restored
        image.write_cluster(cluster.cluster_num, cluster.mask, cluster.data)
        progress.add(min(fmt.CLUSTER_SIZE, image.size - cluster.cluster_num * fmt.CLUSTER_SIZE), reader.offset)


def _finish_images(plans: list[ImagePlan], images: dict[int, RawImage]) -> None:
    for plan in plans:
        image = images[plan.mapped.device.dev_id]
        image.close()
        if plan.format == "qcow2":
            log.info("converting %s to qcow2", plan.virtdev)
            convert_raw_to_qcow2(plan.staging, plan.temp, plan.size)
            os.unlink(plan.staging)
            fd = os.open(plan.temp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_and_publish(reader: VmaReader, stream: ArchiveStream, plan: RestorePlan, opts: RestoreOptions,
                       def_path: Path) -> int:
    """Steps 2-4 of the module doc; on any failure remove what this run created. Returns bytes written."""
    images: dict[int, RawImage] = {}
    pool = WritePool()
    work = [path for p in plan.images for path in (p.staging, p.temp)] + [work_name(def_path, TEMP_SUFFIX)]
    created_dirs: list[Path] = []
    try:
        try:
            created_dirs = make_dirs(plan.images, opts)
            for p in plan.images:
                log.info("map '%s' to '%s' (%s, %d bytes)", p.virtdev, p.final, p.format, p.size)
            _write_devices(reader, plan.images, images, pool)
            stream.close()  # the decompressor's own end-of-stream checks
            _finish_images(plan.images, images)
            def_temp = write_definition_temp(def_path, plan.text)
            publish([*((p.temp, p.final) for p in plan.images), (def_temp, def_path)], replace=opts.force)
        except OSError as exc:
            name = exc.filename or "the target"
            raise RestoreError(f"restore failed writing {name}: {exc.strerror or exc}") from exc
    except BaseException:
        with signals_held():
            for image in images.values():
                image.discard()
            remove_work_files(work, created_dirs)
        raise
    finally:
        pool.close()
    return sum(image.written for image in images.values())


def _remove_replaced_images(old: GuestDefinition, new: Sequence[ImagePlan], vmid: int) -> None:
    """After ``--force``: the replaced VM's images the new definition no longer uses go, as qmrestore frees them.

    Only files named as this VM's volumes (``vm-<vmid>-…``, any format) are removed;
    other files the old definition named are the user's and are kept, with a line saying so.
    """
    kept = {os.path.realpath(p.final) for p in new}
    owned = re.compile(rf"^(?:base|vm)-{vmid}-")
    for drive in old.disks:
        volume = drive.volume or ""
        if not volume.startswith("/") or os.path.realpath(volume) in kept or not os.path.isfile(volume):
            continue
        if not owned.match(os.path.basename(volume)):
            log.info("kept %s of the replaced VM: not named as a volume of VM %d", volume, vmid)
            continue
        try:
            os.unlink(volume)
        except OSError as exc:
            log.warning("cannot remove %s of the replaced VM: %s", volume, exc.strerror)
        else:
            log.info("removed %s of the replaced VM", volume)


def restore(opts: RestoreOptions) -> RestoreResult:
    """Restore ``opts.archive`` as VM ``opts.vmid``; see the module doc for the guarantees."""
    opts = replace(opts, vmid=check_vmid(opts.vmid))
    def_path = guest_path(opts.config_dir, opts.vmid)
    if opts.target_dir is not None and not opts.target_dir.is_dir():
        raise UsageError(f"target directory {opts.target_dir} does not exist")
    with restore_lock(opts.config_dir, opts.vmid):
        existing = read_existing(opts.config_dir, opts.vmid)
        _check_start_possible(opts, existing)
        log.info("restore vma archive: %s", opts.archive)
        with open_archive_stream(opts.archive, rate_bytes_per_s=opts.bwlimit_kib * 1024) as stream:
            reader = VmaReader(stream)
            log_header(reader)
            plan = plan_restore(reader, opts, existing, def_path)
            refuse_existing(opts, existing, plan.images)
            try:
                remove_leftovers(plan.images, def_path)
            except OSError as exc:
                raise RestoreError(f"cannot remove a leftover work file: {exc}") from exc
            written = _write_and_publish(reader, stream, plan, opts, def_path)
            read = reader.offset
        if existing is not None and existing.definition is not None:
            _remove_replaced_images(existing.definition, plan.images, opts.vmid)
    total = sum(p.size for p in plan.images)
    sparse = total - written
    log.info("total bytes read %d, sparse bytes %d (%.3g%%)", read, sparse, 100.0 * sparse / total if total else 0)
    log.info("restored VM %d: %s", opts.vmid, def_path)
    if opts.start:
        asyncio.run(start_guest(plan.definition))  # restore runs outside the event loop
    return RestoreResult(plan.definition, tuple(plan.images), read, written)
