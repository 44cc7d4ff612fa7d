"""``vma extract``: configs and raw disk images into a new folder, never outside it.

Names come from the archive and are hostile until checked: a config or
device name must be a plain file name (no ``/``, NUL, ``.``/``..``, not
empty, not repeated). Files are created with ``O_EXCL | O_NOFOLLOW`` relative
to the folder we just made, disks as sparse ``tmp-disk-<name>.raw`` renamed
to ``disk-<name>.raw`` when everything checked out. On any failure the
folder we created is removed again.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.errors import UsageError
from qmpbackup.vma import format as fmt
from qmpbackup.vma.errors import VmaError, VmaFormatError
from qmpbackup.vma.header import DeviceInfo, display_name, encode_name
from qmpbackup.vma.reader import VmaReader

log = logging.getLogger(__name__)

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class ExtractedDisk:
    dev_id: int
    name: str
    size: int
    path: Path


def check_file_name(kind: str, name: str) -> None:
    """Refuse any archive name that is not a single, plain path component."""
    if not name:
        raise VmaError(f"refusing {kind} with an empty name")
    if "/" in name or name in (".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise VmaError(f"refusing unsafe {kind} name {name!r}")
    if len(encode_name(name)) > 200:
        raise VmaError(f"refusing overlong {kind} name {name[:40]!r}...")


def disk_file_name(name: str, *, temp: bool) -> str:
    return f"{'tmp-' if temp else ''}disk-{name}.raw"


def select_devices(reader: VmaReader, wanted: Sequence[str] | None) -> list[DeviceInfo]:
    """The devices to restore: all, or those named in ``-d`` (each must exist)."""
    devices = [dev for dev in reader.header.devices if not dev.is_vmstate]
    if wanted is None:
        return devices
    by_name = {dev.name: dev for dev in devices}
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise UsageError(f"archive has no device named {', '.join(unknown)}")
    return [dev for dev in devices if dev.name in set(wanted)]


def _check_names(reader: VmaReader, devices: Sequence[DeviceInfo]) -> None:
    names: set[str] = set()
    for name, _data in reader.header.configs:
        check_file_name("config file", name)
        if name in names:
            raise VmaError(f"refusing duplicate config file name {name!r}")
        names.add(name)
    disk_names: set[str] = set()
    for dev in reader.header.devices:
        check_file_name("device", dev.name)
        if dev.name in disk_names:
            raise VmaError(f"refusing duplicate device name {dev.name!r}")
        disk_names.add(dev.name)
    for dev in devices:
        for temp in (True, False):
            if disk_file_name(dev.name, temp=temp) in names:
                raise VmaError(f"config file name {disk_file_name(dev.name, temp=temp)!r} collides with a disk")


def _write_runs(fd: int, data: bytes, mask: int, offset: int, limit: int) -> None:
    """Write the stored blocks of one cluster (runs of set mask bits), at most ``limit`` bytes."""
    view = memoryview(data)
    for start, end in fmt.stored_runs(mask):
        end = min(end, limit)
        if start < end:
            _pwrite_all(fd, view[start:end], offset + start)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def extract(
    reader: VmaReader,
    target: Path,
    *,
    devices: Sequence[str] | None = None,
    on_device: Callable[[Path, int], None] | None = None,
) -> list[ExtractedDisk]:
    """Extract into ``target``, which must not exist; returns the disks written.

    ``on_device(path, size)`` is called for each disk once its file exists
    (the CLI prints ``DEVINFO`` lines from it).
    """
    selected = select_devices(reader, devices)
    _check_names(reader, selected)
    try:
        target.mkdir()
    except FileExistsError as exc:
        raise UsageError(f"unable to create target directory {target} - it already exists") from exc
    except OSError as exc:
        raise UsageError(f"unable to create target directory {target} - {exc.strerror or exc}") from exc
    dir_fd = -1
    fds: dict[int, int] = {}
    try:
        try:
            dir_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            for name, data in reader.header.configs:
                fd = os.open(name, _CREATE, 0o644, dir_fd=dir_fd)
                try:
                    _pwrite_all(fd, memoryview(data), 0)
                finally:
                    os.close(fd)
            result: list[ExtractedDisk] = []
            for dev in selected:
                temp_name = disk_file_name(dev.name, temp=True)
                fd = os.open(temp_name, _CREATE, 0o644, dir_fd=dir_fd)
                fds[dev.dev_id] = fd
                os.ftruncate(fd, dev.size)
                if on_device is not None:
                    on_device(target / temp_name, dev.size)
                result.append(ExtractedDisk(dev.dev_id, dev.name, dev.size, target / disk_file_name(dev.name, temp=False)))
            for dev in reader.header.devices:
                if dev.is_vmstate:
                    log.warning("skipping the vmstate stream (dev_id %d): RAM state is not restored", dev.dev_id)

            sizes = {dev.dev_id: dev.size for dev in selected}
            for cluster in reader.clusters(check_missing=False):
                fd = fds.get(cluster.dev_id, -1)
                if fd < 0 or cluster.data is None:
                    continue  # not restored, or all zero: the sparse file already reads as zero
                offset = cluster.cluster_num * fmt.CLUSTER_SIZE
                limit = min(fmt.CLUSTER_SIZE, sizes[cluster.dev_id] - offset)
                if cluster.mask == fmt.FULL_MASK:
                    _pwrite_all(fd, memoryview(cluster.data)[:limit], offset)
                else:
                    _write_runs(fd, cluster.data, cluster.mask, offset, limit)

            for dev in selected:
                missing = reader.first_missing(dev.dev_id)
                if missing is not None:
                    raise VmaFormatError(
                        f"detected missing cluster {missing} for stream {display_name(dev.name)}", reader.offset
                    )
            for dev in selected:
                os.fsync(fds[dev.dev_id])
                os.rename(
                    disk_file_name(dev.name, temp=True), disk_file_name(dev.name, temp=False),
                    src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                )
            os.fsync(dir_fd)
            return result
        except OSError as exc:
            raise VmaError(f"cannot extract to {target}: {exc.strerror or exc}") from exc
    except BaseException:
        _close_all(fds)
        fds.clear()
        shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        _close_all(fds)
        if dir_fd >= 0:
            os.close(dir_fd)


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError as exc:
            log.debug("closing extract output: %s", exc)
