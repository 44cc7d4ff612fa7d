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
from typing import Protocol

from qmpbackup.handoff import Handoff, Owner

log = logging.getLogger(__name__)

CHUNK = 4 << 20
DEPTH = 4


class ByteSource(Protocol):
    def read(self, n: int, /) -> bytes | memoryview: ...


class PrefetchSource:
    """A ByteSource serving ``source`` from chunks a thread reads ahead; ``close`` stops the thread.

    Waits and stalls as every hand-off does (:mod:`qmpbackup.handoff`).
    """

    def __init__(self, source: ByteSource, *, chunk: int = CHUNK, depth: int = DEPTH) -> None:
        self._source = source
        self._chunk = chunk
        self._handoff: Handoff[bytes | memoryview] = Handoff(depth, "reading the archive ahead", owner=Owner.CONSUMER)
        self._current = memoryview(b"")
        self._pos = 0
        self._eof = False
        self._handoff.start(self._produce, "qmpbackup-prefetch")

    def _put(self, piece: bytes | memoryview) -> bool:
        """Queue a non-empty piece; False once the consumer has closed."""
        return self._handoff.put(piece)

    def _produce(self) -> None:
        """Queue the source's bytes in pieces (subclasses choose other pieces); returning ends the stream."""
        self._copy_rest()

    def _copy_rest(self) -> None:
        while data := self._source.read(self._chunk):
            if not self._put(data):
                return

    def read(self, n: int, /) -> memoryview:
        """Up to ``n`` bytes, a view of a chunk read ahead; empty only at the end of the source."""
        if self._pos >= len(self._current):
            if self._eof:
                return memoryview(b"")
            try:
                item = self._handoff.get()
            except BaseException:
                self._eof = True
                raise
            if item is None:
                self._eof = True
                return memoryview(b"")
            self._current, self._pos = memoryview(item), 0
        piece = self._current[self._pos : self._pos + n]
        self._pos += len(piece)
        return piece

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (bounded: a read blocked on a pipe is left behind)."""
        self._handoff.stop()
