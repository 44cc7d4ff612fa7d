"""Running a host tool (qemu-img, losetup, mount, lvcreate, zfs): the one way every caller does it.

No shell, stdin closed, a time limit (the tool is killed and reaped when it outlives it), stdout
returned as text (with stderr merged into it, ``merge_stderr``: a VM's start command, whose
output is logged as it came). Every way of failing (the tool cannot start, times out or exits non-zero)
is one :class:`HostCommandError`, whose text is one line; callers that speak of a failure in
their own terms (fleecing's ``CommandFailed``, stop mode's ``NoInstantCopy``, ``mount``'s
``MountError``) wrap it. The sync form serves the one caller outside the event loop, stop
mode's instant copies, which run while the VM is down and nothing else may happen.
``own_session`` runs the tool in a session of its own, so a terminal's Ctrl-C reaches only us (a VM's
start command, whose QEMU must outlive it).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Sequence

from qmpbackup.errors import QmpBackupError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
CANNOT_START = 127  # the shell's status for a command that could not be run


class HostCommandError(QmpBackupError):
    """A host tool failed: ``argv``, ``returncode`` (None when it timed out) and its ``stderr``."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, *,
                 timeout: float | None = None) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        if returncode is None:
            message = f"{argv[0]} timed out after {timeout:g} s" if timeout is not None else f"{argv[0]} timed out"
        elif returncode == CANNOT_START:
            message = f"cannot run {argv[0]}: {stderr.strip() or f'exit status {returncode}'}"
        else:
            lines = stderr.strip().splitlines()
            message = f"{argv[0]} failed: {lines[-1] if lines else f'exit status {returncode}'}"
        super().__init__(message)


def _cannot_start(argv: Sequence[str], exc: OSError) -> HostCommandError:
    return HostCommandError(argv, CANNOT_START, exc.strerror or str(exc))


async def run_host_command(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S,
                           merge_stderr: bool = False, own_session: bool = False) -> str:
    """Run ``argv`` and return its stdout; a failure raises :class:`HostCommandError` (whose ``stderr``
    is the merged output with ``merge_stderr``)."""
    log.debug("running %s", " ".join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
            start_new_session=own_session)
    except OSError as exc:
        raise _cannot_start(argv, exc) from exc
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except BaseException as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            raise HostCommandError(argv, None, "", timeout=timeout) from None
        raise
    if proc.returncode != 0:
        raise HostCommandError(argv, proc.returncode, (out if merge_stderr else err).decode(errors="replace"))
    return out.decode(errors="replace")


def run_host_command_sync(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """:func:`run_host_command` for code that does not run on the event loop."""
    log.debug("running %s", " ".join(argv))
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise HostCommandError(argv, None, "", timeout=timeout) from None
    except OSError as exc:
        raise _cannot_start(argv, exc) from exc
    if done.returncode != 0:
        raise HostCommandError(argv, done.returncode, done.stderr)
    return done.stdout
