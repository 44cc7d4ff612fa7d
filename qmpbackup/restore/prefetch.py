"""Read ahead of the consumer in a thread: decompression and file reads overlap the parsing and copying.

zstandard, zlib and file reads release the GIL, so on two or more cores the
archive is decompressed while the main thread checks extents and fills write
buffers. The queue is bounded (``depth`` chunks), so memory stays bounded.
An error raised while reading ahead is raised again from :meth:`read`, in order.

:meth:`read` hands out memoryviews of the chunks instead of copies: the
chunks are immutable ``bytes`` the source returned, so a view stays valid
while the consumer holds it, and the VMA reader cuts clusters out of them
without copying (at 4 GiB per restore each copy cost about half a second).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Protocol

log = logging.getLogger(__name__)

CHUNK = 4 << 20
DEPTH = 4
POLL_S = 0.1
STOP_TIMEOUT_S = 5.0


class ByteSource(Protocol):
    def read(self, n: int, /) -> bytes | memoryview: ...


class PrefetchSource:
    """A ByteSource serving ``source`` from chunks a thread reads ahead; ``close`` stops the thread."""

    def __init__(self, source: ByteSource, *, chunk: int = CHUNK, depth: int = DEPTH) -> None:
        self._source = source
        self._chunk = chunk
        self._queue: queue.Queue[bytes | memoryview | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._current = memoryview(b"")
        self._pos = 0
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="qmpbackup-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | memoryview | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            self._produce()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer and raised there
            self._put(exc)

    def _produce(self) -> None:
        """Queue the source's bytes in pieces, then b"" at its end (subclasses choose other pieces)."""
        self._copy_rest()

    def _copy_rest(self) -> None:
        while not self._stop.is_set():
            data = self._source.read(self._chunk)
            if not self._put(data) or not data:
                return

    def read(self, n: int, /) -> memoryview:
        """Up to ``n`` bytes, a view of a chunk read ahead; empty only at the end of the source."""
        if self._pos >= len(self._current):
            if self._eof:
                return memoryview(b"")
            item = self._next()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return memoryview(b"")
            self._current, self._pos = memoryview(item), 0
        piece = self._current[self._pos : self._pos + n]
        self._pos += len(piece)
        return piece

    def _next(self) -> bytes | memoryview | BaseException:
        """The next chunk, b"" at the end, or the reading error (each wait is bounded by POLL_S)."""
        while True:
            try:
                return self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return RuntimeError("the read-ahead thread ended without a result")

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (bounded: a read blocked on a pipe is left behind)."""
        self._stop.set()
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            log.debug("read-ahead thread still blocked in a read; leaving it (daemon)")
