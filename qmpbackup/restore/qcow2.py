"""qcow2 targets: clusters are written to a sparse raw file first, then ``qemu-img convert`` makes the qcow2.

Why not write qcow2 directly: clusters arrive in any order, so the target
must be random access, and the only random-access writers of qcow2 are QEMU's
own (``qemu-nbd``/``qemu-io``), which cost a round trip per write. A local
sparse raw file takes only the space of the data, ``qemu-img`` skips its
holes, and the conversion runs at disk speed.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from qmpbackup.restore.errors import RestoreError

log = logging.getLogger(__name__)

CONVERT_MIN_TIMEOUT_S = 600.0
CONVERT_MIN_RATE = 20 * 1024 * 1024  # bytes/s of virtual size a conversion may not fall below


def convert_raw_to_qcow2(raw: Path, dest: Path, size: int, *, direct: bool = True) -> None:
    """Write ``dest`` (must not exist) as a qcow2 copy of the sparse raw file ``raw``."""
    timeout = max(CONVERT_MIN_TIMEOUT_S, size / CONVERT_MIN_RATE)
    cmd = ["qemu-img", "convert", "-q", "-W", "-f", "raw", "-O", "qcow2"]
    if direct:
        cmd += ["-t", "none"]
    cmd += [str(raw), str(dest)]
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RestoreError(f"qemu-img convert to {dest.name}: {exc}") from exc
    if proc.returncode != 0 and direct and "O_DIRECT" in proc.stderr:
        convert_raw_to_qcow2(raw, dest, size, direct=False)
        return
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        raise RestoreError(f"qemu-img convert to {dest.name} failed: {detail}")
