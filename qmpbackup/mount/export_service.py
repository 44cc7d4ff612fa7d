"""Serving read-only exports until cancelled: the body of ``qmpbackup export``.

The sources come from the caller (the archive's devices; raw files in tests), so this module
knows nothing of the archive format.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from qmpbackup.errors import QmpBackupError
from qmpbackup.nbd import Export, ExportSource, NbdServer

log = logging.getLogger(__name__)


class ExportError(QmpBackupError):
    """The export cannot be served (socket in use, no devices)."""


def nbd_url(socket_path: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={socket_path}"


def _remove_stale_socket(path: Path) -> None:
    """A socket file nobody listens on (a killed export) is removed; a live one is an error."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as err:
        if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("removing stale socket %s", path)
            path.unlink(missing_ok=True)
            return
        raise ExportError(f"socket {path}: {err.strerror}") from err
    finally:
        probe.close()
    raise ExportError(f"socket {path} is in use by another NBD server")


@contextlib.asynccontextmanager
async def serving(sources: Sequence[tuple[str, ExportSource]], socket_path: Path) -> AsyncIterator[NbdServer]:
    """An :class:`NbdServer` of read-only exports on ``socket_path`` (mode 0600)."""
    if not sources:
        raise ExportError("nothing to export: the archive has no devices")
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _remove_stale_socket(socket_path)
    exports = [Export.read_only(name, source) for name, source in sources]
    server = NbdServer(socket_path, exports, name="export", keep_serving=True, private_dir=False)
    async with server:
        yield server


async def serve_forever(sources: Sequence[tuple[str, ExportSource]], socket_path: Path,
                        ready: Callable[[], None] | None = None) -> None:
    """Serve until cancelled (SIGINT/SIGTERM cancel the command); ``ready`` once listening."""
    async with serving(sources, socket_path):
        if ready is not None:
            ready()
        await asyncio.Event().wait()


def describe(sources: Sequence[tuple[str, ExportSource]], socket_path: Path) -> list[str]:
    """One line per export: name, size, URL (what ``export`` prints and ``mount`` parses)."""
    return [f"{name} {source.size} {nbd_url(socket_path, name)}" for name, source in sources]


def detach_stdio() -> None:
    """A daemon's stdin/stdout/stderr go to /dev/null (the caller may be reading a pipe)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
