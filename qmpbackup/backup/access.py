"""How a run reaches the VM's disks: its own QMP socket, or a paused QEMU we spawn for them.

Stop mode shuts a running VM down first (through the agent, else ACPI), takes an instant
copy of its disks (:mod:`qmpbackup.instant_copy`, journaled) and starts it again at once with
its guest definition's ``start`` command, while the backup reads the copy. Where no instant
copy is possible it starts the VM again after the backup, also when the backup failed: a
VM must not stay down because its backup did. The shutdown is journaled first (kind
``stopped-vm``, resolved once the VM answers again): a run killed before the restart leaves the
VM to the next run or ``qmpbackup cleanup``, which start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.backup.kill_points import hold
from qmpbackup.backup.request import BackupError, GuestRequest
from qmpbackup.backup.tasklog import TaskLog
from qmpbackup.errors import UsageError
from qmpbackup.guest_config import GuestDefinition
from qmpbackup.instant_copy import NoInstantCopy, instant_copies
from qmpbackup.qemu.session import QmpSession
from qmpbackup.qemu.shutdown import clean_shutdown
from qmpbackup.qemu.spawn import SpawnedQemu
from qmpbackup.qemu.start_command import (
    ANSWER_TIMEOUT_S,
    QmpSocketUnclear,
    StartFailed,
    qmp_accepts,
    run_start_command,
    wait_answering,
)
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Entry, Journal


@dataclass(slots=True)
class QemuAccess:
    """How this run reaches the VM's disks."""

    session: QmpSession
    running: bool  # the VM itself (not a QEMU we spawned)
    stopped_by_us: bool = False  # stop mode shut the VM down (hooks backup-start/pre-stop ran)


@contextlib.asynccontextmanager
async def reach_qemu(req: GuestRequest, tasklog: TaskLog, hook: Callable[[str], Awaitable[None]],
                     journal: Journal) -> AsyncIterator[QemuAccess]:
    """A QMP session to the VM, or to a paused QEMU we spawned for its disks.

    Stop mode shuts a running VM down first and starts it again afterwards, also
    when the backup failed (a VM must not stay down because its backup did). Its
    instant copies are recorded in ``journal`` and dropped (and resolved) on the way out,
    after the spawned QEMU that reads them has ended.
    """
    qmp = _qmp_socket(req)
    running = vm_is_running(req)
    if running and req.options.mode != "stop":
        assert qmp is not None
        async with QmpSession(str(req.vmid), qmp) as session:
            yield QemuAccess(session, True)
        return
    definition = req.definition
    if definition is None:
        raise UsageError(f"VM {req.vmid}: QMP socket {qmp} does not exist and the VM has no guest definition")
    down: Entry | None = None
    if running:
        assert qmp is not None
        if not definition.reach.start:
            raise UsageError(f"VM {req.vmid}: stop mode needs a 'start' command in the [qmpbackup] section "
                             "of its guest definition, to start the VM again")
        tasklog.info("status = running")
        await hook("backup-start")
        await hook("pre-stop")
        down = journal.record(kinds.STOPPED_VM, vmid=req.vmid, qmp=str(qmp), start=list(definition.reach.start))
    else:
        tasklog.info("status = stopped")
    stopped_at = time.monotonic()
    failed = True
    restarted = False
    try:
        if down is not None:
            assert qmp is not None
            await _shut_down(req, definition, qmp, tasklog)
            stopped_at = time.monotonic()
        with contextlib.ExitStack() as copies:
            on_disks = definition
            if down is not None:
                on_disks = _instant_copy(definition, copies, tasklog, journal)
                if on_disks is not definition:
                    restarted = await _start_again(definition, down, journal, tasklog, stopped_at)
                    if not restarted:
                        raise BackupError(f"VM {req.vmid} could not be started again")
                    await hold("copied")
            tasklog.info("starting kvm to execute backup task")
            async with SpawnedQemu(on_disks, state_dir=req.state_dir) as spawned:
                async with QmpSession(str(req.vmid), spawned.qmp_path) as session:
                    if down is not None and not restarted:
                        await hold("stopped")
                    yield QemuAccess(session, False, stopped_by_us=running)
                tasklog.info("stopping kvm after backup task")
        failed = False
    finally:
        if down is not None and not restarted and not await _start_again(definition, down, journal, tasklog,
                                                                          stopped_at) and not failed:
            raise BackupError(f"VM {req.vmid} was backed up but could not be started again")


