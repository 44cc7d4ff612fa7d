"""Running external tools (qemu-img, lvcreate, zfs) with a time limit, behind one small interface.

Storage code takes a :class:`Runner`, so tests can record the commands of storages this
machine cannot have (device-mapper thin pools, ZFS) and answer them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from fleecing.errors import CommandFailed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0


class Runner(Protocol):
    """Runs ``argv`` and returns its stdout; a non-zero exit raises :class:`CommandFailed`."""

    async def __call__(self, argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S) -> str: ...


async def run_command(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """The real runner: no shell, stdin closed, killed after ``timeout`` seconds."""
    log.debug("running %s", " ".join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]}: {exc.strerror}") from exc
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandFailed(argv, None, "") from None
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, err.decode(errors="replace"))
    return out.decode(errors="replace")
