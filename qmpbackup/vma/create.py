"""``vma create``: disk images and config files into one archive.

Raw images are read directly, skipping holes (``SEEK_DATA``/``SEEK_HOLE``)
so an empty region costs no reading. Any other image format is first turned
into a sparse raw file with ``qemu-img convert`` in a private temp folder:
``qemu-img`` cannot write raw data to a pipe, and the temp copy only takes
the space of the image's allocated data.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qmpbackup.atomic_file import OutputExistsError, atomic_output
from qmpbackup.compress import CompressOptions, open_compressor, parse_compress
from qmpbackup.errors import UsageError
from qmpbackup.qemu_img import convert_timeout, failure_detail, run_qemu_img
from qmpbackup.store.names import temp_name
from qmpbackup.vma import format as fmt
from qmpbackup.vma.errors import VmaError
from qmpbackup.vma.index import embed_index, write_sidecar
from qmpbackup.vma.progress import CreateProgress
from qmpbackup.vma.writer import ByteSink, VmaWriter

log = logging.getLogger(__name__)

READ_CLUSTERS = 64  # clusters per read: 4 MiB
QEMU_IMG_INFO_TIMEOUT_S = 60.0
TEMP_PARENT = Path("/var/tmp")
_FORMAT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One ``-d format=FMT:NAME=PATH`` argument."""

    image_format: str
    name: str
    path: Path


def parse_disk_spec(text: str) -> DiskSpec:
    """Parse ``format=FMT:NAME=PATH`` (the Proxmox ``vma create -d`` syntax)."""
    prefix = "format="
    if not text.startswith(prefix) or ":" not in text:
        raise UsageError(f"bad disk spec {text!r}: expected format=FMT:NAME=PATH")
    image_format, _, rest = text[len(prefix) :].partition(":")
    name, sep, path = rest.partition("=")
    if not _FORMAT_RE.match(image_format):
        raise UsageError(f"bad disk spec {text!r}: bad format {image_format!r}")
    if not sep or not name or not path:
        raise UsageError(f"bad disk spec {text!r}: expected format=FMT:NAME=PATH")
    return DiskSpec(image_format, name, Path(path))


class ClusterWriter(Protocol):
    """What :func:`write_raw_device` feeds: the VMA writer, or it wrapped to count progress."""

    def write_cluster(self, dev_id: int, cluster_num: int, data: bytes | bytearray | memoryview | None) -> None: ...


class _CountingWriter:
    """Counts each cluster for ``-v`` before the writer takes it."""

    def __init__(self, writer: VmaWriter, progress: CreateProgress) -> None:
        self._writer = writer
        self._progress = progress

    def write_cluster(self, dev_id: int, cluster_num: int, data: bytes | bytearray | memoryview | None) -> None:
        self._progress.cluster(dev_id, cluster_num, data)
        self._writer.write_cluster(dev_id, cluster_num, data)


def _raw_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _data_after(fd: int, pos: int, end: int) -> tuple[int, int]:
    """The next data range ``[start, stop)`` at or after ``pos``; ``(end, end)`` if none."""
    try:
        start = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return end, end
        raise
    stop = os.lseek(fd, start, os.SEEK_HOLE)
    return min(start, end), min(stop, end)


