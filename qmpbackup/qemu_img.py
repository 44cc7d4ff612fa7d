"""Running the ``qemu-img`` tool: one place that bounds its time and words its failures.

Restore, ``vma create`` of non-raw images and ``vma extract -r`` into qcow2 targets
all need it; each caller keeps its own error type and message prefix.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from typing import Final

from qmpbackup.errors import QmpBackupError

log = logging.getLogger(__name__)

CONVERT_MIN_TIMEOUT_S: Final = 600.0
CONVERT_MIN_RATE: Final = 20 * 1024 * 1024
"""Bytes/s of virtual size a conversion may not fall below (its time limit scales with the size)."""


def convert_timeout(size: int) -> float:
    """How long ``qemu-img convert`` of ``size`` bytes may take."""
    return max(CONVERT_MIN_TIMEOUT_S, size / CONVERT_MIN_RATE)


def run_qemu_img(args: Sequence[str], *, timeout: float, what: str,
                 error: Callable[[str], QmpBackupError]) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img ARGS``; a failure to start or a time-out raises ``error(f"{what}: {reason}")``.

    The exit status is the caller's to judge (see :func:`failure_detail`).
    """
    cmd = ["qemu-img", *args]
    log.debug("running %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"{what}: {exc}") from exc


def failure_detail(proc: subprocess.CompletedProcess[str], *, last_line: bool = True) -> str:
    """What to say about a failed run: its last (or whole) stderr, else the exit status."""
    text = proc.stderr.strip()
    if not text:
        return f"exit status {proc.returncode}"
    return text.splitlines()[-1] if last_line else text
