"""Keep freed multi-MiB buffers in the process instead of giving them back to the kernel (glibc).

An archive read at random allocates a buffer of up to a few MiB per NBD read (a run of a
``.vma``'s clusters, a decompressed zstd frame) and frees it once the reply is sent. glibc serves
such sizes with ``mmap``, or trims them off the top of its heap when they are freed, so every
read faulted its buffer in again, page by page: 4 GiB of a ``.vma`` through ``export`` took
3.0 s of CPU instead of 2.3 s. Raising both thresholds lets malloc reuse the freed memory; the
cost is that a few tens of MiB stay mapped while the process lives.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Final

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 32 << 20  # glibc's largest allowed value on 64-bit hosts
TRIM_THRESHOLD: Final = 128 << 20

@functools.cache
def keep_large_buffers() -> None:
    """Raise glibc's mmap and trim thresholds once per process; a no-op with another C library."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this process's C library: buffers are returned to the kernel")
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        log.debug("mallopt refused the thresholds: buffers are returned to the kernel")
