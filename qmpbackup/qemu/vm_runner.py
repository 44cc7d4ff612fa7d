"""``qmpbackup start`` / ``stop``: run a VM from its definition without host tooling.

The VM's run folder ``<run-dir>/vms/<vmid>/`` holds ``qmp.sock``, ``qga.sock`` (with
``agent: 1``), ``pid``, ``console.log`` and ``qemu.log``. QEMU runs on its own
(``-daemonize``), so the VM outlives the command that started it; ``stop`` asks the guest to
power off (ACPI, or the guest agent) and ends QEMU after the timeout.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.errors import QmpBackupError
from qmpbackup.guest_config import GuestDefinition
from qmpbackup.qemu.errors import SpawnError
from qmpbackup.qemu.shutdown import clean_shutdown
from qmpbackup.recovery.spawned import stop_process
from qmpbackup.qemu.spawn import DEFAULT_BINARY, kvm_usable
from qmpbackup.qemu.vm_command import vm_command

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class VmFolder:
    path: Path

    @classmethod
    def of(cls, run_dir: Path, vmid: int) -> VmFolder:
        return cls(run_dir / "vms" / str(vmid))

    @property
    def qmp(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def qga(self) -> Path:
        return self.path / "qga.sock"

    def pid(self) -> int | None:
        """QEMU's pid when it runs."""
        try:
            pid = int((self.path / "pid").read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid


def start_vm(defn: GuestDefinition, run_dir: Path, accel: str | None = None,
             paths: dict[str, str] | None = None) -> VmFolder:
    """Start ``defn`` (``paths`` replaces disk images by drive key); refuse one that runs."""
    vm = str(defn.vmid)
    folder = VmFolder.of(run_dir, defn.vmid)
    if folder.pid() is not None:
        raise SpawnError(f"VM {vm} is running (pid {folder.pid()}); stop it first", vm)
    shutil.rmtree(folder.path, ignore_errors=True)
    folder.path.mkdir(parents=True, mode=0o700)
    chosen = accel or defn.reach.accel
    if chosen == "kvm" and not kvm_usable():
        log.warning("VM %s: /dev/kvm is not usable, using TCG", vm)
        chosen = "tcg"
    binary = shutil.which(defn.reach.qemu or DEFAULT_BINARY) or defn.reach.qemu or DEFAULT_BINARY
    argv = vm_command(defn, binary, folder.path, chosen, paths) + ["-daemonize"]
    log.debug("VM %s: %s", vm, subprocess.list2cmdline(argv))
    with open(folder.path / "qemu.log", "wb") as out:
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=START_TIMEOUT_S,
                                  check=False)
        except FileNotFoundError as exc:
            raise SpawnError(f"VM {vm}: cannot run {binary}: not found", vm) from exc
        except subprocess.TimeoutExpired as exc:
            raise SpawnError(f"VM {vm}: QEMU did not start within {START_TIMEOUT_S:g} s", vm) from exc
    if proc.returncode != 0 or folder.pid() is None:
        tail = (folder.path / "qemu.log").read_text(errors="replace").strip().splitlines()
        shutil.rmtree(folder.path, ignore_errors=True)
        raise SpawnError(f"VM {vm}: QEMU failed: {tail[-1] if tail else f'exit status {proc.returncode}'}", vm)
    log.info("VM %s: started (pid %d, %s); QMP %s", vm, folder.pid(), chosen, folder.qmp)
    return folder


async def stop_vm(vmid: int, run_dir: Path, timeout: float = 60.0) -> bool:
    """Power the VM off (ACPI), end QEMU after ``timeout``; False when it was not running."""
    folder = VmFolder.of(run_dir, vmid)
    pid = folder.pid()
    if pid is None:
        shutil.rmtree(folder.path, ignore_errors=True)
        return False
    qga = folder.qga if folder.qga.exists() else None
    try:
        if not await clean_shutdown(vmid, folder.qmp, qga, timeout, log.warning):
            log.warning("VM %d did not power off within %g s: ending QEMU", vmid, timeout)
    except QmpBackupError as exc:  # QMP gone or wedged: the signals below end QEMU anyway
        log.warning("VM %d: %s", vmid, exc)
    await stop_process(pid, None, timeout=5.0)  # gone already after a clean shutdown, else ended
    shutil.rmtree(folder.path, ignore_errors=True)
    return True

