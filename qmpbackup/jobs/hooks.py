"""vzdump hook scripts: the same phases, arguments, environment and exit-status rules.

Users' existing ``--script`` hooks (mount a disk before the job, copy the
archive afterwards) must work unchanged, so we call them exactly as vzdump
does: ``<script> <phase>`` for job phases, ``<script> <phase> <mode> <vmid>``
for guest phases, with an environment that holds only vzdump's variables.
Output goes to a callback (the guest's log); a non-zero exit raises HookError
and the caller decides, by phase, whether it fails the guest or the job.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.errors import QmpBackupError, UsageError

log = logging.getLogger(__name__)

JOB_PHASES = frozenset({"job-init", "job-start", "job-end", "job-abort"})
GUEST_PHASES = frozenset(
    {"backup-start", "backup-end", "backup-abort", "log-end", "pre-stop", "pre-restart", "post-restart"}
)
# A failing hook in these phases fails the guest's backup / the whole job (vzdump's rules).
FAILS_GUEST = frozenset({"backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end"})
FAILS_JOB = frozenset({"job-init", "job-start"})
DEFAULT_TIMEOUT_S = 3600.0


class HookError(QmpBackupError):
    """The hook script failed (non-zero exit, signal, timeout or could not start)."""

    def __init__(self, message: str, phase: str, returncode: int | None = None) -> None:
        self.phase = phase
        self.returncode = returncode
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class GuestInfo:
    """What a guest phase knows about the guest; None fields are left out of the environment."""

    vmid: int
    mode: str
    vmtype: str = "qemu"
    hostname: str | None = None  # the VM's name, once known
    target: Path | str | None = None  # the archive path, once known
    logfile: Path | None = None  # <dumpdir>/<base>.log for file targets


def check_script(script: Path) -> Path:
    """The script must exist and be executable (vzdump checks this before the job starts)."""
    if not script.exists():
        raise UsageError(f"hook script '{script}' does not exist")
    if not os.access(script, os.X_OK):
        raise UsageError(f"hook script '{script}' is not executable")
    return script


def hook_environment(
    phase: str, storeid: str | None, dumpdir: Path | None, guest: GuestInfo | None
) -> dict[str, str]:
    """Only vzdump's variables: STOREID, DUMPDIR, and for guest phases VMTYPE, HOSTNAME, TARGET, LOGFILE."""
    env: dict[str, str] = {}
    if storeid is not None:
        env["STOREID"] = storeid
    if dumpdir is not None:
        env["DUMPDIR"] = str(dumpdir)
    if guest is not None:
        env["VMTYPE"] = guest.vmtype
        if guest.hostname is not None:
            env["HOSTNAME"] = guest.hostname
        if guest.target is not None:
            env["TARGET"] = str(guest.target)
        if guest.logfile is not None:
            env["LOGFILE"] = str(guest.logfile)
    return env


class HookRunner:
    """Runs one job's hook script; ``storeid``/``dumpdir`` describe the job's target."""

    def __init__(
        self,
        script: Path,
        *,
        storeid: str | None = None,
        dumpdir: Path | None = None,
        on_output: Callable[[str], None] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.script = check_script(script)
        self.storeid = storeid
        self.dumpdir = dumpdir
        self.on_output = on_output or (lambda line: log.info("%s", line))
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"HookRunner({str(self.script)!r})"

    async def job_phase(self, phase: str, *, explicit_dumpdir: bool = True) -> None:
        """``job-init`` and friends. In ``job-init`` DUMPDIR is set only when ``--dumpdir`` was
        given directly: pass ``explicit_dumpdir=False`` when the dump dir comes from a storage."""
        if phase not in JOB_PHASES:
            raise ValueError(f"not a job phase: {phase}")
        dumpdir = self.dumpdir if (phase != "job-init" or explicit_dumpdir) else None
        await self._run([phase], hook_environment(phase, self.storeid, dumpdir, None), phase)

    async def guest_phase(self, phase: str, guest: GuestInfo) -> None:
        """``backup-start`` and friends: called with ``<phase> <mode> <vmid>``."""
        if phase not in GUEST_PHASES:
            raise ValueError(f"not a guest phase: {phase}")
        env = hook_environment(phase, self.storeid, self.dumpdir, guest)
        await self._run([phase, guest.mode, str(guest.vmid)], env, phase)

    async def _run(self, args: list[str], env: Mapping[str, str], phase: str) -> None:
        command = " ".join([str(self.script), *args])
        log.debug("hook: %s (env %s)", command, dict(env))
        try:
            proc = await asyncio.create_subprocess_exec(
                str(self.script), *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise HookError(f"command '{command}' failed: {exc.strerror}", phase) from exc
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(self.timeout_s):
                while line := await proc.stdout.readline():
                    self.on_output(line.decode("utf-8", errors="replace").rstrip("\n"))
                returncode = await proc.wait()
        except TimeoutError:
            await _kill(proc)
            raise HookError(f"command '{command}' timed out after {self.timeout_s:g} s", phase) from None
        except BaseException:
            await _kill(proc)
            raise
        if returncode != 0:
            what = f"exit code {returncode}" if returncode > 0 else f"signal {-returncode}"
            raise HookError(f"command '{command}' failed: {what}", phase, returncode)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the hook's whole session (it may have started children) and reap it."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            log.warning("hook script %d did not exit after SIGKILL", proc.pid)
