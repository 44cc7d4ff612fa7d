"""A VM's own start command (``start:`` of its guest definition), and whether its QEMU answers.

Stop mode starts the VM again with it after the shutdown; recovery does the same when a
stop-mode run died before it could (journal kind ``stopped-vm``), once the QEMU that run
spawned on the VM's disks is gone; a restore with ``--start`` runs it too. A VM runs when a
QEMU listens on its QMP socket: the socket file a killed QEMU left behind refuses.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from qmpbackup.errors import QmpBackupError
from qmpbackup.host_command import HostCommandError, run_host_command
from qmpbackup.recovery.spawned import kill_orphans, read_records, same_process

#: How long the start command may take (it usually returns once QEMU forked).
START_TIMEOUT_S = 120.0
#: How long QEMU may take after the start command to accept connections on its QMP socket.
ANSWER_TIMEOUT_S = 60.0
#: How long one look at the QMP socket may wait for the connection.
CONNECT_TIMEOUT_S = 1.0


class StartFailed(QmpBackupError):
    """The VM could not be started again; the message says why in one line."""


class QmpSocketUnclear(QmpBackupError):
    """Whether a QEMU listens on a QMP socket cannot be told (e.g. no permission, a path too long)."""


def qmp_accepts(path: Path) -> bool:
    """Whether a QEMU listens on ``path`` now (then the VM runs): one that is busy with another client
    (its backlog full: EAGAIN, or no answer within the second) counts, a missing or refusing socket file
    does not; anything else raises :class:`QmpSocketUnclear` rather than guess either way."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(str(path))
        except (BlockingIOError, TimeoutError):
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOTDIR):
                return False
            raise QmpSocketUnclear(f"cannot tell whether a QEMU listens on the QMP socket {path}: "
                                   f"{exc.strerror or exc}") from exc
    return True


async def wait_answering(path: Path, timeout: float = ANSWER_TIMEOUT_S) -> bool:
    """Wait up to ``timeout`` s until :func:`qmp_accepts`; whether it did."""
    deadline = time.monotonic() + timeout
    while not qmp_accepts(path):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def run_start_command(vmid: int, argv: Sequence[str], timeout: float = START_TIMEOUT_S) -> str:
    """Run ``argv`` in a session of its own (a terminal's Ctrl-C is ours), stdin closed; its output
    (stdout and stderr together), or :class:`StartFailed`."""
    try:
        return await run_host_command(argv, timeout=timeout, merge_stderr=True, own_session=True)
    except HostCommandError as exc:
        if isinstance(exc.__cause__, OSError):
            raise StartFailed(f"cannot run the start command of VM {vmid} ({argv[0]}): {exc.stderr}") from exc
        if exc.returncode is None:
            raise StartFailed(f"the start command of VM {vmid} did not end within {timeout:g} s") from None
        lines = exc.stderr.strip().splitlines()
        raise StartFailed(f"the start command of VM {vmid} failed with exit status {exc.returncode}"
                          + (f": {lines[-1]}" if lines else "")) from None


async def start_left_stopped(vmid: int, qmp: Path, argv: Sequence[str], state_dir: Path) -> bool:
    """The undo step of ``stopped-vm``: start a VM that a stop-mode run shut down and could not start
    again. Nothing is done while it runs (False). Otherwise the QEMU that run spawned on its disks is
    killed first (it may still hold them), then the start command runs and the VM must answer on
    ``qmp``; :class:`StartFailed` says why not."""
    if qmp_accepts(qmp):
        return False
    await asyncio.to_thread(kill_orphans, state_dir, vmid=vmid)
    for rec in read_records(state_dir):
        if rec.vmid == vmid and same_process(rec.pid, rec.create_time):
            raise StartFailed(f"VM {vmid} is not started: QEMU pid {rec.pid}, spawned by the backup run pid "
                              f"{rec.owner_pid} on its disks, still runs")
    await run_start_command(vmid, argv)
    if not await wait_answering(qmp):
        raise StartFailed(f"the start command of VM {vmid} ran, but its QMP socket {qmp} accepts no connection "
                          f"after {ANSWER_TIMEOUT_S:g} s")
    return True
