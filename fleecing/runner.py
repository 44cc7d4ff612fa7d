"""Running external tools (qemu-img, lvcreate, zfs) with a time limit, behind one small interface.

Storage code takes a :class:`Runner`, so tests can record the commands of storages this
machine cannot have (device-mapper thin pools, ZFS) and answer them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fleecing.errors import CommandFailed
from qmpbackup.host_command import DEFAULT_TIMEOUT_S, HostCommandError, run_host_command


class Runner(Protocol):
    """Runs ``argv`` and returns its stdout; a non-zero exit raises :class:`CommandFailed`."""

    async def __call__(self, argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S) -> str: ...


async def run_command(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """The real runner: :func:`qmpbackup.host_command.run_host_command`, failing as fleecing's error."""
    try:
        return await run_host_command(argv, timeout=timeout)
    except HostCommandError as exc:
        raise CommandFailed(exc.argv, exc.returncode, exc.stderr) from exc
