"""``vma extract``: configs and raw disk images into a new folder, never outside it.

Names come from the archive and are hostile until checked: a config or
device name must be a plain file name (no ``/``, NUL, ``.``/``..``, not
empty, not repeated). Files are created with ``O_EXCL | O_NOFOLLOW`` relative
to the folder we just made, disks as sparse ``tmp-disk-<name>.raw`` renamed
to ``disk-<name>.raw`` when everything checked out. On any failure the
folder we created is removed again.

With a device map (``-r FIFO``, qmrestore's way) the disks go instead into
existing images named by the map (:mod:`qmpbackup.vma.restore_map`): raw
ones written in place, no temp name, zero blocks written or skipped as the
map says, each device's writes paced by its throttle group's token bucket;
other formats through :mod:`qmpbackup.vma.convert_target`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.errors import UsageError
from qmpbackup.throttle import TokenBucket
from qmpbackup.render import display_name
from qmpbackup.vma import format as fmt
from qmpbackup.vma.convert_target import FORMAT_RE, convert_into
from qmpbackup.vma.create import image_virtual_size
from qmpbackup.vma.errors import VmaError, VmaFormatError
from qmpbackup.vma.header import DeviceInfo, encode_name
from qmpbackup.vma.progress import ExtractProgress
from qmpbackup.vma.reader import VmaReader
from qmpbackup.vma.restore_map import RestoreMapEntry, RestoreMapError

log = logging.getLogger(__name__)

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ALL_RUNS = ((0, fmt.CLUSTER_SIZE),)
MAX_SIZE_SLACK = 4 << 20  # a mapped target may be this much larger (storage size granularity), as in Proxmox


@dataclass(frozen=True, slots=True)
class ExtractedDisk:
    dev_id: int
    name: str
    size: int
    path: Path


@dataclass(frozen=True, slots=True)
class _Target:
    """Where one device's clusters go: an open descriptor and how to write there."""

    fd: int
    size: int  # the device's size: nothing is written past it
    write_zeroes: bool = False
    bucket: TokenBucket | None = None


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
    for dev in reader.header.devices:  # the reader refused empty and repeated device names
        check_file_name("device", dev.name)
    for dev in devices:
        for temp in (True, False):
            if disk_file_name(dev.name, temp=temp) in names:
                raise VmaError(f"config file name {disk_file_name(dev.name, temp=temp)!r} collides with a disk")


def _write_runs(target: _Target, data: bytes, runs: Sequence[tuple[int, int]], offset: int, limit: int) -> None:
    """Write byte ranges of one cluster (runs of mask bits), at most ``limit`` bytes into it."""
    view = memoryview(data)
    for start, end in runs:
        end = min(end, limit)
        if start < end:
            if target.bucket is not None:
                target.bucket.consume(end - start)
            _pwrite_all(target.fd, view[start:end], offset + start)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _restore_clusters(reader: VmaReader, targets: Mapping[int, _Target], progress: ExtractProgress | None) -> None:
    """Read every extent and place each restored device's clusters; check none is missing; fsync.

    Devices without a target are read (and checked) but not written, as the
    C tool skips them. The progress summary comes last, as in the C tool.
    """
    if progress is not None:
        progress.start()
    for cluster in reader.clusters(check_missing=False):
        if progress is not None:
            progress.cluster(cluster.dev_id, cluster.cluster_num, cluster.mask)
        target = targets.get(cluster.dev_id)
        if target is None:
            continue
        offset = cluster.cluster_num * fmt.CLUSTER_SIZE
        limit = min(fmt.CLUSTER_SIZE, target.size - offset)
        if cluster.data is not None:
            runs = _ALL_RUNS if cluster.mask == fmt.FULL_MASK else fmt.stored_runs(cluster.mask)
            _write_runs(target, cluster.data, runs, offset, limit)
        if target.write_zeroes and cluster.mask != fmt.FULL_MASK:
            _write_runs(target, fmt.ZERO_CLUSTER, fmt.stored_runs(~cluster.mask & fmt.FULL_MASK), offset, limit)
    for dev_id in targets:
        missing = reader.first_missing(dev_id)
        if missing is not None:
            raise VmaFormatError(
                f"detected missing cluster {missing} for stream {display_name(reader.devices[dev_id].name)}",
                reader.offset,
            )
    for dev_id, target in targets.items():
        try:
            os.fsync(target.fd)
        except OSError as exc:
            name = display_name(reader.devices[dev_id].name)
            raise VmaError(f"vma blk_flush {name} failed - {exc.strerror or exc}") from exc
    if progress is not None:
        progress.finish()


def _make_target_dir(target: Path) -> None:
    try:
        target.mkdir()
    except FileExistsError as exc:
        raise UsageError(f"unable to create target directory {target} - it already exists") from exc
    except OSError as exc:
        raise UsageError(f"unable to create target directory {target} - {exc.strerror or exc}") from exc


