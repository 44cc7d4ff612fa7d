"""Mapped targets in a format other than raw (``format=qcow2`` …): filled by ``qemu-img convert -n``.

Clusters arrive in any order and only QEMU writes qcow2, so such a device is
first restored into a sparse raw file in the extract folder, then copied into
the existing image with ``qemu-img convert -n`` (no create: the image, its
size and options stay the caller's). Write-zeroes flag 0 becomes
``--target-is-zero`` (zero regions are skipped); throttling becomes
``qemu-img``'s own rate limit ``-r``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from qmpbackup.qemu_img import CONVERT_MIN_TIMEOUT_S, convert_timeout, failure_detail, run_qemu_img
from qmpbackup.vma.errors import VmaError

log = logging.getLogger(__name__)

FORMAT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class ConvertError(VmaError):
    """``qemu-img convert`` into a mapped target failed."""


def convert_into(raw: Path, dest: Path, image_format: str, size: int, *, target_is_zero: bool, rate_bps: int) -> None:
    """Copy the sparse raw file ``raw`` (``size`` bytes) into the existing image ``dest``.

    The time limit scales with the size, and with the rate limit when one is set.

    :raise ConvertError: ``qemu-img`` failed, could not run, or ran out of time.
    """
    timeout = convert_timeout(size)
    if rate_bps > 0:
        timeout = max(timeout, 2 * size / rate_bps + CONVERT_MIN_TIMEOUT_S)
    args = ["convert", "-q", "-n", "-W", "-f", "raw", "-O", image_format]
    if target_is_zero:
        args.append("--target-is-zero")
    if rate_bps > 0:
        args += ["-r", str(rate_bps)]
    args += [str(raw), str(dest)]
    proc = run_qemu_img(args, timeout=timeout, what=f"qemu-img convert into {dest}", error=ConvertError)
    if proc.returncode != 0:
        raise ConvertError(f"qemu-img convert into {dest} failed: {failure_detail(proc)}")
