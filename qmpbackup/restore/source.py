"""The archive as a decompressed byte stream, optionally read at a limited rate and read ahead.

The limit applies to the archive bytes as stored (compressed), like the
``cstream`` Proxmox puts in front of the decompressor, so ``--bwlimit`` is
what the archive's disk or network sees. Reading ahead in a thread
(:mod:`qmpbackup.restore.extent_prefetch`) lets decompression overlap the
rest, and puts each extent's payload in page-aligned memory for the writes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import BinaryIO, cast

from qmpbackup.compress import Decompressor, open_decompressor
from qmpbackup.errors import QmpBackupError
from qmpbackup.restore.extent_prefetch import ExtentPrefetch
from qmpbackup.throttle import ThrottledSource, TokenBucket
from qmpbackup.vma.archive_io import open_input

log = logging.getLogger(__name__)


class ArchiveStream:
    """Decompressed archive bytes; ``close`` stops the read-ahead, then runs the decompressor's end checks."""

    def __init__(self, decompressor: Decompressor, *, prefetch: bool) -> None:
        self._decompressor = decompressor
        self._prefetch = ExtentPrefetch(decompressor) if prefetch else None

    def read(self, n: int, /) -> bytes | memoryview:
        if self._prefetch is not None:
            return self._prefetch.read(n)
        return self._decompressor.read(n)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
        self._decompressor.close()


@contextlib.contextmanager
def open_archive_stream(path: str, *, rate_bytes_per_s: float = 0.0, prefetch: bool = True) -> Iterator[ArchiveStream]:
    """Yield the decompressed stream of ``path`` (``-`` = stdin); a normal exit closes it (end checks)."""
    raw = open_input(path)
    try:
        source = raw if rate_bytes_per_s <= 0 else cast(BinaryIO, ThrottledSource(raw, TokenBucket(rate_bytes_per_s)))
        stream = ArchiveStream(open_decompressor(source), prefetch=prefetch)
        try:
            yield stream
        except BaseException:
            with contextlib.suppress(QmpBackupError, OSError):
                stream.close()
            raise
        stream.close()
    finally:
        if raw is not sys.stdin.buffer:
            raw.close()
