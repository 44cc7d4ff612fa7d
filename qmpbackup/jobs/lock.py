"""The host-wide backup lock: one backup job at a time, as vzdump's global lock.

Two jobs reading the same disks at once would halve both and fight over the
dump directory, so a job takes an exclusive ``flock`` on a lock file first,
waiting up to ``lockwait`` minutes, and records its pid in a pid file so that
``backup --stop`` can find and end it. The wait polls a non-blocking ``flock``
so that it stays cancellable (signals, asyncio cancellation) and bounded.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from types import TracebackType

from qmpbackup.errors import QmpBackupError

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("/run/qmpbackup")
LOCK_NAME = "backup.lock"
PID_NAME = "backup.pid"
POLL_S = 0.5


class LockError(QmpBackupError):
    """The lock could not be taken (timeout) or the lock file cannot be used."""


class LockTimeoutError(LockError):
    def __init__(self, path: Path, wait_s: float) -> None:
        self.path = path
        super().__init__(f"can't acquire lock '{path}' - got timeout after {wait_s / 60:g} min")


class HostLock:
    """``flock`` on ``<run_dir>/backup.lock`` plus ``<run_dir>/backup.pid`` while held."""

    def __init__(self, run_dir: Path = DEFAULT_RUN_DIR) -> None:
        self.path = run_dir / LOCK_NAME
        self.pid_path = run_dir / PID_NAME
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"HostLock({str(self.path)!r}, held={self._fd is not None})"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LockError(f"cannot open lock file '{self.path}': {exc.strerror}") from exc

    def _try(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise LockError(f"cannot lock '{self.path}': {exc.strerror}") from exc
        return True

    def _got(self, fd: int) -> None:
        self._fd = fd
        try:
            tmp = self.pid_path.with_name(f".{PID_NAME}.{os.getpid()}")
            tmp.write_text(f"{os.getpid()}\n")
            os.replace(tmp, self.pid_path)
        except OSError as exc:
            self.release()
            raise LockError(f"cannot write pid file '{self.pid_path}': {exc.strerror}") from exc

    def acquire(self, wait_s: float) -> None:
        """:meth:`acquire_async` for callers without an event loop."""
        asyncio.run(self.acquire_async(wait_s))

    async def acquire_async(self, wait_s: float) -> None:
        """Take the lock, waiting up to ``wait_s`` seconds (polling) with one message when we wait.

        The wait is an ``asyncio.sleep``, so cancellation ends it.
        """
        fd = self._open()
        try:
            if not self._try(fd):
                log.info("trying to get global lock - waiting...")
                deadline = time.monotonic() + wait_s
                while not self._try(fd):
                    if time.monotonic() >= deadline:
                        raise LockTimeoutError(self.path, wait_s)
                    await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
                log.info("got global lock")
        except BaseException:
            os.close(fd)
            raise
        self._got(fd)

    def release(self) -> None:
        """Drop the lock and our pid file; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if read_pid(self.pid_path) == os.getpid():
                self.pid_path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove pid file '%s': %s", self.pid_path, exc.strerror)
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> HostLock:
        if not self.held:
            raise LockError("HostLock used as a context manager before acquire()")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def read_pid(pid_path: Path) -> int | None:
    """The pid in a pid file, or None if there is none (or it is garbage)."""
    try:
        text = pid_path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def stop_running_job(run_dir: Path = DEFAULT_RUN_DIR, wait_s: float = 15.0) -> int | None:
    """``backup --stop``: SIGTERM the job holding the lock, and wait up to ``wait_s`` for it to end.

    Returns the pid that was stopped, or None if no job was running. The job's
    own cleanup runs (SIGTERM cancels it); raises LockError if it outlives the wait.
    """
    pid_path = run_dir / PID_NAME
    pid = read_pid(pid_path)
    if pid is None or pid == os.getpid():
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        log.info("no running backup job (stale pid file)")
        return None
    except PermissionError as exc:
        raise LockError(f"cannot signal backup job {pid}: {exc.strerror}") from exc
    log.info("sent SIGTERM to backup job %d, waiting up to %g s", pid, wait_s)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if read_pid(pid_path) != pid or not _alive(pid):
            return pid
        time.sleep(0.1)
    raise LockError(f"backup job {pid} did not stop within {wait_s:g} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
