"""Which QEMU process a journal entry belongs to: its pid, its start time and its QMP socket.

A VM's QEMU can quit, be killed or be restarted between two runs. Entries of a QEMU that
is gone describe nothing that still exists inside QEMU (its nodes, jobs and exports went
with it), while a QEMU that still runs but does not answer may still hold our filters and
fleecing images: the pid and start time tell the two apart (a recycled pid has another
start time), the socket tells cleanup where to find it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qmpbackup.recovery.spawned import (
    CREATE_TIME_SLACK_S,
    process_create_time,
    same_process,
)


@dataclass(frozen=True, slots=True)
class QemuInstance:
    pid: int
    start: float  # the process's create time (psutil's, seconds since the epoch)
    qmp: str  # the QMP socket the run used

    @classmethod
    def of(cls, pid: int, qmp: str) -> QemuInstance | None:
        """The running process ``pid`` (None if there is none)."""
        start = process_create_time(pid)
        return None if start is None else cls(pid, start, qmp)

    def alive(self) -> bool:
        """The same process still runs (not a new one under a recycled pid)."""
        return same_process(self.pid, self.start)

    def same(self, other: QemuInstance | None) -> bool:
        """The same process (the socket it was reached by may differ)."""
        return other is not None and other.pid == self.pid and abs(other.start - self.start) <= CREATE_TIME_SLACK_S

    def as_record(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start, "qmp": self.qmp}

    @classmethod
    def from_record(cls, data: Any) -> QemuInstance | None:
        """The instance in a journal line, or None if the field is malformed."""
        if not isinstance(data, Mapping):
            return None
        pid, start, qmp = data.get("pid"), data.get("start"), data.get("qmp")
        if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(start, (int, float)) \
                or not isinstance(qmp, str):
            return None
        return cls(pid, float(start), qmp)

    def __str__(self) -> str:
        return f"QEMU pid {self.pid} ({self.qmp})"
