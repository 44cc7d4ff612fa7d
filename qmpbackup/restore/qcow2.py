"""qcow2 targets: clusters are written to a sparse raw file first, then ``qemu-img convert`` makes the qcow2.

Why not write qcow2 directly: clusters arrive in any order, so the target
must be random access, and the only random-access writers of qcow2 are QEMU's
own (``qemu-nbd``/``qemu-io``), which cost a round trip per write. A local
sparse raw file takes only the space of the data, ``qemu-img`` skips its
holes, and the conversion runs at disk speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qmpbackup.qemu_img import convert_timeout, failure_detail, run_qemu_img
from qmpbackup.restore.errors import RestoreError

log = logging.getLogger(__name__)


def convert_raw_to_qcow2(raw: Path, dest: Path, size: int, *, direct: bool = True) -> None:
    """Write ``dest`` (must not exist) as a qcow2 copy of the sparse raw file ``raw``."""
    args = ["convert", "-q", "-W", "-f", "raw", "-O", "qcow2"]
    if direct:
        args += ["-t", "none"]
    args += [str(raw), str(dest)]
    proc = run_qemu_img(args, timeout=convert_timeout(size), what=f"qemu-img convert to {dest.name}",
                        error=RestoreError)
    if proc.returncode != 0 and direct and "O_DIRECT" in proc.stderr:
        convert_raw_to_qcow2(raw, dest, size, direct=False)
        return
    if proc.returncode != 0:
        raise RestoreError(f"qemu-img convert to {dest.name} failed: {failure_detail(proc)}")


def create_qcow2(dest: Path, size: int, *, backing: str | None = None) -> None:
    """An empty qcow2 ``dest`` of ``size`` bytes, over the raw ``backing`` when given (not opened:
    a live restore's backing is an export that may not serve yet)."""
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-u", "-F", "raw", "-b", backing]
    proc = run_qemu_img([*args, str(dest), str(size)], timeout=60, what=f"creating {dest}", error=RestoreError)
    if proc.returncode != 0:
        raise RestoreError(f"creating {dest}: {failure_detail(proc)}")