def write_raw_device(writer: ClusterWriter, dev_id: int, fd: int, file_size: int, size: int) -> None:
    """Feed every cluster of a raw image to the writer in order; holes become zero clusters.

    ``size`` is the device size (``file_size`` rounded up to whole sectors);
    bytes past the end of the file read as zero.
    """
    clusters = fmt.cluster_count(size)
    buf = bytearray(READ_CLUSTERS * fmt.CLUSTER_SIZE)
    view = memoryview(buf)
    seek_holes = True
    data_start, data_stop = 0, file_size
    cluster = 0
    while cluster < clusters:
        pos = cluster * fmt.CLUSTER_SIZE
        if seek_holes and pos >= data_stop:
            try:
                data_start, data_stop = _data_after(fd, pos, file_size)
            except OSError:
                seek_holes = False  # e.g. a device without SEEK_DATA: read everything
                data_start, data_stop = pos, file_size
        if seek_holes and data_start >= pos + fmt.CLUSTER_SIZE:
            # Whole clusters before the next data are holes.
            hole_end = min(data_start // fmt.CLUSTER_SIZE, clusters)
            for hole in range(cluster, hole_end):
                writer.write_cluster(dev_id, hole, None)
            cluster = hole_end
            continue
        count = min(READ_CLUSTERS, clusters - cluster)
        if seek_holes:
            # Read up to the end of this data range (rounded up to a cluster).
            stop_cluster = max(cluster + 1, -(-data_stop // fmt.CLUSTER_SIZE))
            count = min(count, stop_cluster - cluster)
        want = min(count * fmt.CLUSTER_SIZE, size - pos)
        got = _pread_full(fd, view[:want], pos)
        if got < want:
            buf[got:want] = bytes(want - got)  # past the end of the file: zeros
        for index in range(count):
            start = index * fmt.CLUSTER_SIZE
            writer.write_cluster(dev_id, cluster + index, view[start : min(start + fmt.CLUSTER_SIZE, want)])
        cluster += count


def _pread_full(fd: int, target: memoryview, offset: int) -> int:
    got = 0
    while got < len(target):
        n = os.preadv(fd, [target[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def image_virtual_size(path: Path, image_format: str) -> int:
    what = f"qemu-img info {path}"
    proc = run_qemu_img(["info", "--output=json", "-f", image_format, str(path)],
                        timeout=QEMU_IMG_INFO_TIMEOUT_S, what=what, error=VmaError)
    if proc.returncode != 0:
        raise VmaError(f"{what}: {failure_detail(proc, last_line=False)}")
    try:
        return int(json.loads(proc.stdout)["virtual-size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise VmaError(f"{what}: unexpected output") from exc


def convert_to_raw(path: Path, image_format: str, dest: Path, size: int) -> None:
    """``qemu-img convert`` to a sparse raw file; the timeout scales with the image size."""
    what = f"qemu-img convert {path}"
    proc = run_qemu_img(["convert", "-f", image_format, "-O", "raw", str(path), str(dest)],
                        timeout=convert_timeout(size), what=what, error=VmaError)
    if proc.returncode != 0:
        raise VmaError(f"{what}: {failure_detail(proc, last_line=False)}")


def image_size(disk: DiskSpec) -> int:
    """The disk's length in bytes: a raw file's (or block device's) length, else qemu-img's virtual size."""
    if not disk.path.exists():
        raise UsageError(f"disk image {disk.path} does not exist")
    if disk.image_format != "raw":
        return image_virtual_size(disk.path, disk.image_format)
    fd = _open_read(disk.path)
    try:
        return _raw_size(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_raw_view(disk: DiskSpec) -> Iterator[tuple[int, int]]:
    """Yield ``(fd, file_size)`` of a raw view of the disk image (a temp copy for non-raw formats)."""
    if disk.image_format == "raw":
        fd = _open_read(disk.path)
        try:
            yield fd, _raw_size(fd)
        finally:
            os.close(fd)
        return
    size = image_virtual_size(disk.path, disk.image_format)
    parent = TEMP_PARENT if TEMP_PARENT.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="qmpbackup-vma-", dir=parent) as tmp:
        raw = Path(tmp) / "disk.raw"
        convert_to_raw(disk.path, disk.image_format, raw, size)
        fd = _open_read(raw)
        try:
            yield fd, _raw_size(fd)
        finally:
            os.close(fd)


def _open_read(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open {path}: {exc.strerror or exc}") from exc


def read_config_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    if len(data) > fmt.MAX_BLOB_SIZE:
        raise VmaError(f"config file {path} too large: {len(data)} bytes (at most {fmt.MAX_BLOB_SIZE})")
    return data


def device_size(disk: DiskSpec, file_size: int) -> int:
    """Whole sectors, as QEMU reports a raw file's length."""
    size = fmt.round_up(file_size, fmt.SECTOR_SIZE)
    if size == 0:
        raise VmaError(f"disk image {disk.path} is empty")
    return size


def create_archive(
    sink: ByteSink, configs: Sequence[Path], disks: Sequence[DiskSpec], progress: CreateProgress | None = None
) -> VmaWriter:
    """Write a complete archive to ``sink``: configs, then every disk in order; returns the closed writer.

    With ``progress``, every cluster is counted and the per-image summary
    is emitted once the archive is complete.
    """
    names = [disk.name for disk in disks]
    if len(set(names)) != len(names):
        raise UsageError("each disk needs its own name")
    writer = VmaWriter(sink)
    for config in configs:
        writer.add_config(config.name, read_config_file(config))
    sizes = [device_size(disk, image_size(disk)) for disk in disks]
    dev_ids = [writer.add_device(disk.name, size) for disk, size in zip(disks, sizes, strict=True)]
    feed: ClusterWriter = writer
    if progress is not None:
        for disk, dev_id, size in zip(disks, dev_ids, sizes, strict=True):
            progress.add_device(dev_id, disk.name, size)
        feed = _CountingWriter(writer, progress)
    for disk, dev_id, size in zip(disks, dev_ids, sizes, strict=True):
        log.debug("archiving %s (%s, %d bytes) as dev_id %d", disk.path, disk.image_format, size, dev_id)
        with open_raw_view(disk) as (fd, file_size):
            if device_size(disk, file_size) != size:
                raise VmaError(f"disk image {disk.path} changed size while being archived")
            try:
                write_raw_device(feed, dev_id, fd, file_size, size)
            except OSError as exc:
                raise VmaError(f"reading {disk.path}: {exc.strerror or exc}") from exc
    writer.close()
    if progress is not None:
        progress.finish()
    return writer


def temp_path(final: Path) -> Path:
    """Where the archive is written until it is complete: vzdump's ``.dat`` rule (docs/format.md)."""
    if "." in final.name.lstrip("."):
        return temp_name(final)
    return final.with_name(final.name + ".dat")


def create_archive_file(
    archive: str,
    configs: Sequence[Path],
    disks: Sequence[DiskSpec],
    compression_name: str = "none",
    zstd_threads: int = 1,
    progress: CreateProgress | None = None,
) -> VmaWriter:
    """``vma create``: a new file (it must not exist) or ``-`` for stdout.

    The file is written as ``<name>.dat`` (O_EXCL, O_DIRECT where possible),
    fsynced and renamed when complete; on failure the ``.dat`` file is removed.
    """
    compression = parse_compress(compression_name)
    options = CompressOptions(zstd_threads=zstd_threads)
    if archive == "-":
        with open_compressor(sys.stdout.buffer, compression, options) as compressor:
            writer = create_archive(compressor, configs, disks, progress)
            assert writer.index is not None
            with writer.index:
                embed_index(writer.index, compressor, writer.bytes_written)
            return writer
    final = Path(archive)
    if final.exists() or final.is_symlink():
        raise UsageError(f"archive {archive} already exists")
    try:
        with atomic_output(final, temp_path(final)) as dest, open_compressor(dest, compression, options) as compressor:
            writer = create_archive(compressor, configs, disks, progress)
            assert writer.index is not None
            embedded = embed_index(writer.index, compressor, writer.bytes_written)
        with writer.index:
            if not embedded:
                write_sidecar(writer.index, final, writer.bytes_written)
    except OutputExistsError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise VmaError(f"cannot write archive {archive}: {exc.strerror or exc}") from exc
    return writer
