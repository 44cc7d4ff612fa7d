"""Open an archive for reading: a path or ``-`` (stdin), any compression, recognised by magic."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import BinaryIO

from qmpbackup.compress import open_decompressor
from qmpbackup.direct_input import open_direct
from qmpbackup.errors import QmpBackupError, UsageError
from qmpbackup.vma.reader import ByteSource

log = logging.getLogger(__name__)


def open_input(path: str) -> BinaryIO:
    """The archive file ``path`` opened for reading, or standard input for ``-``.

    :raise UsageError: the file cannot be opened (exit 2: the command line names it).
    """
    if path == "-":
        return sys.stdin.buffer
    try:
        return open_direct(path)  # one pass, front to back: see qmpbackup.direct_input
    except OSError as exc:
        raise _cannot_open(path, exc) from exc


def archive_head(path: str, n: int) -> bytes:
    """The first ``n`` bytes of the archive file ``path``, read plainly (a peek needs no read-ahead).

    :raise UsageError: as :func:`open_input`.
    """
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise _cannot_open(path, exc) from exc


def _cannot_open(path: str, exc: OSError) -> UsageError:
    return UsageError(f"cannot open archive {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def open_archive(path: str, *, read_to_end: bool = True) -> Iterator[ByteSource]:
    """Yield a decompressed byte stream of ``path`` (``-`` = standard input).

    With ``read_to_end=False`` the caller stops early on purpose (``list``,
    ``config`` read only the header), so a decompressor that complains about
    the unread rest (a broken pipe) is not an error.
    """
    raw = open_input(path)
    try:
        decompressor = open_decompressor(raw)
        try:
            yield decompressor
        except BaseException:
            with contextlib.suppress(Exception):
                decompressor.close()
            raise
        if read_to_end:
            decompressor.close()
        else:
            try:
                decompressor.close()
            except QmpBackupError as exc:
                log.debug("ignoring decompressor status after a partial read: %s", exc)
    finally:
        if raw is not sys.stdin.buffer:
            raw.close()
