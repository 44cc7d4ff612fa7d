"""Read any byte range of an archived device, through the archive's index (docs/format.md I).

This is what ``export``, ``mount`` and later live and file restore build on. An
uncompressed ``.vma`` is read with ``pread`` at the offsets the index records; a
``.vma.zst`` that qmpbackup wrote (independent frames, each at most 16 clusters of
one extent) costs at most one frame decompression per cluster, and a small LRU
cache keeps recently decompressed frames. Every cluster read is checked against its
digest, so a damaged archive gives an error, never wrong data. gzip and lzo streams,
and zstd written as one long frame, cannot be read at random: opening them says so
and names ``qmpbackup vma recompress``.

Thread safety: ``read``, ``pieces`` and ``allocation`` may be called from several threads;
the file is read with ``pread`` only, each thread has its own zstd decompressor, and the
frame cache is behind a lock.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import zstandard

from qmpbackup.compress import GZIP_MAGIC, LZOP_MAGIC, ZSTD_MAGIC
from qmpbackup.errors import QmpBackupError
from qmpbackup.malloc_tuning import keep_large_buffers
from qmpbackup.vma import format as fmt
from qmpbackup.vma.index import (
    ArchiveIndex,
    DataChecksumError,
    IndexDevice,
    Record,
)

#: Decompressed frames kept (each at most ~1 MiB for our archives). A sequential reader's 8 reads
#: in flight use up to ~24 frames: with 16 kept, 5 % of the frames of a 4 GiB disk were
#: decompressed twice; with 32, none.
FRAME_CACHE = 32
#: What :meth:`DeviceReader.pieces` returns.
Piece = bytes | bytearray | memoryview
_ZEROS: Final = memoryview(fmt.ZERO_CLUSTER)
#: Runs one ``allocation`` call returns at most (an NBD BLOCK_STATUS reply may cover less than asked).
ALLOCATION_RUNS = 1024
_MASK_BATCH = 4096  # clusters whose records allocation unpacks at once


class RandomAccessError(QmpBackupError):
    """The archive cannot be read at random (no usable index, or a stream that cannot seek)."""


class ArchiveDevices:
    """The devices of one archive, readable at any offset. Use :meth:`open`, as a context manager."""

    def __init__(self, path: Path, index: ArchiveIndex, fd: int, zstd: bool) -> None:
        self.path = path
        self._index = index
        self._fd = fd
        self._zstd = zstd
        self._local = threading.local()
        self._lock = threading.Lock()
        self._frames: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._loading: dict[int, Future[bytes]] = {}  # frames a thread is decompressing
        self._readahead = _Readahead(fd)
        self._hint = 0  # the frame found last (a guess to try first; shared by threads, checked every time)
        self.devices: list[DeviceReader] = [DeviceReader(self, dev) for dev in index.devices]

    @classmethod
    def open(cls, path: Path) -> ArchiveDevices:
        """Open ``path`` for random reads; RandomAccessError (one line, naming the fix) if it cannot be."""
        try:
            with open(path, "rb") as f:
                head = f.read(len(LZOP_MAGIC))
        except OSError as exc:
            raise RandomAccessError(f"cannot open archive {path}: {exc.strerror or exc}") from exc
        if head.startswith((GZIP_MAGIC, LZOP_MAGIC)):
            raise RandomAccessError(f"{path.name} is a gzip/lzo stream, which cannot be read at random "
                                    f"(run: qmpbackup vma recompress {path})")
        zstd = head.startswith(ZSTD_MAGIC)
        try:
            index = ArchiveIndex.open(path)
        except QmpBackupError as exc:
            raise RandomAccessError(str(exc)) from exc
        try:
            if zstd and not index.framed:
                raise RandomAccessError(f"{path.name} is one long zstd stream, which cannot be read at random "
                                        f"(run: qmpbackup vma recompress {path})")
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            index.close()
            raise RandomAccessError(f"cannot open archive {path}: {exc.strerror or exc}") from exc
        except BaseException:
            index.close()
            raise
        keep_large_buffers()
        size = os.fstat(fd).st_size
        if not zstd and size < index.plain_size:
            os.close(fd)
            index.close()
            raise RandomAccessError(f"{path.name} is truncated ({size} of {index.plain_size} bytes)")
        return cls(path, index, fd, zstd)

    def device(self, name: str) -> DeviceReader | None:
        return next((d for d in self.devices if d.name == name), None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._index.close()
            self._frames.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- reading the plain stream ----------------------------------------------------------

    def plain(self, offset: int, length: int) -> bytes | memoryview:
        """``length`` bytes of the uncompressed VMA stream at ``offset`` (a view into a cached frame
        when one frame holds them all: no copy)."""
        if not self._zstd:
            self._readahead.read(offset, length)
            data = os.pread(self._fd, length, offset)
            if len(data) < length:
                raise RandomAccessError(f"{self.path.name} ends before byte {offset + length}")
            return data
        pieces = []
        while length:
            n, start = self._frame_at(offset)
            frame = memoryview(self._frame(n))
            piece = frame[offset - start:offset - start + length]
            if not piece:
                raise RandomAccessError(f"{self.path.name}: frame {n} shorter than its index says")
            pieces.append(piece)
            offset += len(piece)
            length -= len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _frame_at(self, offset: int) -> tuple[int, int]:
        """(frame number, its plain start) of the frame holding plain byte ``offset``.

        The last frame found (and the one after it) are tried first: sequential reads and the
        clusters of one frame then cost two table look-ups, not a binary search of the table.
        """
        hint = self._hint
        if hint + 1 < self._index.frame_count:
            start, after = self._index.frame(hint)[1], self._index.frame(hint + 1)[1]
            if start <= offset < after:
                return hint, start
            if after <= offset < self._index.frame(hint + 2)[1]:
                self._hint = hint + 1
                return hint + 1, after
        n = self._index.frame_at(offset)
        self._hint = n
        return n, self._index.frame(n)[1]

    def _frame(self, n: int) -> bytes:
        """Frame ``n`` decompressed, from the cache or decompressed once: a thread that needs a frame
        another thread is decompressing waits for it (sequential NBD reads run side by side and
        share the frames at their edges; each would otherwise decompress those frames again)."""
        with self._lock:
            cached = self._frames.get(n)
            if cached is not None:
                self._frames.move_to_end(n)
                return cached
            loading = self._loading.get(n)
            if loading is None:
                mine: Future[bytes] = Future()
                self._loading[n] = mine
        if loading is not None:
            return loading.result()
        try:
            data = self._decompress(n)
        except BaseException as exc:
            with self._lock:
                del self._loading[n]
            mine.set_exception(exc)
            raise
        with self._lock:
            del self._loading[n]
            self._frames[n] = data
            while len(self._frames) > FRAME_CACHE:
                self._frames.popitem(last=False)
        mine.set_result(data)
        return data

    def _decompress(self, n: int) -> bytes:
        (c_start, p_start), (c_end, p_end) = self._index.frame(n), self._index.frame(n + 1)
        raw = os.pread(self._fd, c_end - c_start, c_start)
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        try:
            data = dctx.decompress(raw, max_output_size=p_end - p_start)
        except zstandard.ZstdError as exc:
            raise RandomAccessError(f"{self.path.name}: damaged zstd frame at byte {c_start}: {exc}") from exc
        if len(data) != p_end - p_start:
            raise RandomAccessError(f"{self.path.name}: zstd frame at byte {c_start} holds {len(data)} bytes, "
                                    f"the index says {p_end - p_start}")
        return data

    def cluster(self, dev: IndexDevice, cluster: int) -> bytes | bytearray | memoryview | None:
        """A cluster's 65536 bytes checked against its digest; None when it is all zero (mask 0)."""
        return self._cluster(dev, cluster, self._index.record(dev, cluster))

    def _cluster(self, dev: IndexDevice, cluster: int, record: Record) -> bytes | bytearray | memoryview | None:
        if record.mask == 0 or record.digest == self._index.zero_digest:
            return None  # (stored blocks whose cluster hashes as all zeros are zeros: nothing to read)
        stored = self.plain(record.data_offset, record.mask.bit_count() * fmt.BLOCK_SIZE)
        if record.mask == fmt.FULL_MASK:
            return self._checked(dev, cluster, record, stored)
        buf = bytearray(fmt.CLUSTER_SIZE)
        at = 0
        for start, end in fmt.stored_runs(record.mask):
            buf[start:end] = stored[at:at + end - start]
            at += end - start
        return self._checked(dev, cluster, record, buf)

    def _checked(self, dev: IndexDevice, cluster: int, record: Record, data: Piece) -> Piece:
        """``data`` if it is the cluster the index recorded, else DataChecksumError."""
        if self._index.digest_of(data) != record.digest:
            raise DataChecksumError(dev.name, cluster, record.data_offset)
        return data

    def clusters(self, dev: IndexDevice, first: int, count: int) -> Iterator[Piece | None]:
        """Clusters ``first`` .. ``first + count - 1``, each checked: 65536 bytes, or None when all zero.

        In a ``.vma`` the fully stored clusters of one extent lie back to back: each such run is
        read with one ``pread`` (up to an extent's 59 clusters) and handed out as views of it;
        everything else is read as :meth:`cluster` reads it. Each record is read once.
        Sequential export reads are mostly this.
        """
        index = self._index
        size = fmt.CLUSTER_SIZE
        end = first + count
        cluster = first
        record = index.record(dev, cluster) if count else None
        while record is not None:
            after = index.record(dev, cluster + 1) if cluster + 1 < end else None
            if self._zstd or record.mask != fmt.FULL_MASK or record.digest == index.zero_digest:
                yield self._cluster(dev, cluster, record)
                cluster, record = cluster + 1, after
                continue
            run = [record]
            while (after is not None and after.mask == fmt.FULL_MASK and after.digest != index.zero_digest
                   and after.data_offset == run[-1].data_offset + size):
                run.append(after)
                after = index.record(dev, cluster + len(run)) if cluster + len(run) < end else None
            span = memoryview(self.plain(record.data_offset, len(run) * size))
            for j, stored in enumerate(run):
                yield self._checked(dev, cluster + j, stored, span[j * size:(j + 1) * size])
            cluster, record = cluster + len(run), after


