"""vzdump's progress line and closing lines, from byte counters.

``  3% (1.0 GiB of 32.0 GiB) in 3s, read: 341.3 MiB/s, write: 290.1 MiB/s``:
the share is of the disks' bytes accounted for — read from the VM, or (incremental
runs) left unchanged since the previous archive and taken from it; read counts every
byte that left the VM, write the bytes of those that were not zero (never below 0).
A line is due when the whole percentage changed and a few seconds passed; the
run ends with one 100 % line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmpbackup.render import render_bytes, render_duration, render_rate


@dataclass(slots=True)
class Progress:
    total_bytes: int
    started: float
    interval_s: float = 3.0
    _last_pct: int = field(default=-1)
    _last_time: float = field(default=0.0)
    _last_read: int = field(default=0)
    _last_zero: int = field(default=0)

    def line(self, now: float, read: int, zero: int, force: bool = False, done: int | None = None) -> str | None:
        """The next progress line, or None when it is not due yet (``force``: due whatever the
        time, as long as the percentage moved). ``done``: bytes accounted for (default ``read``)."""
        done = min(read if done is None else done, self.total_bytes)
        pct = int(done * 100 / self.total_bytes) if self.total_bytes else 100
        if pct == self._last_pct or (not force and now - self._last_time < self.interval_s):
            return None
        span = now - (self._last_time or self.started)
        zero = min(zero, read)  # zero clusters filled in at the end were never read
        delta_read = max(0, read - self._last_read)
        delta_write = max(0, delta_read - max(0, zero - self._last_zero))
        text = (
            f"{pct:3d}% ({render_bytes(done)} of {render_bytes(self.total_bytes)}) "
            f"in {render_duration(now - self.started)}, "
            f"read: {render_rate(delta_read, span)}, write: {render_rate(delta_write, span)}"
        )
        self._last_pct, self._last_time = pct, now
        self._last_read, self._last_zero = max(read, self._last_read), max(zero, self._last_zero)
        return text

    def final(self, now: float, read: int, zero: int) -> str | None:
        """The closing 100 % line (every byte is accounted for), or None if it was printed already."""
        return self.line(now, read, zero, force=True, done=self.total_bytes)


def closing_lines(total: int, zero: int, seconds: float) -> list[str]:
    """``backup is sparse: …`` and ``transferred … in N seconds (rate)``."""
    lines = []
    if total and zero:
        lines.append(f"backup is sparse: {render_bytes(zero, 2)} ({zero * 100 // total}%) total zero data")
    lines.append(f"transferred {render_bytes(total, 2)} in {int(seconds)} seconds ({render_rate(total, seconds)})")
    return lines
