"""Read ahead of the consumer in a thread: decompression and file reads overlap the parsing and copying.

zstandard, zlib and file reads release the GIL, so on two or more cores the
archive is decompressed while the main thread checks extents and fills write
buffers. The queue is bounded (``depth`` chunks), so memory stays bounded.
An error raised while reading ahead is raised again from :meth:`read`, in order.
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
    def read(self, n: int, /) -> bytes: ...


class PrefetchSource:
    """A ByteSource serving ``source`` from chunks a thread reads ahead; ``close`` stops the thread."""

    def __init__(self, source: ByteSource, *, chunk: int = CHUNK, depth: int = DEPTH) -> None:
        self._source = source
        self._chunk = chunk
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._current = b""
        self._pos = 0
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="qmpbackup-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(self._chunk)
                if not self._put(data) or not data:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer and raised there
            self._put(exc)

    def read(self, n: int, /) -> bytes:
        """Up to ``n`` bytes; b"" only at the end of the source."""
        if self._pos >= len(self._current):
            if self._eof:
                return b""
            item = self._next()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return b""
            self._current, self._pos = item, 0
        if self._pos == 0 and n >= len(self._current):
            self._pos = len(self._current)
            return self._current  # the whole chunk: no copy
        piece = self._current[self._pos : self._pos + n]
        self._pos += len(piece)
        return piece

    def _next(self) -> bytes | BaseException:
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