class _Readahead:
    """Asks the kernel to read ahead of sequential reads of a ``.vma`` (``WILLNEED``).

    An export reads a run of stored clusters per NBD request, in several threads at once, so
    the kernel sees interleaved ``pread`` calls and reads ahead little: six threads reading a
    4 GiB ``.vma`` this way from a cold page cache took 3.9-5.0 s, with the hint 1.9-2.4 s.
    (A ``.vma.zst`` is not hinted: its frames are a third of the bytes and decompressing them
    is the limit; the hint's page-cache walk cost 0.3 s of CPU per 4 GiB and gained nothing.)
    A read that starts near where the last one ended counts as sequential and keeps a window of
    ``WINDOW`` bytes requested ahead of it; random reads ask for nothing more than they read.
    A hint only: racing threads may ask twice, which costs a system call.
    """

    WINDOW: Final = 16 << 20

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._end = -1  # where the last read ended
        self._ahead = 0  # requested up to here

    def read(self, offset: int, length: int) -> None:
        end = offset + length
        if abs(offset - self._end) <= self.WINDOW and self._ahead - end < self.WINDOW // 2:
            start = max(end, self._ahead)
            self._ahead = end + self.WINDOW
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, start, self._ahead - start, os.POSIX_FADV_WILLNEED)
        self._end = end