def _write_configs(reader: VmaReader, dir_fd: int) -> None:
    for name, data in reader.header.configs:
        fd = os.open(name, _CREATE, 0o644, dir_fd=dir_fd)
        try:
            _pwrite_all(fd, memoryview(data), 0)
        finally:
            os.close(fd)


def _warn_vmstate(reader: VmaReader) -> None:
    for dev in reader.header.devices:
        if dev.is_vmstate:
            log.warning("skipping the vmstate stream (dev_id %d): RAM state is not restored", dev.dev_id)


def extract(
    reader: VmaReader,
    target: Path,
    *,
    devices: Sequence[str] | None = None,
    on_device: Callable[[Path, int], None] | None = None,
    progress: ExtractProgress | None = None,
) -> list[ExtractedDisk]:
    """Extract into ``target``, which must not exist; returns the disks written.

    ``on_device(path, size)`` is called for each disk once its file exists
    (the CLI prints ``DEVINFO`` lines from it).
    """
    selected = select_devices(reader, devices)
    _check_names(reader, selected)
    with _extract_folder(target) as (dir_fd, fds):
        try:
            _write_configs(reader, dir_fd)
            result: list[ExtractedDisk] = []
            for dev in selected:
                temp_name = disk_file_name(dev.name, temp=True)
                fd = os.open(temp_name, _CREATE, 0o644, dir_fd=dir_fd)
                fds[dev.dev_id] = fd
                os.ftruncate(fd, dev.size)
                if on_device is not None:
                    on_device(target / temp_name, dev.size)
                result.append(
                    ExtractedDisk(dev.dev_id, dev.name, dev.size, target / disk_file_name(dev.name, temp=False))
                )
            _warn_vmstate(reader)
            # A new sparse file reads as zero already: zero blocks are never written.
            sizes = {dev.dev_id: dev.size for dev in selected}
            _restore_clusters(reader, {dev_id: _Target(fd, sizes[dev_id]) for dev_id, fd in fds.items()}, progress)
            for dev in selected:
                os.rename(
                    disk_file_name(dev.name, temp=True), disk_file_name(dev.name, temp=False),
                    src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                )
            os.fsync(dir_fd)
            return result
        except OSError as exc:
            raise VmaError(f"cannot extract to {target}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _extract_folder(target: Path) -> Iterator[tuple[int, dict[int, int]]]:
    """Create ``target`` (it must not exist) and yield its descriptor and a dict for the files opened in it.

    On any failure the files are closed and the folder is removed; the
    descriptors are closed in every case.
    """
    _make_target_dir(target)
    fds: dict[int, int] = {}
    dir_fd = -1
    try:
        try:
            dir_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise VmaError(f"cannot extract to {target}: {exc.strerror or exc}") from exc
        yield dir_fd, fds
    except BaseException:
        _close_all(fds)
        fds.clear()
        shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        _close_all(fds)
        if dir_fd >= 0:
            os.close(dir_fd)


def _target_format(entry: RestoreMapEntry) -> str:
    """The map line's format, or the C tool's guess without one: raw for ``*.raw`` and ``/dev/...``.

    :raise RestoreMapError: no format and no guess, or not a format name.
    """
    if entry.image_format is not None:
        if not FORMAT_RE.match(entry.image_format):
            raise RestoreMapError(f"read map failed - bad format '{entry.image_format}'")
        return entry.image_format
    if entry.path is not None and (entry.path.suffix == ".raw" or str(entry.path).startswith("/dev/")):
        return "raw"
    raise RestoreMapError(f"no format= given for {entry.path} (and it is neither *.raw nor under /dev/)")


def _check_size(dev: DeviceInfo, size: int) -> None:
    """Storage may round sizes up: up to 4 MiB more is fine, less never (as Proxmox checks)."""
    if not 0 <= size - dev.size <= MAX_SIZE_SLACK:
        raise RestoreMapError(
            f"vma_reader_register_bs for stream {display_name(dev.name)} failed - unexpected size {size} != {dev.size}"
        )


def _open_mapped(dev: DeviceInfo, entry: RestoreMapEntry, image_format: str) -> int:
    """Open an existing image or block device for writing and check its size; -1 for a non-raw image.

    A non-raw image is only checked here (writable, virtual size); ``qemu-img`` writes it later.

    :raise RestoreMapError: cannot open, not a file or block device, wrong size.
    """
    assert entry.path is not None
    try:
        fd = os.open(entry.path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RestoreMapError(f"can't open file {entry.path} - {exc.strerror or exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise RestoreMapError(f"can't open file {entry.path} - not a regular file or block device")
        if image_format == "raw":
            _check_size(dev, os.lseek(fd, 0, os.SEEK_END))
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    try:
        size = image_virtual_size(entry.path, image_format)
    except VmaError as exc:
        raise RestoreMapError(f"can't open file {entry.path} - {exc}") from exc
    _check_size(dev, size)
    return -1


def _group(entry: RestoreMapEntry) -> str:
    """A device without a throttle group is a group of its own, as QEMU names it after the file."""
    return entry.throttling_group or f"path:{entry.path}"


def _buckets(entries: Sequence[RestoreMapEntry]) -> dict[str, TokenBucket]:
    """One token bucket per throttle group; the last rate given for a group wins."""
    buckets: dict[str, TokenBucket] = {}
    for entry in entries:
        bucket = buckets.setdefault(_group(entry), TokenBucket(0))
        if entry.throttling_bps:
            bucket.set_rate(entry.throttling_bps)
    return buckets


def _check_mapping(
    reader: VmaReader, selected: Sequence[DeviceInfo], mapping: Mapping[str, RestoreMapEntry]
) -> list[tuple[DeviceInfo, RestoreMapEntry]]:
    """The devices to write with their map lines.

    :raise RestoreMapError: a line names a device the archive lacks, or a selected device has no line.
    """
    names = {dev.name for dev in reader.header.devices if not dev.is_vmstate}
    for name in mapping:
        if name not in names:
            raise RestoreMapError(f"read map failed - archive has no device '{name}'")
    for dev in selected:
        if dev.name not in mapping:
            raise RestoreMapError(f"no device name mapping for {display_name(dev.name)}")
    return [(dev, mapping[dev.name]) for dev in selected if not mapping[dev.name].skip]


def extract_mapped(
    reader: VmaReader,
    target: Path,
    read_map: Callable[[], Mapping[str, RestoreMapEntry]],
    *,
    devices: Sequence[str] | None = None,
    on_configs: Callable[[], None] | None = None,
    progress: ExtractProgress | None = None,
) -> None:
    """``vma extract -r``: configs into ``target`` (must not exist), disks into the images the map names.

    ``on_configs`` runs once the configs are written (the CLI prints the list
    lines there: qmrestore reads the config before it writes the map);
    ``read_map`` then blocks until the map is complete. A device left out by
    ``-d`` or mapped with ``skip=`` is read but not written; every other
    device needs a map line. Raw targets are written in place; other
    formats go through a sparse ``tmp-disk-<name>.raw`` in ``target`` and
    :func:`convert_into`. On failure the folder is removed; the images are
    the caller's and keep whatever was written.

    :raise RestoreMapError: a map line names a device the archive lacks, a
        device has no mapping, or a target cannot be used.
    """
    selected = select_devices(reader, devices)
    _check_names(reader, selected)
    with _extract_folder(target) as (dir_fd, fds):
        try:
            _write_configs(reader, dir_fd)
            os.fsync(dir_fd)
        except OSError as exc:
            raise VmaError(f"cannot extract to {target}: {exc.strerror or exc}") from exc
        if on_configs is not None:
            on_configs()
        restored = _check_mapping(reader, selected, read_map())
        buckets = _buckets([entry for _dev, entry in restored])
        targets: dict[int, _Target] = {}
        converts: list[tuple[DeviceInfo, RestoreMapEntry, str]] = []
        for dev, entry in restored:
            image_format = _target_format(entry)
            fd = _open_mapped(dev, entry, image_format)
            bucket = buckets[_group(entry)]
            if fd < 0:
                fd = os.open(disk_file_name(dev.name, temp=True), _CREATE, 0o600, dir_fd=dir_fd)
                os.ftruncate(fd, dev.size)
                fds[dev.dev_id] = fd
                targets[dev.dev_id] = _Target(fd, dev.size)  # new and sparse: zeros need no writing
                converts.append((dev, entry, image_format))
            else:
                fds[dev.dev_id] = fd
                targets[dev.dev_id] = _Target(fd, dev.size, entry.write_zeroes, bucket if bucket.rate > 0 else None)
            log.debug("restoring %s to %s (%s, write zeroes: %s, %.0f B/s)", display_name(dev.name), entry.path,
                      image_format, entry.write_zeroes, bucket.rate)
        _warn_vmstate(reader)
        try:
            _restore_clusters(reader, targets, progress)
        except OSError as exc:
            raise VmaError(f"restore failed - {exc.strerror or exc}") from exc
        for dev, entry, image_format in converts:
            assert entry.path is not None
            convert_into(target / disk_file_name(dev.name, temp=True), entry.path, image_format, dev.size,
                         target_is_zero=not entry.write_zeroes, rate_bps=int(buckets[_group(entry)].rate))
            os.unlink(disk_file_name(dev.name, temp=True), dir_fd=dir_fd)


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError as exc:
            log.debug("closing extract output: %s", exc)
