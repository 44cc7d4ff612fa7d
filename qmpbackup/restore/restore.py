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

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from qmpbackup.errors import ConfigError, UsageError
from qmpbackup.guest_config import GuestDefinition, check_vmid, guest_path, parse_guest
from qmpbackup.jobs.storage_cfg import load_storage_cfg
from qmpbackup.render import display_name
from qmpbackup.restore.config_rewrite import Generators, rewrite_config
from qmpbackup.restore.device_map import map_devices
from qmpbackup.restore.errors import RestoreError, RestoreRefusedError
from qmpbackup.restore.guest import ExistingGuest, definition_text, read_existing, refuse_if_running, start_guest
from qmpbackup.restore.placement import OLD_SUFFIX, STAGING_SUFFIX, TEMP_SUFFIX, ImagePlan, plan_images, work_name
from qmpbackup.restore.publish import publish, signals_held
from qmpbackup.restore.qcow2 import convert_raw_to_qcow2
from qmpbackup.restore.raw_image import RawImage, WritePool
from qmpbackup.restore.source import ArchiveStream, open_archive_stream
from qmpbackup.vma import format as fmt
from qmpbackup.vma.listing import DEFAULT_CONFIG, format_ctime
from qmpbackup.vma.reader import VmaReader

log = logging.getLogger(__name__)

PROGRESS_STEP = 10  # percent between progress lines


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    archive: str  # path or "-"
    vmid: int
    config_dir: Path
    target_dir: Path | None = None
    storage: str | None = None
    image_format: str | None = None  # raw | qcow2 | None (map line's)
    bwlimit_kib: int = 0
    force: bool = False
    unique: bool = False
    start: bool = False
    generators: Generators = Generators()


@dataclass(frozen=True, slots=True)
class RestoreResult:
    definition: GuestDefinition
    images: tuple[ImagePlan, ...]
    bytes_read: int
    bytes_written: int


@contextlib.contextmanager
def restore_lock(config_dir: Path, vmid: int) -> Iterator[None]:
    """One restore per VM id at a time (work file names are per VM id).

    The lock file is removed on release; a locker checks after ``flock`` that
    the file it locked is still the one on disk, so removal cannot let two in.
    """
    guests = guest_path(config_dir, vmid).parent
    path = guests / f".{vmid}.restore-lock"
    try:
        guests.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RestoreRefusedError(f"another restore of VM {vmid} is running") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # removed by the previous holder in the meantime: lock the new file
    except OSError as exc:
        raise RestoreError(f"cannot lock {path}: {exc.strerror or exc}") from exc
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _check_start_possible(opts: RestoreOptions, existing: ExistingGuest | None) -> None:
    has_start = existing is not None and existing.definition is not None and existing.definition.reach.start
    if opts.start and not (opts.force and has_start):
        raise RestoreRefusedError(
            f"--start needs a start command, and an archive has none: give VM {opts.vmid} a definition with "
            f"'start:' in its [qmpbackup] section and restore over it with --force, or start the VM yourself"
        )


def _refuse_existing(opts: RestoreOptions, existing: ExistingGuest | None, plans: list[ImagePlan]) -> None:
    taken = [str(p.final) for p in plans if os.path.lexists(p.final)]
    if existing is not None:
        taken.insert(0, str(existing.path))
    if taken and not opts.force:
        what = f"VM {opts.vmid} already exists" if existing is not None else "the target images exist"
        raise RestoreRefusedError(f"{what} ({', '.join(taken)}); use --force to replace")
    if existing is not None:
        refuse_if_running(existing, opts.vmid)


def _remove_leftovers(plans: list[ImagePlan], definition_path: Path) -> None:
    """Work files of an interrupted earlier restore (we hold the lock, so nobody else's)."""
    for path in [
        *(work_name(p.final, s) for p in plans for s in (TEMP_SUFFIX, STAGING_SUFFIX, OLD_SUFFIX)),
        work_name(definition_path, TEMP_SUFFIX),
    ]:
        if os.path.lexists(path):
            log.warning("removing %s, left by an interrupted restore", path)
            os.unlink(path)


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


def _write_definition_temp(path: Path, text: str) -> Path:
    temp = work_name(path, TEMP_SUFFIX)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return temp


