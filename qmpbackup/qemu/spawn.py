"""A paused QEMU for a stopped VM, built from its guest definition, never left behind.

The QEMU runs no guest (``-S``): it only opens the VM's disks so that the backup engine
can use the same QMP path as for a running VM. Devices get the VM's keys as qdev ids
(``scsi0``) and ``drive-<key>`` as drive ids, so discovery and archive names match.
Its sockets live in a private runtime dir (mode 0700). Its lifetime:

* :class:`SpawnedQemu` is an async context manager: leaving the block (normally, by an
  exception or by cancellation after SIGINT/SIGTERM) stops QEMU and removes its dir;
* a record in the state dir (:mod:`qmpbackup.recovery.spawned`) lets the next run kill it if we
  were SIGKILLed; :meth:`SpawnedQemu.start` does that for leftovers first.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from qmpbackup.guest_config import DriveConfig, GuestDefinition
from qmpbackup.qemu.errors import SpawnError
from qmpbackup.qemu.vm_command import disk_args
from qmpbackup.recovery.state import DEFAULT_STATE_DIR
from qmpbackup.recovery.spawned import (
    ProcessRecord,
    kill_orphans,
    process_create_time,
    remove_record,
    remove_rundir,
    write_record,
)

log = logging.getLogger(__name__)

DEFAULT_BINARY = "qemu-system-x86_64"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


def kvm_usable() -> bool:
    """``/dev/kvm`` can be opened read-write (the cheap half of "KVM works")."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def build_command(
    defn: GuestDefinition, binary: str, rundir: Path, accel: str, drives: Sequence[DriveConfig]
) -> list[str]:
    """The QEMU command line for ``drives`` of ``defn`` (pure: no checks on the system)."""
    argv = [
        binary, "-S", "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "q35", "-accel", accel, "-m", "64",
        "-name", f"qmpbackup-{defn.vmid}",
        "-qmp", f"unix:{str(rundir / 'qmp.sock').replace(',', ',,')},server=on,wait=off",
    ]  # fmt: skip
    return argv + disk_args(defn, drives)


