"""vzdump's ``ionice`` option (0-8) applied to processes and threads through psutil.

vzdump's semantics: 0-7 is the best-effort class with that priority (0 highest),
8 is the idle class. Linux stores an I/O priority per thread (``ioprio_set`` with
``IOPRIO_WHO_PROCESS`` takes a thread id), so we can lower the priority of exactly
the thread that writes the archive instead of the whole agent, whose QMP and NBD
handling must stay responsive. The kernel only honours these priorities under the
BFQ scheduler; under mq-deadline or none they are recorded and ignored.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import psutil

from qmpbackup.errors import QmpBackupError, UsageError

log = logging.getLogger(__name__)

IONICE_MIN = 0
IONICE_MAX = 8
IONICE_IDLE = 8


class IoniceError(QmpBackupError):
    """The I/O priority could not be set (e.g. no permission)."""


@dataclass(frozen=True, slots=True)
class IoPriority:
    """A Linux I/O priority: psutil's class constant and the value (0-7, 0 for idle)."""

    ioclass: int
    value: int


def io_priority(level: int) -> IoPriority:
    """Map vzdump's ionice level to an I/O priority; raises UsageError outside 0-8."""
    if not IONICE_MIN <= level <= IONICE_MAX:
        raise UsageError(f"invalid ionice value {level}: expected {IONICE_MIN}-{IONICE_MAX} (8 = idle class)")
    if level == IONICE_IDLE:
        return IoPriority(int(psutil.IOPRIO_CLASS_IDLE), 0)
    return IoPriority(int(psutil.IOPRIO_CLASS_BE), level)


def get_priority(pid: int) -> IoPriority:
    """The I/O priority of a process or thread id (as psutil reports it)."""
    current = psutil.Process(pid).ionice()
    return IoPriority(int(current.ioclass), int(current.value))


def _set(pid: int, priority: IoPriority) -> bool:
    """Set it; False when the process is already gone (its exit status tells the rest)."""
    try:
        proc = psutil.Process(pid)
        if priority.ioclass == psutil.IOPRIO_CLASS_IDLE or priority.ioclass == psutil.IOPRIO_CLASS_NONE:
            proc.ionice(priority.ioclass)
        else:
            proc.ionice(priority.ioclass, priority.value)
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, OSError) as exc:
        raise IoniceError(f"cannot set I/O priority of process {pid}: {exc}") from exc
    log.debug("I/O priority of %d set to class %d value %d", pid, priority.ioclass, priority.value)
    return True


def apply_ionice(pid: int, level: int) -> bool:
    """Give process (or thread id) ``pid`` vzdump's ionice ``level``.

    Returns False when the process has already exited. Raises UsageError for a bad
    level, IoniceError when the kernel refuses.
    """
    return _set(pid, io_priority(level))


class ThreadIonice:
    """Lowers the I/O priority of each thread that calls :meth:`enter_current`, restores all on :meth:`restore`.

    Our writers are called from whichever thread the caller uses (often an
    ``asyncio.to_thread`` pool thread that is reused later), so the old priority of
    every touched thread is remembered and put back when the output is finished.
    """

    def __init__(self, level: int | None) -> None:
        self._priority = None if level is None else io_priority(level)
        self._saved: dict[int, IoPriority] = {}
        self._lock = threading.Lock()

    def enter_current(self) -> None:
        """Apply the level to the calling thread once (cheap after the first call)."""
        if self._priority is None:
            return
        tid = threading.get_native_id()
        if tid in self._saved:
            return
        with self._lock:
            if tid in self._saved:
                return
            self._saved[tid] = get_priority(tid)
            _set(tid, self._priority)

    def restore(self) -> None:
        """Put back the priorities saved by :meth:`enter_current`; safe to call twice."""
        with self._lock:
            saved, self._saved = self._saved, {}
        for tid, priority in saved.items():
            try:
                _set(tid, priority)
            except IoniceError as exc:
                log.warning("could not restore the I/O priority of thread %d: %s", tid, exc)
