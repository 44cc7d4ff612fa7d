"""``qmpbackup start``/``stop``: the command line built from a definition, and a real guest run by it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmpbackup.guest_agent import GuestAgentClient
from qmpbackup.guest_config import parse_guest
from qmpbackup.qemu.vm_command import vm_command
from tests.support.guest import GuestImage, guest_image  # noqa: F401  (fixture)

DEFINITION = """\
name: web1
memory: 256
sockets: 1
cores: 2
machine: q35
boot: order=scsi0;net0
agent: 1
scsi0: /img/root.qcow2,format=qcow2,size=8G,discard=on
virtio1: /img/data.raw,format=raw,size=1G
ide2: /iso/debian.iso,media=cdrom
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0
net1: e1000=BC:24:11:00:00:02
args: -rtc base=utc
"""


def test_command_line_from_a_definition(tmp_path: Path) -> None:
    defn = parse_guest(DEFINITION, 100)
    argv = vm_command(defn, "qemu-system-x86_64", tmp_path, "tcg")
    text = " ".join(argv)
    assert "-machine q35" in text and "-m 256" in text and "-smp 2,sockets=1,cores=2" in text
    assert "-device scsi-hd,bus=scsihw0.0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0,bootindex=100" in text
    assert "file=/img/root.qcow2,format=qcow2,if=none,id=drive-scsi0" in text
    assert "-device virtio-blk-pci,drive=drive-virtio1,id=virtio1" in text
    assert "ide-cd,bus=ide.2,drive=drive-ide2,id=ide2" in text
    assert ("-netdev bridge,id=net0,br=vmbr0 -device virtio-net-pci,netdev=net0,id=net0,mac=BC:24:11:00:00:01,"
            "bootindex=101") in text
    assert "-netdev user,id=net1 -device e1000,netdev=net1,id=net1,mac=BC:24:11:00:00:02" in text
    assert f"path={tmp_path / 'qga.sock'}" in text
    assert argv[-2:] == ["-rtc", "base=utc"]
    replaced = vm_command(defn, "qemu-system-x86_64", tmp_path, "tcg", paths={"scsi0": "/new/overlay.qcow2"})
    assert "file=/new/overlay.qcow2,format=qcow2" in " ".join(replaced)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", *args], capture_output=True, text=True,
                          timeout=180, env=env, check=False)


@pytest.mark.qemu
@pytest.mark.guest
def test_start_and_stop_the_test_guest(tmp_path: Path, guest_image: GuestImage,  # noqa: F811
                                       isolated_config: Path) -> None:
    data = tmp_path / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "64M"], check=True)
    append = "console=ttyS0 quiet panic=-1 guest.data=/dev/vda guest.mkfs=1 guest.writer=1"
    (isolated_config / "guests").mkdir()
    (isolated_config / "guests" / "100.conf").write_text(
        f"name: restored\nmemory: 128\nmachine: q35\nagent: 1\nvirtio0: {data},format=qcow2,size=64M\n"
        f"args: -kernel {guest_image.vmlinuz} -initrd {guest_image.initrd} -append '{append}'\n")
    run_dir = tmp_path / "run"
    env = dict(os.environ)
    started = _cli("start", "100", "--run-dir", str(run_dir), env=env)
    assert started.returncode == 0, started.stderr
    folder = Path(started.stdout.strip())
    assert (folder / "qmp.sock").exists()
    again = _cli("start", "100", "--run-dir", str(run_dir), env=env)
    assert again.returncode != 0 and "is running" in again.stderr

    async def ping() -> None:
        for _ in range(600):
            try:
                async with GuestAgentClient(str(folder / "qga.sock")) as agent:
                    await agent.execute("guest-ping")
                    return
            except Exception:
                await asyncio.sleep(0.2)
        raise AssertionError("the guest agent never answered")

    asyncio.run(ping())
    pid = int((folder / "pid").read_text())
    stopped = _cli("stop", "100", "--run-dir", str(run_dir), "--timeout", "60", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert not folder.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _cli("stop", "100", "--run-dir", str(run_dir), env=env).stderr.strip() == "VM 100 is not running"
