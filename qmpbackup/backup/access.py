"""How a run reaches the VM's disks: its own QMP socket, or a paused QEMU we spawn for them.

Stop mode shuts a running VM down first (through the agent, else ACPI) and starts it again
with its guest definition's ``start`` command afterwards, also when the backup failed: a VM
must not stay down because its backup did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.backup.request import BackupError, GuestRequest
from qmpbackup.backup.tasklog import TaskLog
from qmpbackup.errors import QmpBackupError, UsageError
from qmpbackup.guest_agent.client import GuestAgentClient
from qmpbackup.guest_config import GuestDefinition
from qmpbackup.qemu.session import QmpSession
from qmpbackup.qemu.spawn import SpawnedQemu


@dataclass(slots=True)
class QemuAccess:
    """How this run reaches the VM's disks."""

    session: QmpSession
    running: bool  # the VM itself (not a QEMU we spawned)
    stopped_by_us: bool = False  # stop mode shut the VM down (hooks backup-start/pre-stop ran)


@contextlib.asynccontextmanager
async def reach_qemu(req: GuestRequest, tasklog: TaskLog,
                    hook: Callable[[str], Awaitable[None]]) -> AsyncIterator[QemuAccess]:
    """A QMP session to the VM, or to a paused QEMU we spawned for its disks.

    Stop mode shuts a running VM down first and starts it again afterwards, also
    when the backup failed (a VM must not stay down because its backup did).
    """
    qmp = req.qmp or (req.definition.reach.qmp if req.definition else None)
    running = qmp is not None and qmp.exists()
    if running and req.options.mode != "stop":
        assert qmp is not None
        async with QmpSession(str(req.vmid), qmp) as session:
            yield QemuAccess(session, True)
        return
    definition = req.definition
    if definition is None:
        raise UsageError(f"VM {req.vmid}: QMP socket {qmp} does not exist and the VM has no guest definition")
    if running:
        assert qmp is not None
        if not definition.reach.start:
            raise UsageError(f"VM {req.vmid}: stop mode needs a 'start' command in the [qmpbackup] section "
                             "of its guest definition, to start the VM again")
        tasklog.info("status = running")
        await hook("backup-start")
        await hook("pre-stop")
        await _shut_down(req, definition, qmp, tasklog)
    else:
        tasklog.info("status = stopped")
    stopped_at = time.monotonic()
    failed = True
    try:
        tasklog.info("starting kvm to execute backup task")
        async with SpawnedQemu(definition, state_dir=req.state_dir) as spawned:
            async with QmpSession(str(req.vmid), spawned.qmp_path) as session:
                yield QemuAccess(session, False, stopped_by_us=running)
            tasklog.info("stopping kvm after backup task")
        failed = False
    finally:
        if running and not await _start_again(definition, tasklog, hook, stopped_at) and not failed:
            raise BackupError(f"VM {req.vmid} was backed up but could not be started again")


async def _shut_down(req: GuestRequest, definition: GuestDefinition, qmp: Path, tasklog: TaskLog) -> None:
    """A clean shutdown through the agent (else ACPI), waiting up to ``stopwait`` minutes for QEMU to exit."""
    limit = req.options.stopwait_min * 60
    tasklog.info("stopping virtual guest")
    async with QmpSession(str(req.vmid), qmp) as session:
        qga = req.qga or definition.reach.qga
        asked = False
        if definition.agent.enabled and qga is not None:
            try:
                async with GuestAgentClient(str(qga), name=f"VM {req.vmid}") as agent:
                    await agent.shutdown()
                asked = True
            except QmpBackupError as exc:
                tasklog.warn(f"guest agent shutdown failed ({exc}), trying ACPI")
        if not asked:
            await session.execute("system_powerdown")
        try:
            async with asyncio.timeout(limit):
                while True:
                    try:
                        status = (await session.execute("query-status"))["status"]
                    except QmpBackupError:
                        break  # QEMU has gone away
                    if status == "shutdown":  # started with -no-shutdown: ask it to leave
                        with contextlib.suppress(QmpBackupError):
                            await session.execute("quit")
                        break
                    await asyncio.sleep(0.5)
        except TimeoutError:
            raise BackupError(f"VM {req.vmid} did not shut down within {req.options.stopwait_min} minutes") from None
    # QEMU releases its image locks when it exits; its QMP socket goes with it.
    async with asyncio.timeout(30):
        while qmp.exists() and _accepts(qmp):
            await asyncio.sleep(0.1)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


async def _start_again(definition: GuestDefinition, tasklog: TaskLog, hook: Callable[[str], Awaitable[None]],
                       stopped_at: float) -> bool:
    """Run the definition's start command; a failure is logged as an error and returns False."""
    assert definition.reach.start
    try:
        await hook("pre-restart")
        tasklog.info("restarting VM")
        proc = await asyncio.create_subprocess_exec(
            *definition.reach.start, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        async with asyncio.timeout(120):
            out, _ = await proc.communicate()
        tasklog.lines(logging.INFO, out.decode(errors="replace"))
        if proc.returncode != 0:
            raise BackupError(f"start command of VM {definition.vmid} failed with exit status {proc.returncode}")
        tasklog.info(f"guest is online again after {int(time.monotonic() - stopped_at)} seconds")
        await hook("post-restart")
    except (QmpBackupError, OSError, TimeoutError) as exc:
        tasklog.error(f"unable to start VM {definition.vmid} again: {exc}")
        return False
    return True
