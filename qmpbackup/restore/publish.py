"""The last step of a restore: all new files take their final names, or none does.

Without ``replace`` a final name that exists stops everything (hard links
publish without ever overwriting). With ``replace`` an existing file is first
hard-linked aside (``.<name>.restore-old``) and then replaced by rename, so a
failure part-way puts every earlier file back as it was. Signals are held
while this runs: it is short and must not stop half-way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

from qmpbackup.atomic_file import fsync_directory
from qmpbackup.restore.errors import RestoreRefusedError
from qmpbackup.restore.placement import OLD_SUFFIX, work_name

log = logging.getLogger(__name__)

_HELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Delay SIGINT/SIGTERM/SIGHUP until the block is done (they are delivered afterwards)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _link_no_replace(temp: Path, final: Path) -> None:
    try:
        os.link(temp, final)
    except FileExistsError:
        raise RestoreRefusedError(f"{final} appeared during the restore; not replacing it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(final):  # no hard links on this file system: check, then rename
            raise RestoreRefusedError(f"{final} appeared during the restore; not replacing it") from exc
        os.rename(temp, final)
        return
    os.unlink(temp)


def publish(moves: Sequence[tuple[Path, Path]], *, replace: bool) -> None:
    """Rename each ``(temp, final)``; on failure undo the ones done and re-raise."""
    done: list[tuple[Path, Path | None]] = []
    with signals_held():
        try:
            for temp, final in moves:
                old: Path | None = None
                if os.path.lexists(final):
                    if not replace:
                        raise RestoreRefusedError(f"{final} exists; use --force to replace it")
                    old = work_name(final, OLD_SUFFIX)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(old)
                    os.link(final, old)
                    os.replace(temp, final)
                else:
                    _link_no_replace(temp, final)
                done.append((final, old))
                log.debug("published %s", final)
        except BaseException:
            for final, old in reversed(done):
                try:
                    if old is not None:
                        os.replace(old, final)
                    else:
                        os.unlink(final)
                except OSError as exc:
                    log.error("could not undo %s: %s", final, exc)
            raise
        for _, old in done:
            if old is not None:
                with contextlib.suppress(OSError):
                    os.unlink(old)
        for directory in {final.parent for _, final in moves}:
            fsync_directory(directory)