class DeviceReader:
    """One device of an archive: ``read`` any range, ``allocation`` says which blocks read as zeros."""

    def __init__(self, archive: ArchiveDevices, dev: IndexDevice) -> None:
        self._archive = archive
        self._dev = dev
        self.name: str = dev.name
        self.size: int = dev.size

    def __repr__(self) -> str:
        return f"<DeviceReader {self.name} {self.size}>"

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RandomAccessError(f"{self.name}: range {offset}+{length} outside the device ({self.size} bytes)")

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; holes and omitted blocks read as zeros. Raises
        DataChecksumError (naming device and cluster) when the archive's data is damaged."""
        self._check_range(offset, length)
        cluster, within = divmod(offset, fmt.CLUSTER_SIZE)
        if within + length <= fmt.CLUSTER_SIZE:  # one cluster (small random reads): one copy
            data = self._archive.cluster(self._dev, cluster)
            return bytes(length) if data is None else bytes(data[within:within + length])
        return b"".join(self.pieces(offset, length))

    def pieces(self, offset: int, length: int) -> list[Piece]:
        """The same bytes as :meth:`read`, as buffers in order and without copying: views of the
        cached frames (or of the runs read from a ``.vma``), and of one shared zero cluster for
        holes. ``export`` hands them to a single scatter-gather ``sendmsg``."""
        self._check_range(offset, length)
        out: list[Piece] = []
        first, within = divmod(offset, fmt.CLUSTER_SIZE)
        count = -(-(within + length) // fmt.CLUSTER_SIZE)
        for data in self._archive.clusters(self._dev, first, count):
            take = min(fmt.CLUSTER_SIZE - within, length)
            out.append(_ZEROS[:take] if data is None else memoryview(data)[within:within + take])
            length -= take
            within = 0
        return out

    def allocation(self, offset: int, length: int, max_runs: int = ALLOCATION_RUNS) -> list[tuple[int, int, bool]]:
        """Runs ``(offset, length, zero)`` from ``offset`` on at 4 KiB granularity; ``zero``: reads as zeros.

        Answered from the index alone (no data is read): a block is zero when the archive left it
        out, or when it is stored but its whole cluster's digest is the all-zero digest (a writer
        that stores zero blocks). A stored zero block next to data in its cluster shows as data:
        telling it apart would mean reading and decompressing the cluster. At most ``max_runs``
        runs: they then cover only the start of the range (an NBD client asks again from there).
        """
        self._check_range(offset, length)
        runs: list[tuple[int, int, bool]] = []
        if not length:
            return runs
        pos = offset
        end = offset + length
        first = offset // fmt.CLUSTER_SIZE
        last = (end - 1) // fmt.CLUSTER_SIZE
        while first <= last:
            count = min(last + 1 - first, _MASK_BATCH)
            for cluster, (stored, zero_digest) in enumerate(self._archive._index.masks(self._dev, first, count), first):
                mask = 0 if zero_digest else stored
                cluster_start = cluster * fmt.CLUSTER_SIZE
                if mask == 0 or mask == fmt.FULL_MASK:
                    pieces: list[tuple[int, bool]] = [(min(cluster_start + fmt.CLUSTER_SIZE, end), mask == 0)]
                else:
                    pieces = []
                    for block in range((pos - cluster_start) // fmt.BLOCK_SIZE, fmt.BLOCKS_PER_CLUSTER):
                        stop = min(cluster_start + (block + 1) * fmt.BLOCK_SIZE, end)
                        pieces.append((stop, not mask >> block & 1))
                        if stop == end:
                            break
                for stop, zero in pieces:
                    if runs and runs[-1][2] == zero:
                        runs[-1] = (runs[-1][0], stop - runs[-1][0], zero)
                    elif len(runs) == max_runs:
                        return runs
                    else:
                        runs.append((pos, stop - pos, zero))
                    pos = stop
            first += count
        return runs


__all__ = ["ArchiveDevices", "DeviceReader", "Piece", "RandomAccessError"]
