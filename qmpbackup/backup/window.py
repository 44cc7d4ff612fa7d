"""The consistency window: the moment the point in time is taken, guest frozen or paused.

::

    async with consistency_window(...) as window:   # suspend: stop; snapshot: fs-freeze
        ...                                         # the snapshot point, the block jobs' transaction
    # thawed and resumed here, whatever happened inside; window.frozen_for_s for the result

Snapshot mode freezes the guest's filesystems through the agent when the guest definition
allows it and the guest runs (a guest paused by its user is not frozen); suspend mode pauses
a running VM. Both are journaled before they happen and watched by a guard process that
undoes them if this process dies (:mod:`qmpbackup.backup.guard`). The thaw follows every
freeze attempt (:func:`qmpbackup.guest_agent.freeze.frozen_window`); a VM we paused is resumed
on every way out.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.backup.guard import guarded
from qmpbackup.backup.kill_points import hold
from qmpbackup.backup.tasklog import TaskLog
from qmpbackup.guest_agent.client import GuestAgentClient
from qmpbackup.guest_agent.freeze import frozen_window
from qmpbackup.guest_config import GuestDefinition
from qmpbackup.qemu.session import QmpSession
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Journal
from qmpbackup.recovery.steps import undo_steps


@dataclass(slots=True)
class Window:
    """What the window did, once it is closed."""

    frozen_for_s: float | None = None


def _freeze_agent(definition: GuestDefinition, qga: Path | None, mode: str, status: str,
                  tasklog: TaskLog) -> Path | None:
    """The agent socket to freeze through, or None when this run does not freeze."""
    if mode != "snapshot" or status != "running":
        return None
    if not (definition.agent.enabled and definition.agent.freeze_fs and qga):
        if definition.agent.enabled and not definition.agent.freeze_fs:
            tasklog.info("skipping guest filesystem freeze - disabled in VM options")
        return None
    return qga


@contextlib.asynccontextmanager
async def consistency_window(session: QmpSession, journal: Journal, tasklog: TaskLog, *, vmid: int,
                             definition: GuestDefinition, qga: Path | None, mode: str,
                             status: str, task_id: str = "") -> AsyncIterator[Window]:
    """Pause (suspend mode) or freeze (snapshot mode) → the block → thaw, resume.

    ``status`` is the VM's run state before the backup (``running``, ``paused`` …); ``task_id``
    names the backup task in vzdump's ``started backup task '…'`` line. The
    freeze and the pause are journaled before they happen and watched by a guard process
    (:func:`qmpbackup.backup.guard.guarded`) while they last.
    """
    window = Window()
    label = f"VM {vmid}"
    async with _paused(session, journal, tasklog, label=label, pause=mode == "suspend" and status == "running"):
        socket = _freeze_agent(definition, qga, mode, status, tasklog)
        if socket is None:
            tasklog.info("starting backup via QMP command")
            yield window
        else:
            async with guarded(journal, kinds.FREEZE, {"qga": str(socket), "vm": label},
                               undo_steps(None)[kinds.FREEZE.name], label=label, warn=tasklog.warn, qga=str(socket)):
                await hold("recorded")
                agent = GuestAgentClient(str(socket), name=label)
                try:
                    async with frozen_window(agent) as outcome:
                        if outcome.thawed_first:
                            tasklog.warn("guest filesystems were still frozen (a run that died?) "
                                         "- thawed them before freezing")
                        if outcome.frozen:
                            tasklog.info("issuing guest-agent 'fs-freeze' command")
                            await hold("frozen")
                        elif outcome.skipped:
                            tasklog.warn(f"skipping guest filesystem freeze - {outcome.skipped}")
                        elif outcome.error:
                            tasklog.error(f"guest filesystem freeze failed - {outcome.error}")
                        tasklog.info("starting backup via QMP command")
                        yield window
                        if outcome.frozen:
                            tasklog.info("issuing guest-agent 'fs-thaw' command")
                finally:
                    await agent.close()
            window.frozen_for_s = outcome.frozen_for_s
            if outcome.frozen_for_s is not None:
                tasklog.info(f"guest filesystems were frozen for {outcome.frozen_for_s:.3f} s")
        tasklog.info(f"started backup task '{task_id}'" if task_id else "started backup task")
        if mode == "snapshot" and status == "running":
            tasklog.info("resuming VM again")  # vzdump's line here: the guest runs on during the backup


@contextlib.asynccontextmanager
async def _paused(session: QmpSession, journal: Journal, tasklog: TaskLog, *, label: str,
                  pause: bool) -> AsyncIterator[None]:
    """``stop`` before the block and ``cont`` after it; journaled and guarded, so a run that dies
    meanwhile does not leave the VM paused (on an error the guard's undo step resumes it here)."""
    if not pause:
        yield
        return
    tasklog.info("suspending guest")
    async with guarded(journal, kinds.PAUSE, {"qmp": session.socket_path}, undo_steps(session)[kinds.PAUSE.name],
                       label=label, warn=tasklog.warn, qmp=session.socket_path):
        await hold("recorded")
        await session.execute("stop")
        await hold("paused")
        paused_at = time.monotonic()
        yield
        tasklog.info(f"resuming VM again after {int(time.monotonic() - paused_at)} seconds")
        await session.execute("cont")
