"""Read ahead extent by extent, each payload decompressed straight into page-aligned memory.

Image writes use ``O_DIRECT``, which needs aligned memory, and a VMA payload
sits 512 bytes past an extent boundary in the stream: read in plain chunks,
every byte had to be copied once more into aligned buffers (about 0.5 s of CPU
per 4 GiB restored, on a 2-core machine the difference between keeping up
with ``zstd -dc`` or not). This thread cuts the stream at extent boundaries
(it looks only at the header size and each extent's magic and block count)
and decompresses every payload into a buffer of its own, so the image writer
hands those buffers to ``pwritev`` as they are.

It checks nothing: :class:`~qmpbackup.vma.reader.VmaReader` checks every byte
as before. Where the stream does not look as expected (a short read, a wrong
magic, too many blocks) it reads on in plain chunks: the bytes are the same,
only the piece boundaries differ, and the reader reports the error.

A buffer is reused once no view of it is left (the consumer's, the writes'):
``mmap.resize`` refuses while views exist, which is the test.
"""

from __future__ import annotations

import logging
import mmap
import time
from typing import Protocol

from qmpbackup.restore.prefetch import CHUNK, ByteSource, PrefetchSource
from qmpbackup.vma import format as fmt

log = logging.getLogger(__name__)

MAX_BUFFERS = 24  # x 3.7 MiB: the read-ahead queue plus the writes in flight
DEPTH = 16  # queued pieces: a header and a payload per extent
WAIT_S = 0.001
_HEADER_SIZE_FIELD = slice(56, 60)  # big-endian header_size in the fixed header part
_MAX_HEADER = 1 << 26  # larger is broken (the reader says so): read it as plain chunks
_PAYLOAD_MAX = fmt.MAX_EXTENT_BLOCKS * fmt.BLOCK_SIZE


class Readinto(ByteSource, Protocol):
    def readinto(self, buffer: memoryview, /) -> int: ...


class ExtentPrefetch(PrefetchSource):
    """A :class:`PrefetchSource` whose pieces are the VMA header, extent headers and page-aligned payloads."""

    def __init__(self, source: Readinto, *, chunk: int = CHUNK, depth: int = DEPTH) -> None:
        self._readinto_source = source
        self._buffers: list[mmap.mmap] = []
        super().__init__(source, chunk=chunk, depth=depth)

    def _read_full(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end; readinto, so that the decompressor holds nothing back
        (a small ``read`` makes it decompress a whole chunk and serve the rest as copies)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n and (k := self._readinto_source.readinto(view[got:])):
            got += k
        view.release()
        del buf[got:]
        return bytes(buf)

    def _produce(self) -> None:
        header = self._read_full(fmt.HEADER_FIXED_SIZE)
        if not header or not self._put(header):
            return None  # the end, or stopped
        if len(header) < fmt.HEADER_FIXED_SIZE:
            return self._copy_rest()
        size = int.from_bytes(header[_HEADER_SIZE_FIELD], "big")
        if not fmt.HEADER_FIXED_SIZE <= size <= _MAX_HEADER:
            return self._copy_rest()
        rest = self._read_full(size - fmt.HEADER_FIXED_SIZE)
        if rest and not self._put(rest):  # (pieces are never empty)
            return None
        if len(rest) < size - fmt.HEADER_FIXED_SIZE:
            return self._copy_rest()
        while not self._handoff.closed:
            head = self._read_full(fmt.EXTENT_HEADER_SIZE)
            if not head or not self._put(head):
                return None
            blocks = int.from_bytes(head[6:8], "big")
            if len(head) < fmt.EXTENT_HEADER_SIZE or head[:4] != fmt.EXTENT_MAGIC or blocks > fmt.MAX_EXTENT_BLOCKS:
                return self._copy_rest()
            if blocks and not self._payload(blocks * fmt.BLOCK_SIZE):
                return self._copy_rest()
        return None

    def _payload(self, size: int) -> bool:
        """Decompress one payload into a free buffer and queue it; False if the input ended first."""
        buf = self._free_buffer()
        if buf is None:
            return False
        view = memoryview(buf)[:size]
        got = 0
        while got < size and (n := self._readinto_source.readinto(view[got:])):
            got += n
        if got:
            self._put(view[:got])
        return got == size

    def _free_buffer(self) -> mmap.mmap | None:
        """A buffer nobody views any more (or a new one, up to MAX_BUFFERS); None once stopped.

        Nothing signals the end of a view, so this looks every WAIT_S. Like every helper it
        waits for the consumer without a deadline (:mod:`qmpbackup.handoff`): the consumer's
        own waits (for us, for the image writes holding the views) carry the deadline.
        """
        while not self._handoff.closed:
            for buf in self._buffers:
                try:
                    buf.resize(len(buf))  # BufferError while a view of it exists
                except BufferError:
                    continue
                return buf
            if len(self._buffers) < MAX_BUFFERS:
                self._buffers.append(mmap.mmap(-1, _PAYLOAD_MAX))
                return self._buffers[-1]
            time.sleep(WAIT_S)
        return None
