"""Undoing a VM's journal, for the backup (at its start and end) and for ``qmpbackup cleanup`` alike.

Each entry names the QEMU process it belongs to (:class:`QemuInstance`). What decides its fate:

- its QEMU is the one we talk to (or another one we could reach): the kind's undo step runs;
- its QEMU is gone (quit, killed, the VM restarted): what lived inside QEMU went with it, so
  those entries are dropped (one INFO line per QEMU); files and volumes are removed;
- its QEMU still runs but cannot be reached: nothing of it is touched, no file QEMU may hold
  open is deleted, and the entries stay (one failure line per QEMU). An unreachable QEMU is
  never taken for a gone one.

Entries the reader did not understand stay and are named. A step that fails or times out
is logged and stays pending; the other steps still run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from qmpbackup.qemu.errors import QmpConnectError, QmpSocketBusyError
from qmpbackup.qemu.session import QmpSession
from qmpbackup.recovery.instance import QemuInstance
from qmpbackup.recovery.journal import Entry, Journal, Undo, bad_entry
from qmpbackup.recovery.kinds import KINDS
from qmpbackup.recovery.steps import undo_steps

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 60.0


def qemu_instance(session: QmpSession) -> QemuInstance | None:
    """The QEMU process at the other end of ``session`` (None if the kernel does not say)."""
    pid = session.peer_pid()
    return QemuInstance.of(pid, session.socket_path) if pid is not None else None


@dataclass(frozen=True, slots=True)
class Target:
    """Where the entries of one QEMU are undone: a session, or that QEMU is gone, or why neither."""

    session: QmpSession | None = None
    gone: bool = False
    why: str = ""


class Sessions:
    """The QMP sessions a replay may use: the caller's, and (``connect``) those it opens to the
    sockets the journal names. Sessions opened here are closed by :meth:`close`.

    ``current_gone``: the caller's socket was missing or refused, so entries that name no QEMU
    (journals of older versions) belong to a QEMU that is gone.
    """

    def __init__(self, vmid: int, current: QmpSession | None, *, current_gone: bool = False,
                 connect: bool = False) -> None:
        self.vmid, self.current, self.current_gone, self.connect = vmid, current, current_gone, connect
        self.current_qemu = qemu_instance(current) if current is not None else None
        self._targets: dict[QemuInstance, Target] = {}
        self._opened: list[QmpSession] = []

    def reachable(self) -> list[QmpSession]:
        """Every session to a live QEMU of this VM (the caller's first)."""
        return ([self.current] if self.current is not None else []) + self._opened

    def unreachable(self) -> list[str]:
        """Why each live QEMU that holds entries could not be reached."""
        return [t.why for t in self._targets.values() if t.session is None and not t.gone]

    async def target(self, qemu: QemuInstance | None) -> Target:
        if qemu is None:  # recorded before entries named their QEMU
            if self.current is not None:
                return Target(self.current)
            return Target(gone=True) if self.current_gone else Target(why="no QMP socket is known for it")
        if self.current is not None and qemu.same(self.current_qemu):
            return Target(self.current)
        if qemu not in self._targets:
            self._targets[qemu] = await self._reach(qemu)
        return self._targets[qemu]

    async def _reach(self, qemu: QemuInstance) -> Target:
        if not qemu.alive():
            return Target(gone=True)
        if not self.connect:
            return Target(why=f"{qemu} still runs (it is not the QEMU this run uses)")
        session = QmpSession(str(self.vmid), qemu.qmp)
        try:
            await session.connect()
        except (QmpConnectError, QmpSocketBusyError) as exc:
            await session.close()
            return Target(why=f"{qemu} still runs but cannot be reached: {exc}")
        if session.peer_pid() != qemu.pid:
            await session.close()
            return Target(why=f"{qemu} still runs, but its socket now leads to another QEMU")
        self._opened.append(session)
        return Target(session)

    async def close(self) -> None:
        for session in self._opened:
            await session.close()
        self._opened.clear()


StepTable = Callable[[QmpSession | None], Mapping[str, Undo]]


async def replay(journal: Journal, sessions: Sessions | None, *, steps: StepTable | None = None,
                 info: Callable[[str], None] = log.info, undone: Callable[[Entry], None] | None = None,
                 say: Callable[[str], None] | None = None, step_timeout: float = STEP_TIMEOUT_S,
                 only: Callable[[Entry], bool] | None = None) -> list[str]:
    """Undo every pending entry (``only``: those it accepts), newest first. Returns the failures, one line each.

    ``sessions`` is None for a journal of host resources only (``qmpbackup mount``'s).
    ``info`` gets the line about dropped entries of a gone QEMU, ``undone`` each entry undone,
    ``say`` what a step found worth saying (a guest still frozen). Cancellation propagates.
    """
    table: StepTable = steps or (lambda s: undo_steps(s, say=say))
    failures: list[str] = []
    dropped: dict[QemuInstance | None, int] = {}
    kept: dict[str, int] = {}
    for entry in reversed(journal.pending()):
        if only is not None and not only(entry):
            continue
        kind = KINDS.get(entry.kind)
        if entry.problem is not None or kind is None:
            failures.append(bad_entry(journal, entry))
            continue
        session: QmpSession | None = None
        if kind.where != "host":
            if sessions is None:
                failures.append(f"{entry.describe()} needs a QEMU, and this journal has none")
                continue
            target = await sessions.target(entry.qemu)
            if target.session is None and not target.gone:
                kept[target.why] = kept.get(target.why, 0) + 1
                continue
            if target.gone and kind.where == "qemu":
                journal.resolve(entry)
                dropped[entry.qemu] = dropped.get(entry.qemu, 0) + 1
                continue
            session = target.session
        step = table(session).get(entry.kind)
        if step is None:
            failures.append(f"no cleanup step for {entry.describe()}")
            continue
        try:
            async with asyncio.timeout(max(step_timeout, kind.step_timeout or 0.0)):
                await step(entry)
        except Exception as exc:  # logged, kept pending, the first error stays the one reported
            message = f"cleanup of {entry.describe()} failed: {exc or type(exc).__name__}"
            log.warning("%s", message)
            failures.append(message)
            continue
        journal.resolve(entry)
        if undone is not None:
            undone(entry)
    for qemu, count in dropped.items():
        info(f"dropped {count} journal entr{'y' if count == 1 else 'ies'} of "
             f"{qemu or 'a QEMU'} that is gone (what it held went with it)")
    for why, count in kept.items():
        failures.append(f"kept {count} journal entr{'y' if count == 1 else 'ies'}: {why}")
    return failures
