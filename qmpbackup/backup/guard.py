"""A freeze or pause that outlives no run: journaled before it happens, watched while it lasts.

:func:`guarded` wraps the window in which the guest is frozen (snapshot mode) or the VM is
paused by us (suspend mode). Before the window it writes the journal entry (so ``cleanup``
and the next run undo it after any crash) and starts the guard
(:mod:`qmpbackup.backup.guard_program`), which undoes it within a second or two if this
process dies, without anyone running ``cleanup``. When the window closes normally the
entry is resolved and the guard is told ``done``; when it closes by an error or a signal,
the undo step runs here first (shielded), and the guard is told ``done`` only if it worked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from qmpbackup.recovery.journal import Entry, Journal, Undo
from qmpbackup.recovery.kinds import Kind

log = logging.getLogger(__name__)

GUARD_PROGRAM = Path(__file__).with_name("guard_program.py")
#: How long the guard may take to start; a loaded machine needs far less.
READY_TIMEOUT_S = 10.0
#: How long a guard told ``done`` may take to exit before it is killed.
EXIT_TIMEOUT_S = 5.0
#: The in-process undo when the window ends by an error (the journal keeps it otherwise).
UNDO_TIMEOUT_S = 30.0


class Guard:
    """A started guard process; :meth:`release` ends our side of the pipe."""

    def __init__(self, proc: subprocess.Popen[bytes], pipe: int) -> None:
        self.proc = proc
        self._pipe = pipe

    @classmethod
    async def start(cls, label: str, *, qga: str | None = None, qmp: str | None = None) -> Guard:
        """Start the guard and wait until it watches the pipe. Raises OSError or TimeoutError."""
        argv = [sys.executable, "-I", "-S", str(GUARD_PROGRAM), "--label", label]
        if qga is not None:
            argv += ["--qga", qga]
        if qmp is not None:
            argv += ["--qmp", qmp]
        launch = asyncio.ensure_future(asyncio.to_thread(cls._launch, argv))
        try:
            return await asyncio.shield(launch)
        except asyncio.CancelledError:  # no guard may outlive this: let it start, then end it
            with contextlib.suppress(OSError, TimeoutError):
                await (await launch).release(done=True)
            raise

    @classmethod
    def _launch(cls, argv: list[str]) -> Guard:
        read_end, write_end = os.pipe()  # both close-on-exec; stdin gets a copy of read_end
        try:
            proc = subprocess.Popen(argv, stdin=read_end, stdout=subprocess.PIPE, cwd="/",
                                    start_new_session=True)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        assert proc.stdout is not None
        with proc.stdout:
            readable, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
            line = proc.stdout.readline() if readable else b""
        if line == b"ready\n":
            return cls(proc, write_end)
        os.close(write_end)
        with contextlib.suppress(OSError):
            proc.kill()
        status = proc.wait()
        if readable:
            raise OSError(f"guard exited at start (status {status})")
        raise TimeoutError(f"guard did not start within {READY_TIMEOUT_S:g} s")

    async def release(self, *, done: bool) -> None:
        """``done``: the window closed, the guard exits untouched. Else it acts now, on its own."""
        if self._pipe < 0:
            return
        pipe, self._pipe = self._pipe, -1
        try:
            if done:
                with contextlib.suppress(OSError):
                    os.write(pipe, b"done\n")
        finally:
            os.close(pipe)
        if done:
            try:
                await asyncio.to_thread(self.proc.wait, EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)


@contextlib.asynccontextmanager
async def guarded(journal: Journal, kind: Kind, data: Mapping[str, Any], undo: Undo, *, label: str,
                  warn: Callable[[str], None], qga: str | None = None,
                  qmp: str | None = None) -> AsyncIterator[Entry]:
    """Journal ``kind`` with ``data``, start the guard (``qga``: thaw, ``qmp``: cont), run the block.

    A guard that cannot start is a warning (the journal still covers the window).
    """
    entry = journal.record(kind, **data)
    guard: Guard | None = None
    settled = False
    try:
        try:
            guard = await Guard.start(label, qga=qga, qmp=qmp)
        except (OSError, TimeoutError) as exc:
            warn(f"cannot start the {kind.name} guard ({exc}); if this run is killed now, "
                 "the next run or 'qmpbackup cleanup' undoes the " + kind.name)
        yield entry
        settled = True
    except BaseException:
        settled, cancelled = await _undo_shielded(undo, entry, label)
        if cancelled:  # a signal arrived during the undo: it ends the run, whatever failed before
            raise asyncio.CancelledError() from None
        raise
    finally:
        if settled:
            journal.resolve(entry)
        if guard is not None:
            await guard.release(done=settled)


async def _undo_shielded(undo: Undo, entry: Entry, label: str) -> tuple[bool, bool]:
    """Run the undo step to its end even if we are cancelled meanwhile.

    Returns whether it worked, and whether a cancellation arrived meanwhile.
    """
    async def bounded() -> None:
        async with asyncio.timeout(UNDO_TIMEOUT_S):
            await undo(entry)

    task = asyncio.create_task(bounded(), name=f"undo {entry.kind} {label}")
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True  # finish the undo first
    if task.cancelled() or task.exception() is not None:
        log.warning("%s: undoing the %s failed: %s", label, entry.kind,
                    "cancelled" if task.cancelled() else task.exception())
        return False, cancelled
    return True, cancelled
