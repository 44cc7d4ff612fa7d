"""A VM's own start command (``start:`` of its guest definition), and whether its QEMU answers.

Stop mode starts the VM again with it after the shutdown; recovery does the same when a
stop-mode run died before it could (journal kind ``stopped-vm``), once the QEMU that run
spawned on the VM's disks is gone. A VM runs when its QMP socket accepts a connection: the
socket file a killed QEMU left behind refuses.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from qmpbackup.errors import QmpBackupError
from qmpbackup.recovery.spawned import kill_orphans, read_records, same_process

#: How long the start command may take (it usually returns once QEMU forked).
START_TIMEOUT_S = 120.0
#: How long QEMU may take after the start command to accept connections on its QMP socket.
ANSWER_TIMEOUT_S = 60.0


class StartFailed(QmpBackupError):
    """The VM could not be started again; the message says why in one line."""


def qmp_accepts(path: Path) -> bool:
    """Whether a QEMU accepts connections on ``path`` now (then the VM runs)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(path))
        except OSError:
            return False
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
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise StartFailed(f"cannot run the start command of VM {vmid} ({argv[0]}): {exc.strerror or exc}") from exc
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise StartFailed(f"the start command of VM {vmid} did not end within {timeout:g} s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        lines = text.strip().splitlines()
        raise StartFailed(f"the start command of VM {vmid} failed with exit status {proc.returncode}"
                          + (f": {lines[-1]}" if lines else ""))
    return text


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
