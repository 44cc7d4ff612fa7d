"""A sparse raw image written at random offsets, as clusters arrive from an archive.

The file is created empty (``O_EXCL``) and truncated to the device size, so
everything never written reads as zero and takes no space: all-zero clusters
and omitted 4 KiB blocks are simply not written.

Write path: runs that continue where the previous data ended are gathered up
to 4 MiB and written with ``O_DIRECT`` by a few writer threads
(:class:`WritePool`), so reading and decompressing the archive go on while
earlier data is written, and several writes are in flight as with
``qemu-img convert``. Data that already sits in page-aligned memory (payloads
from :mod:`qmpbackup.restore.extent_prefetch`) goes to ``pwritev`` as it is;
anything else is first copied into one of the pool's aligned 4 MiB buffers
(for a 4 GiB restore of real files that saved about 0.5 s of CPU, which on
two cores decompression needs). Measured on the development VM
(scripts/bench-restore): buffered writes of 512 MiB ran at 0.2-0.3 GB/s (page-cache growth is slow on a
host that reclaims guest memory), one synchronous ``O_DIRECT`` writer at about
0.7 GB/s, three in flight at about 1.3 GB/s. Archives usually carry a device's
clusters in order, so most runs are the full 4 MiB. A device's unaligned tail
(sizes are whole 512-byte sectors) goes through the page cache, and file
systems without ``O_DIRECT`` (tmpfs) get plain writes. Memory is bounded by the
pool's buffers (8 x 4 MiB) plus at most 8 runs of views in flight, whatever the
number of devices.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import logging
import mmap
import os
from pathlib import Path

from qmpbackup.handoff import STALL_S, Handoff, Owner, Stalled
from qmpbackup.restore.errors import RestoreError
from qmpbackup.vma import format as fmt

log = logging.getLogger(__name__)

BUFFER_SIZE = 4 << 20
DIRECT_ALIGN = 4096
WRITER_THREADS = 3
BUFFERS = 8
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class WritePool:
    """Aligned buffers and writer threads shared by the images of one restore; ``close`` it.

    The writer threads hand buffers and write slots back through :class:`Handoff`, so the
    restore waits for them and stalls as every hand-off does (:mod:`qmpbackup.handoff`).
    """

    def __init__(self, threads: int = WRITER_THREADS, buffers: int = BUFFERS) -> None:
        self._free: Handoff[mmap.mmap] = Handoff(buffers, "image writes", owner=Owner.CONSUMER)
        self._all = [mmap.mmap(-1, BUFFER_SIZE) for _ in range(buffers)]
        for buf in self._all:
            self._free.put(buf)
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="qmpbackup-restore-write")
        # A token per write of views in flight: as many as buffers.
        self._vector_slots: Handoff[int] = Handoff(buffers, "image writes", owner=Owner.CONSUMER)
        for slot in range(buffers):
            self._vector_slots.put(slot)

    def take(self) -> mmap.mmap:
        """A free buffer; waits for a write to finish when all are in flight."""
        buf = self._free.get()
        assert buf is not None  # never finished nor closed
        return buf

    def give_back(self, buf: mmap.mmap) -> None:
        self._free.put(buf)

    def submit(self, job: _WriteJob) -> concurrent.futures.Future[None]:
        return self._executor.submit(job.run, self)

    def submit_vector(self, views: list[memoryview], offset: int, fd: int) -> concurrent.futures.Future[None]:
        """Write aligned ``views`` at ``offset`` (no copy); waits while as many such writes as buffers are in flight."""
        slot = self._vector_slots.get()
        assert slot is not None  # never finished nor closed
        try:
            return self._executor.submit(self._write_vector, views, offset, fd, slot)
        except BaseException:
            self._vector_slots.put(slot)
            raise

    def _write_vector(self, views: list[memoryview], offset: int, fd: int, slot: int) -> None:
        try:
            _pwritev_all(fd, views, offset)
        finally:
            views.clear()  # the read-ahead reuses a buffer once no view of it is left
            self._vector_slots.put(slot)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for buf in self._all:
            with contextlib.suppress(BufferError):
                buf.close()


class _WriteJob:
    """One gathered run: the aligned part with O_DIRECT, an unaligned rest through the page cache."""

    __slots__ = ("buf", "direct_fd", "fd", "length", "offset")

    def __init__(self, buf: mmap.mmap, length: int, offset: int, fd: int, direct_fd: int) -> None:
        self.buf, self.length, self.offset, self.fd, self.direct_fd = buf, length, offset, fd, direct_fd

    def run(self, pool: WritePool) -> None:
        try:
            with memoryview(self.buf) as view:
                aligned = 0
                if self.direct_fd >= 0 and self.offset % DIRECT_ALIGN == 0:
                    aligned = self.length - self.length % DIRECT_ALIGN
                if aligned:
                    _pwrite_all(self.direct_fd, view[:aligned], self.offset)
                if aligned < self.length:
                    _pwrite_all(self.fd, view[aligned : self.length], self.offset + aligned)
        finally:
            pool.give_back(self.buf)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    index = 0
    while index < len(views):
        n = os.pwritev(fd, views[index:] if index else views, offset)
        offset += n
        while index < len(views) and n >= len(views[index]):
            n -= len(views[index])
            index += 1
        if n:
            views[index] = views[index][n:]


def _aligned(view: memoryview) -> bool:
    """Whether ``O_DIRECT`` can write ``view`` as it is (address and length multiples of DIRECT_ALIGN)."""
    if view.readonly or len(view) % DIRECT_ALIGN:
        return False  # read-only views are of bytes objects: never page-aligned
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0


def _open_direct(path: Path, fd: int) -> int:
    """A second descriptor of the just-created file with O_DIRECT, or -1 where it is not supported."""
    try:
        direct = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return -1
        raise
    if os.fstat(direct).st_ino != os.fstat(fd).st_ino:  # replaced under us: do not write there
        os.close(direct)
        raise RestoreError(f"{path} was replaced while being created")
    return direct


class RawImage:
    """One device's image file under construction; ``close`` or ``discard`` it."""

    def __init__(self, path: Path, size: int, pool: WritePool, *, mode: int = 0o644) -> None:
        self.path = path
        self.size = size
        self.written = 0  # bytes of data written (zeros never are)
        self._pool = pool
        self._pending: list[concurrent.futures.Future[None]] = []
        self._views: list[memoryview] = []  # the run being gathered
        self._vector = False  # whether the run can go to pwritev as it is
        self._direct_fd = -1
        self._fd = os.open(path, _CREATE, mode)
        try:
            os.ftruncate(self._fd, size)
            self._direct_fd = _open_direct(path, self._fd)
        except BaseException:
            self.discard()
            raise
        self._start = 0
        self._fill = 0

    def write_cluster(self, cluster_num: int, mask: int, data: bytes | memoryview | None) -> None:
        """Place one cluster (as the VMA reader yields it); zero data is skipped."""
        if data is None or mask == 0:
            return
        offset = cluster_num * fmt.CLUSTER_SIZE
        limit = min(fmt.CLUSTER_SIZE, self.size - offset)
        if mask == fmt.FULL_MASK:
            if len(data) == fmt.CLUSTER_SIZE and fmt.ZERO_CLUSTER.startswith(data):
                return  # stored, but zero all the same (startswith: memcmp, where == on a memoryview is per byte)
            self._add(offset, data, 0, limit)
            return
        for start, end in fmt.stored_runs(mask):
            end = min(end, limit)
            if start < end:
                self._add(offset + start, data, start, end)

    def _add(self, offset: int, data: bytes | memoryview, start: int, end: int) -> None:
        length = end - start
        piece = (data if type(data) is memoryview else memoryview(data))[start:end]
        vector = self._direct_fd >= 0 and offset % DIRECT_ALIGN == 0 and _aligned(piece)
        if self._fill and (
            offset != self._start + self._fill or self._fill + length > BUFFER_SIZE or vector != self._vector
        ):
            self.flush()  # a run is all aligned (written as it is) or all copied
        if not self._fill:
            self._check_done()
            self._start = offset
            self._vector = vector
        self._views.append(piece)
        self._fill += length

    def flush(self) -> None:
        """Hand the gathered run to a writer thread: as it is if aligned, else copied into a pool buffer."""
        views, self._views = self._views, []
        if not self._fill:
            return
        length, self._fill = self._fill, 0
        if self._vector:
            self._pending.append(self._pool.submit_vector(views, self._start, self._direct_fd))
        else:
            buf = self._pool.take()
            at = 0
            for view in views:
                buf[at : at + len(view)] = view
                at += len(view)
            views.clear()
            self._pending.append(self._pool.submit(_WriteJob(buf, length, self._start, self._fd, self._direct_fd)))
        self.written += length

    def _check_done(self) -> None:
        """Raise the error of a finished write, if any; forget the finished ones."""
        still: list[concurrent.futures.Future[None]] = []
        for future in self._pending:
            if future.done():
                self._result(future)
            else:
                still.append(future)
        self._pending = still

    def _wait_all(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            self._result(future)

    def _result(self, future: concurrent.futures.Future[None]) -> None:
        """A write's outcome; an OSError gets this image's path (pwrite errors carry none)."""
        try:
            future.result(timeout=STALL_S)
        except concurrent.futures.TimeoutError:
            raise Stalled(f"writing {self.path}", STALL_S) from None
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            raise

    def close(self) -> None:
        """Write everything, make it durable and close (the caller renames the file afterwards)."""
        if self._fd < 0:
            return
        try:
            self.flush()
            self._wait_all()
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        finally:
            self._release()

    def _release(self) -> None:
        for fd in (self._direct_fd, self._fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._direct_fd = -1

    def discard(self) -> None:
        """Stop, wait for writes in flight (their errors no longer matter), remove the file; idempotent."""
        self._views, self._fill = [], 0
        pending, self._pending = self._pending, []
        for future in pending:
            with contextlib.suppress(Exception):
                future.result(timeout=STALL_S)
        self._release()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