def _cleanup(paths: list[Path], created_dirs: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for directory in reversed(created_dirs):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if still empty


def _make_dirs(plans: list[ImagePlan], opts: RestoreOptions) -> list[Path]:
    """Create storage image directories (``--target-dir`` must exist); returns those created."""
    created: list[Path] = []
    for directory in dict.fromkeys(p.final.parent for p in plans):
        if directory.is_dir():
            continue
        if opts.target_dir is not None:
            raise UsageError(f"target directory {directory} does not exist")
        missing = [d for d in (directory, *directory.parents) if not d.exists()]
        directory.mkdir(parents=True)
        created.extend(reversed(missing))
    return created


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything decided from the archive's header before a byte is written."""

    images: list[ImagePlan]
    definition: GuestDefinition
    text: str  # the new definition's text


def _log_header(reader: VmaReader) -> None:
    for name, data in reader.header.configs:
        log.info("CFG: size: %d name: %s", len(data), display_name(name))
    for dev in reader.header.devices:
        log.info("DEV: dev_id=%d size: %d devname: %s", dev.dev_id, dev.size, display_name(dev.name))
        if dev.is_vmstate:
            log.warning("skipping the vmstate stream (dev_id %d): RAM state is not restored", dev.dev_id)
    log.info("CTIME: %s", format_ctime(reader.ctime))


def _plan(reader: VmaReader, opts: RestoreOptions, existing: ExistingGuest | None, def_path: Path) -> _Plan:
    """Map devices, name images, rewrite the config and check that it parses as a guest definition."""
    config = reader.configs.get(DEFAULT_CONFIG)
    if config is None:
        raise RestoreError(f"unable to read {DEFAULT_CONFIG} - the archive has none")
    try:
        config_text = config.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RestoreError(f"{DEFAULT_CONFIG} in the archive is not UTF-8 text") from exc
    mapped = map_devices(config_text, reader.header.devices)
    plans = plan_images(
        mapped, opts.vmid,
        target_dir=opts.target_dir.absolute() if opts.target_dir is not None else None,
        storage=opts.storage,
        storages=load_storage_cfg(opts.config_dir) if opts.target_dir is None else None,
        image_format=opts.image_format,
    )
    rewritten = rewrite_config(
        config_text, {p.virtdev: p.volume for p in plans}, unique=opts.unique, generators=opts.generators
    )
    for key in rewritten.commented:
        log.info("%s was excluded from the backup (backup=0); its line is commented out", key)
    for key in rewritten.kept_unmapped:
        log.warning("%s is not in the archive; its line is kept unchanged", key)
    text = definition_text(rewritten.text, existing)
    try:
        definition = parse_guest(text, opts.vmid, def_path)
    except ConfigError as exc:
        raise RestoreError(f"the restored config would not be a valid guest definition: {exc}") from exc
    return _Plan(plans, definition, text)


def _write_and_publish(reader: VmaReader, stream: ArchiveStream, plan: _Plan, opts: RestoreOptions,
                       def_path: Path) -> int:
    """Steps 2-4 of the module doc; on any failure remove what this run created. Returns bytes written."""
    images: dict[int, RawImage] = {}
    pool = WritePool()
    work = [path for p in plan.images for path in (p.staging, p.temp)] + [work_name(def_path, TEMP_SUFFIX)]
    created_dirs: list[Path] = []
    try:
        try:
            created_dirs = _make_dirs(plan.images, opts)
            for p in plan.images:
                log.info("map '%s' to '%s' (%s, %d bytes)", p.virtdev, p.final, p.format, p.size)
            _write_devices(reader, plan.images, images, pool)
            stream.close()  # the decompressor's own end-of-stream checks
            _finish_images(plan.images, images)
            def_temp = _write_definition_temp(def_path, plan.text)
            publish([*((p.temp, p.final) for p in plan.images), (def_temp, def_path)], replace=opts.force)
        except OSError as exc:
            name = exc.filename or "the target"
            raise RestoreError(f"restore failed writing {name}: {exc.strerror or exc}") from exc
    except BaseException:
        with signals_held():
            for image in images.values():
                image.discard()
            _cleanup(work, created_dirs)
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
            _log_header(reader)
            plan = _plan(reader, opts, existing, def_path)
            _refuse_existing(opts, existing, plan.images)
            try:
                _remove_leftovers(plan.images, def_path)
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
        start_guest(plan.definition)
    return RestoreResult(plan.definition, tuple(plan.images), read, written)
