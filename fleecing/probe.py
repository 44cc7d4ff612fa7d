"""What a fleecing storage can do: free space, thin allocation, discard, rotational.

File storages are probed by trying: a small temporary file in the storage shows whether
the filesystem allocates lazily (a sparse write) and gives space back (a punched hole).
That is what QEMU does with a qcow2/raw fleecing file and ``discard: unmap``, so the
answer is exact even where the device below says nothing (NFS, btrfs on several devices).
The block device under the filesystem is looked up with pyudev (plain sysfs attributes,
so no udev database is needed) for ``rotational`` and device-level discard.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyudev

from fleecing.errors import FleecingError

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_PROBE_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class SpaceProbe:
    """One storage's answers. ``discard``: freed/trimmed space goes back to the storage."""

    where: str
    device: str | None
    fstype: str | None
    thin: bool
    discard: bool
    rotational: bool | None
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """sysfs facts of one block device (a partition answers for its disk)."""

    devnode: str
    discard: bool
    rotational: bool | None
    size_bytes: int


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """``fallocate(PUNCH_HOLE|KEEP_SIZE)``; False where the filesystem does not support it."""
    fallocate = _libc().fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def allocated_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the file really occupies (``du``), not its apparent size."""
    return os.stat(path).st_blocks * 512


def _try_file_features(directory: Path) -> tuple[bool, bool]:
    """(thin, discard) by experiment in ``directory``; the probe file is always removed."""
    fd, name = tempfile.mkstemp(prefix=".qmpbackup-probe-", dir=directory)
    try:
        os.pwrite(fd, b"\xa5" * 4096, _PROPERTY_OFFSET)
        os.fsync(fd)
        thin = os.fstat(fd).st_blocks * 512 < _PROPERTY_OFFSET
        os.pwrite(fd, os.urandom(_PROBE_SIZE), 0)
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        discard = punch_hole(fd, 0, _PROBE_SIZE)
        if discard:
            os.fsync(fd)
            discard = os.fstat(fd).st_blocks < before
        return thin, discard
    finally:
        os.close(fd)
        os.unlink(name)


_PROPERTY_OFFSET = 8 << 20  # the sparse write lands here: thin storages leave 0..8M unallocated


def _mount_of(path: Path) -> tuple[str, str, str] | None:
    """(major:minor, fstype, source) of the mount holding ``path`` (/proc/self/mountinfo)."""
    best: tuple[int, tuple[str, str, str]] | None = None
    target = str(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        mnt = fields[4].replace("\\040", " ")
        if target == mnt or target.startswith(mnt.rstrip("/") + "/") or mnt == "/":
            if best is None or len(mnt) > best[0]:
                best = (len(mnt), (fields[2], rfields[0], rfields[1]))
    return best[1] if best else None


def block_info(devnum: int) -> BlockInfo | None:
    """sysfs facts of the block device ``devnum`` (a ``st_rdev``), or None if it has none."""
    try:
        dev = pyudev.Devices.from_device_number(pyudev.Context(), "block", devnum)
    except (pyudev.DeviceNotFoundError, ValueError, OSError):
        return None
    parent = dev.find_parent("block", "disk") if dev.device_type == "partition" else None
    disk = dev if parent is None else parent

    def attr(name: str) -> str | None:
        try:
            value = disk.attributes.get(name)
        except (OSError, KeyError):
            return None
        return value.decode().strip() if isinstance(value, bytes) else None

    discard_max = attr("queue/discard_max_bytes")
    rotational = attr("queue/rotational")
    try:
        size = int(dev.attributes.asint("size")) * 512
    except (KeyError, ValueError, OSError):
        size = 0
    return BlockInfo(
        devnode=dev.device_node or f"{os.major(devnum)}:{os.minor(devnum)}",
        discard=bool(discard_max and discard_max != "0"),
        rotational=None if rotational is None else rotational == "1",
        size_bytes=size,
    )


def _device_of_mount(mount: tuple[str, str, str] | None) -> BlockInfo | None:
    if mount is None:
        return None
    majmin, _fstype, source = mount
    major, minor = (int(p) for p in majmin.split(":"))
    if major != 0:
        return block_info(os.makedev(major, minor))
    if source.startswith("/dev/"):  # btrfs and others report an anonymous device number
        try:
            return block_info(os.stat(source).st_rdev)
        except OSError:
            return None
    return None


def probe_directory(path: Path) -> SpaceProbe:
    """Probe a file storage's directory (it must exist and be writable)."""
    try:
        st = os.statvfs(path)
        thin, discard = _try_file_features(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise FleecingError(f"cannot probe fleecing directory {path}: {exc.strerror or exc}") from exc
        thin = discard = False  # full: nothing to try with, and the space rule refuses it anyway
        st = os.statvfs(path)
    mount = _mount_of(path.resolve())
    info = _device_of_mount(mount)
    probe = SpaceProbe(
        where=str(path),
        device=info.devnode if info else (mount[2] if mount else None),
        fstype=mount[1] if mount else None,
        thin=thin,
        discard=discard,
        rotational=info.rotational if info else None,
        free_bytes=st.f_bavail * st.f_frsize,
        total_bytes=st.f_blocks * st.f_frsize,
    )
    log.debug("probed %s: %s", path, probe)
    return probe


def probe_block_device(path: Path) -> BlockInfo | None:
    """sysfs facts of a block device node (``/dev/vg/lv``, ``/dev/zvol/…``)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return block_info(st.st_rdev)
