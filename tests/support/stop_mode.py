"""The test guest as a VM that stop mode can shut down and start again (VM 100's guest definition)."""

from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path

from tests.support.guest import GuestFactory, GuestOptions, TestGuest
from tests.support.qemu import QemuBinaries


def stoppable_guest(guests: GuestFactory, qemu: QemuBinaries, tmp_path: Path, config: Path,
                    data_disk: Path | None = None, started_file: Path | None = None) -> TestGuest:
    """The test guest (its raw data disk ``data_disk``, else a new one in its folder, on ext4) and VM
    100's definition, whose ``start`` command starts the same QEMU again in the background: the
    moment into ``started_file``, the pid into ``tmp_path/vm.pid`` (for :func:`end_restarted`)."""
    guest = guests.start(GuestOptions(qemu=str(qemu.system), qemu_img=str(qemu.img), data_format="raw",
                                      data_disk=data_disk))
    guest.wait_writer(above=2)
    stamp = f"date +%s.%N > {started_file}\n" if started_file is not None else ""
    start = tmp_path / "start.sh"
    start.write_text(f"#!/bin/sh\n{stamp}setsid {shlex.join(guest.argv)} </dev/null >/dev/null 2>&1 &\n"
                     f"echo $! > {tmp_path / 'vm.pid'}\n")
    start.chmod(0o755)
    disk = guest.data_disk
    (config / "guests").mkdir()
    (config / "guests" / "100.conf").write_text(
        f"name: stopme\nagent: 1\nvirtio0: {disk.path},format={disk.fmt}\n\n[qmpbackup]\n"
        f"qmp: {guest.qmp_path}\nqga: {guest.qga_path}\nstart: {start}\nqemu: {qemu.system}\n")
    return guest


def end_restarted(tmp_path: Path) -> None:
    """Kill the QEMU the last start command of :func:`stoppable_guest` started, if any."""
    pid_file = tmp_path / "vm.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