def _instant_copy(definition: GuestDefinition, copies: contextlib.ExitStack, tasklog: TaskLog,
                  journal: Journal) -> GuestDefinition:
    """The definition on instant copies of the disks to back up (dropped when ``copies`` closes), so
    the VM can run again at once; the definition itself, with one line why, where none is possible."""
    disks = [d for d in definition.disks if d.backup]
    try:
        taken = copies.enter_context(
            instant_copies([Path(d.volume or "") for d in disks], f"{os.getpid()}-{uuid.uuid4().hex[:8]}",
                           journal=journal))
    except NoInstantCopy as exc:
        tasklog.info(f"no instant copy of the disks ({exc}): the guest stays down until the backup is done")
        return definition
    methods = sorted({c.method for c in taken})
    tasklog.info(f"took an instant copy of {len(taken)} disk(s) ({', '.join(methods)}); backing up the copy")
    by_source = {d.key: str(c.path) for d, c in zip(disks, taken, strict=True)}
    drives = tuple(dataclasses.replace(d, volume=by_source[d.key]) if d.key in by_source else d
                   for d in definition.drives)
    return dataclasses.replace(definition, drives=drives)


def _qmp_socket(req: GuestRequest) -> Path | None:
    return req.qmp or (req.definition.reach.qmp if req.definition else None)


def vm_is_running(req: GuestRequest) -> bool:
    """Whether the VM runs now (its QMP socket exists): a VM that does not is backed up in stop mode."""
    qmp = _qmp_socket(req)
    return qmp is not None and qmp.exists()


async def _shut_down(req: GuestRequest, definition: GuestDefinition, qmp: Path, tasklog: TaskLog) -> None:
    """A clean shutdown through the agent (else ACPI), waiting up to ``stopwait`` minutes for QEMU to exit."""
    limit = req.options.stopwait_min * 60
    tasklog.info("stopping virtual guest")
    qga = req.qga or definition.reach.qga
    if not await clean_shutdown(req.vmid, qmp, qga if definition.agent.enabled else None, limit, tasklog.warn):
        raise BackupError(f"VM {req.vmid} did not shut down within {req.options.stopwait_min} minutes")
    # QEMU releases its image locks when it exits; its QMP socket goes with it.
    async with asyncio.timeout(30):
        while qmp.exists() and qmp_accepts(qmp):
            await asyncio.sleep(0.1)


async def _start_again(definition: GuestDefinition, down: Entry, journal: Journal, tasklog: TaskLog,
                       stopped_at: float) -> bool:
    """Run the definition's start command, unless the VM still runs (its shutdown failed); a failure
    is logged as an error and returns False. ``down`` is resolved once the VM answers on its QMP
    socket; one that does not answer yet keeps it, for ``qmpbackup cleanup`` to look again.

    The hooks' restart phases run later, in vzdump's order (see ``GuestRun``)."""
    assert definition.reach.start
    qmp = Path(down.data["qmp"])
    try:
        if qmp_accepts(qmp):
            journal.resolve(down)
            return True
        tasklog.info("restarting VM")
        out = await run_start_command(definition.vmid, definition.reach.start)
    except (StartFailed, QmpSocketUnclear) as exc:
        tasklog.error(f"unable to start VM {definition.vmid} again: {exc}")
        return False
    tasklog.lines(logging.INFO, out)
    tasklog.info(f"guest is online again after {int(time.monotonic() - stopped_at)} seconds")
    if await wait_answering(qmp):
        journal.resolve(down)
    else:
        tasklog.warn(f"VM {definition.vmid} accepts no connection on its QMP socket {qmp} "
                     f"{ANSWER_TIMEOUT_S:g} s after its start command; 'qmpbackup cleanup' starts it if it is down")
    return True
