"""The helper VM process: its QEMU command line, start, and a kill that always reaps it.

The archive's devices are attached read-only from an NBD server on a unix socket (our export),
each as a virtio-blk disk whose serial (``d0``, ``d1`` …) is the only name the helper sees.
Memory is bounded (256 MiB by default), there is no network and no display, and QEMU runs
without root: TCG works everywhere, KVM where /dev/kvm can run the helper.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.errors import QmpBackupError
from qmpbackup.file_restore.wire import PORT_NAME

DEFAULT_MEMORY_MB = 256
QEMU = "qemu-system-x86_64"


class HelperVmError(QmpBackupError):
    """The helper VM did not start or died; the message has QEMU's last words."""


@dataclass(frozen=True)
class AttachedDevice:
    """One archive device as the helper sees it."""

    serial: str   # d0, d1 …
    name: str     # the archive's name, e.g. drive-scsi0
    size: int
    export: str   # the NBD export name on ``nbd_socket``


@dataclass(frozen=True)
class HelperVmSpec:
    image: Path          # folder with vmlinuz and initramfs.cpio.gz
    folder: Path         # the run folder: sockets and the console log
    nbd_socket: Path
    devices: tuple[AttachedDevice, ...]
    accel: str = "tcg"
    memory_mb: int = DEFAULT_MEMORY_MB
    qemu: str = QEMU

    @property
    def channel(self) -> Path:
        return self.folder / "helper.sock"

    @property
    def console(self) -> Path:
        return self.folder / "console.log"

    def argv(self) -> list[str]:
        argv = [
            self.qemu, "-name", "qmpbackup-file-restore", "-M", "pc", "-accel", self.accel,
            "-m", str(self.memory_mb), "-smp", "1", "-nodefaults", "-display", "none",
            "-no-reboot", "-no-user-config", "-nic", "none",
            "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initramfs.cpio.gz"),
            "-append", "console=ttyS0 quiet panic=-1",
            "-serial", f"file:{self.console}",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=channel,path={self.channel},server=on,wait=off",
            "-device", f"virtserialport,chardev=channel,name={PORT_NAME}",
        ]
        for i, dev in enumerate(self.devices):
            node = {"driver": "raw", "node-name": f"disk{i}", "read-only": True,
                    "file": {"driver": "nbd", "export": dev.export, "read-only": True,
                             "server": {"type": "unix", "path": str(self.nbd_socket)}}}
            argv += ["-blockdev", json.dumps(node, separators=(",", ":")),
                     "-device", f"virtio-blk-pci,drive=disk{i},serial={dev.serial}"]
        return argv


class HelperVm:
    """A started helper; ``stop()`` is safe to call more than once and always reaps QEMU."""

    def __init__(self, spec: HelperVmSpec, proc: asyncio.subprocess.Process) -> None:
        self.spec = spec
        self.proc = proc

    @classmethod
    async def start(cls, spec: HelperVmSpec) -> HelperVm:
        spec.channel.unlink(missing_ok=True)
        log = open(spec.folder / "qemu.log", "wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv(), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        except OSError as exc:
            raise HelperVmError(f"cannot start {spec.qemu}: {exc.strerror}") from exc
        finally:
            log.close()
        return cls(spec, proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def last_words(self) -> str:
        try:
            lines = (self.spec.folder / "qemu.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else f"exit status {self.proc.returncode}"

    async def stop(self, timeout: float = 5.0) -> None:
        if self.proc.returncode is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
                return
            except asyncio.TimeoutError:
                continue
        await self.proc.wait()
