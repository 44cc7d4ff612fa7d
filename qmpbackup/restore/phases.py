"""The phases that ``restore`` and ``restore --live`` share: options, the per-VM lock, the plan
(names, definition rewrite), refusals, work files and the directories a restore creates.

Both restores go the same way up to the images: ``restore_lock``, ``log_header``,
``plan_restore``, ``refuse_existing``, ``remove_leftovers``; then ``make_dirs`` and
``write_definition_temp`` before publishing, ``remove_work_files`` when anything fails.
Only how the images get their data differs (written from the stream, or served live).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.errors import ConfigError, UsageError
from qmpbackup.guest_config import GuestDefinition, guest_path, parse_guest
from qmpbackup.jobs.storage_cfg import load_storage_cfg
from qmpbackup.render import display_name
from qmpbackup.restore.config_rewrite import Generators, rewrite_config
from qmpbackup.restore.device_map import map_devices
from qmpbackup.restore.errors import RestoreError, RestoreRefusedError
from qmpbackup.restore.guest import ExistingGuest, definition_text, refuse_if_running
from qmpbackup.restore.placement import OLD_SUFFIX, STAGING_SUFFIX, TEMP_SUFFIX, ImagePlan, plan_images, work_name
from qmpbackup.vma.listing import DEFAULT_CONFIG, format_ctime
from qmpbackup.vma.reader import VmaReader

log = logging.getLogger(__name__)


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


def refuse_existing(opts: RestoreOptions, existing: ExistingGuest | None, plans: list[ImagePlan]) -> None:
    taken = [str(p.final) for p in plans if os.path.lexists(p.final)]
    if existing is not None:
        taken.insert(0, str(existing.path))
    if taken and not opts.force:
        what = f"VM {opts.vmid} already exists" if existing is not None else "the target images exist"
        raise RestoreRefusedError(f"{what} ({', '.join(taken)}); use --force to replace")
    if existing is not None:
        refuse_if_running(existing, opts.vmid)


def remove_leftovers(plans: list[ImagePlan], definition_path: Path) -> None:
    """Work files of an interrupted earlier restore (we hold the lock, so nobody else's)."""
    for path in [
        *(work_name(p.final, s) for p in plans for s in (TEMP_SUFFIX, STAGING_SUFFIX, OLD_SUFFIX)),
        work_name(definition_path, TEMP_SUFFIX),
    ]:
        if os.path.lexists(path):
            log.warning("removing %s, left by an interrupted restore", path)
            os.unlink(path)


def write_definition_temp(path: Path, text: str) -> Path:
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


def remove_work_files(paths: list[Path], created_dirs: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for directory in reversed(created_dirs):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if still empty


def make_dirs(plans: list[ImagePlan], opts: RestoreOptions) -> list[Path]:
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
class RestorePlan:
    """Everything decided from the archive's header before a byte is written."""

    images: list[ImagePlan]
    definition: GuestDefinition
    text: str  # the new definition's text


def log_header(reader: VmaReader) -> None:
    for name, data in reader.header.configs:
        log.info("CFG: size: %d name: %s", len(data), display_name(name))
    for dev in reader.header.devices:
        log.info("DEV: dev_id=%d size: %d devname: %s", dev.dev_id, dev.size, display_name(dev.name))
        if dev.is_vmstate:
            log.warning("skipping the vmstate stream (dev_id %d): RAM state is not restored", dev.dev_id)
    log.info("CTIME: %s", format_ctime(reader.ctime))


def plan_restore(reader: VmaReader, opts: RestoreOptions, existing: ExistingGuest | None,
                 def_path: Path) -> RestorePlan:
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
    return RestorePlan(plans, definition, text)