class SpawnState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class SpawnedQemu:
    """A paused QEMU holding the disks of the stopped VM ``defn``.

    ``drives`` defaults to the disks that are backed up (not CD-ROMs, not ``backup=0``).
    ``runtime_base`` is where the private dir ``qmpbackup-<vmid>-*`` is created
    (default ``<state_dir>/run``); ``accel`` overrides the definition's (``tcg``; ``kvm``
    is used only when ``/dev/kvm`` opens, else TCG with a warning).
    """

    def __init__(
        self,
        defn: GuestDefinition,
        state_dir: Path | None = None,
        runtime_base: Path | None = None,
        drives: Sequence[DriveConfig] | None = None,
        binary: str | None = None,
        accel: str | None = None,
    ) -> None:
        self.defn = defn
        self.state_dir = state_dir or DEFAULT_STATE_DIR
        self.runtime_base = runtime_base or self.state_dir / "run"
        self.drives = tuple(drives if drives is not None else (d for d in defn.disks if d.backup))
        self.binary = binary or defn.reach.qemu or DEFAULT_BINARY
        self.accel = accel or defn.reach.accel
        self.rundir: Path | None = None
        self.argv: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._record: ProcessRecord | None = None
        self._state = SpawnState.NEW

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc else None
        return f"<SpawnedQemu vm={self.defn.vmid} pid={pid} {self._state.value}>"

    @property
    def state(self) -> SpawnState:
        return self._state

    def _set_state(self, state: SpawnState) -> None:
        log.debug("spawned QEMU of VM %d: %s -> %s", self.defn.vmid, self._state.value, state.value)
        self._state = state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def qmp_path(self) -> Path:
        if self.rundir is None:
            raise SpawnError(f"VM {self.defn.vmid}: QEMU was not started", str(self.defn.vmid))
        return self.rundir / "qmp.sock"

    async def __aenter__(self) -> SpawnedQemu:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _stderr_tail(self, lines: int = 5) -> str:
        if self.rundir is None:
            return ""
        try:
            text = (self.rundir / "qemu.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Kill leftovers of earlier runs, start QEMU and wait until its QMP socket exists.

        :raise SpawnError: bad definition, QEMU missing, or QEMU exited (its stderr quoted).
        """
        if self._state is not SpawnState.NEW:
            raise SpawnError(f"VM {self.defn.vmid}: a spawner starts QEMU once", str(self.defn.vmid))
        self._set_state(SpawnState.STARTING)
        vm = str(self.defn.vmid)
        try:
            for rec in kill_orphans(self.state_dir):
                log.warning("cleaned up QEMU pid %d of VM %d from an earlier run", rec.pid, rec.vmid)
            if not self.drives:
                raise SpawnError(f"VM {vm}: the definition has no disk to back up", vm)
            accel = self.accel
            if accel == "kvm" and not kvm_usable():
                log.warning("VM %s: /dev/kvm is not usable, using TCG", vm)
                accel = "tcg"
            self.runtime_base.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.rundir = Path(tempfile.mkdtemp(prefix=f"qmpbackup-{vm}-", dir=self.runtime_base))
            os.chmod(self.rundir, 0o700)
            binary = shutil.which(self.binary) or self.binary
            self.argv = build_command(self.defn, binary, self.rundir, accel, self.drives)
            log.debug("VM %s: starting %s", vm, subprocess.list2cmdline(self.argv))
            with open(self.rundir / "qemu.log", "wb") as out:
                try:
                    self._proc = await asyncio.create_subprocess_exec(
                        *self.argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        start_new_session=True,  # a terminal's Ctrl-C goes to us; we stop QEMU in order
                    )
                except OSError as e:
                    why = "not found" if e.errno == errno.ENOENT else e.strerror
                    raise SpawnError(f"VM {vm}: cannot run {self.binary}: {why}", vm) from e
            created = process_create_time(self._proc.pid)
            me = os.getpid()
            self._record = ProcessRecord(
                vmid=self.defn.vmid,
                pid=self._proc.pid,
                create_time=created if created is not None else 0.0,
                owner_pid=me,
                owner_create_time=process_create_time(me) or 0.0,
                rundir=str(self.rundir),
            )
            write_record(self.state_dir, self._record)
            await self._wait_for_socket(timeout)
        except BaseException:
            await self.stop()
            raise
        self._set_state(SpawnState.RUNNING)
        log.debug("VM %s: started paused QEMU pid %d (%s)", vm, self._proc.pid, accel)  # after "starting kvm …"

    async def _wait_for_socket(self, timeout: float) -> None:
        """Wait for QMP's greeting on a probe connection, which QEMU sends only once its
        set-up (opening the images) is done; a QEMU that fails exits instead."""
        assert self._proc is not None
        vm = str(self.defn.vmid)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.returncode is not None:
                raise SpawnError(f"VM {vm}: QEMU exited with {self._proc.returncode}: {self._stderr_tail()}", vm)
            if time.monotonic() > deadline:
                raise SpawnError(f"VM {vm}: QEMU did not answer on its QMP socket within {timeout:g} s", vm)
            greeting = b""
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.qmp_path))
            except OSError:  # not created yet, or bound but not listening yet
                pass
            else:
                try:
                    async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                        greeting = await reader.readline()
                except (TimeoutError, OSError):  # reset: QEMU is exiting
                    pass
                finally:
                    writer.close()
                if greeting.startswith(b'{"QMP"'):
                    return
            try:  # EOF or nothing yet: QEMU may be exiting; give it a moment
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), 0.02)
            except TimeoutError:
                pass

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (QEMU closes its images cleanly), SIGKILL after ``timeout``; reap,
        delete the record and the runtime dir. Safe to call twice and while cancelled."""
        if self._state in (SpawnState.STOPPED, SpawnState.STOPPING):
            return
        self._set_state(SpawnState.STOPPING)
        proc = self._proc
        try:
            if proc is not None and proc.returncode is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:
                    log.warning("VM %d: QEMU pid %d ignored SIGTERM, killing it", self.defn.vmid, proc.pid)
                    proc.kill()
                    await asyncio.wait_for(proc.wait(), timeout)
                except ProcessLookupError:
                    pass
        finally:
            if proc is not None and proc.returncode is None:
                # Cancelled while waiting: do not leave it running.
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
            if self._record is not None and (proc is None or proc.returncode is not None):
                remove_record(self.state_dir, self._record)
            if self.rundir is not None:
                remove_rundir(self.rundir)
            self._set_state(SpawnState.STOPPED)
