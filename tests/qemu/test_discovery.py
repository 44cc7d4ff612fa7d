"""Drive discovery on real QEMU: keys, nodes, sizes and formats for -drive and -blockdev VMs."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.qemu.discovery import Disk, discover_disks
from qmpbackup.qemu.errors import QmpCommandError
from qmpbackup.qemu.session import QmpSession
from tests.support.qemu import DriveSpec, QemuBinaries, RunningQemu

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def image(qemu: QemuBinaries, path: Path, fmt: str, size: int) -> Path:
    subprocess.run([str(qemu.img), "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    return path


async def discover(vm: RunningQemu) -> dict[str, Disk]:
    async with QmpSession("200", vm.qmp_path) as qmp:
        disks = await discover_disks(qmp, "200")
    assert [d.key for d in disks] == sorted(d.key for d in disks)
    return {d.key: d for d in disks}


async def test_drive_style_with_keys(qemu: QemuBinaries, tmp_path: Path, qemu_vm: Callable[..., RunningQemu]) -> None:
    """Keys from qdev ids and drive ids; CD-ROMs and empty drives are skipped."""
    a = image(qemu, tmp_path / "a.qcow2", "qcow2", 64 * MiB)
    b = image(qemu, tmp_path / "b.raw", "raw", 3 * MiB + 512)  # not a multiple of 64 KiB
    c = image(qemu, tmp_path / "c.raw", "raw", 2 * MiB)
    d = image(qemu, tmp_path / "d.qcow2", "qcow2", 5 * MiB)
    iso = image(qemu, tmp_path / "cd.iso", "raw", 1 * MiB)
    vm = qemu_vm([
        DriveSpec(a, "scsi", "qcow2", dev_id="scsi0", drive_id="drive-scsi0"),
        DriveSpec(b, "virtio", dev_id="virtio1", drive_id="drive-virtio1", read_only=True),
        DriveSpec(c, "sata", drive_id="drive-sata2"),  # key only from the drive id
        DriveSpec(d, "ide", "qcow2", dev_id="ide0", drive_id="drive-ide0"),
        DriveSpec(iso, "ide", dev_id="ide2", drive_id="drive-ide2", cdrom=True),
        DriveSpec(None, "scsi", dev_id="scsi5", drive_id="drive-scsi5", cdrom=True),  # empty
        DriveSpec(None, "sata", dev_id="sata4", drive_id="drive-sata4", cdrom=True),  # empty
    ])  # fmt: skip
    disks = await discover(vm)
    assert list(disks) == ["ide0", "sata2", "scsi0", "virtio1"]
    s0 = disks["scsi0"]
    assert (s0.bus, s0.device_type, s0.format, s0.size, s0.filename) == ("scsi", "scsi-hd", "qcow2", 64 * MiB, str(a))
    assert s0.drive_id == "drive-scsi0" and s0.qom_path == "/machine/peripheral/scsi0"
    assert s0.top_node == s0.format_node != s0.file_node and not s0.read_only
    v1 = disks["virtio1"]
    assert (v1.bus, v1.format, v1.size, v1.filename, v1.read_only) == ("virtio", "raw", 3 * MiB + 512, str(b), True)
    assert v1.qdev == "/machine/peripheral/virtio1/virtio-backend"
    assert v1.vma_device_name == "drive-virtio1"
    assert (disks["sata2"].bus, disks["sata2"].size) == ("sata", 2 * MiB)
    i0 = disks["ide0"]
    assert (i0.bus, i0.format, i0.size, i0.read_only) == ("ide", "qcow2", 5 * MiB, False)


async def test_blockdev_style_by_bus_and_order(
    qemu: QemuBinaries, tmp_path: Path, qemu_vm: Callable[..., RunningQemu]
) -> None:
    """Anonymous -blockdev devices get keys by bus type and order, after the explicit ones."""
    imgs = [image(qemu, tmp_path / f"{n}.img", fmt, size) for n, fmt, size in (
        ("v0", "raw", 1 * MiB), ("v1", "qcow2", 2 * MiB), ("s0", "raw", 3 * MiB),
        ("s1", "qcow2", 4 * MiB), ("sa", "raw", 5 * MiB), ("id", "raw", 6 * MiB),
    )]  # fmt: skip
    vm = qemu_vm([
        DriveSpec(imgs[0], "virtio", style="blockdev", node_name="n0"),
        DriveSpec(imgs[1], "virtio", "qcow2", style="blockdev", dev_id="virtio0", node_name="n1"),
        DriveSpec(imgs[2], "scsi", style="blockdev", node_name="n2"),
        DriveSpec(imgs[3], "scsi", "qcow2", style="blockdev", node_name="n3"),
        DriveSpec(imgs[4], "sata", style="blockdev", node_name="n4"),
        DriveSpec(imgs[5], "ide", style="blockdev", node_name="n5"),
        DriveSpec(None, "ide", style="blockdev", cdrom=True),
    ])  # fmt: skip
    disks = await discover(vm)
    assert list(disks) == ["ide0", "sata0", "scsi0", "scsi1", "virtio0", "virtio1"]
    assert disks["virtio0"].filename == str(imgs[1]) and disks["virtio0"].format == "qcow2"
    assert disks["virtio1"].filename == str(imgs[0])  # virtio0 was taken by an explicit id
    assert disks["virtio1"].top_node == "n0" and disks["virtio1"].file_node == "n0-file"
    assert disks["virtio1"].drive_id is None
    assert [disks[k].size for k in ("scsi0", "scsi1", "sata0", "ide0")] == [3 * MiB, 4 * MiB, 5 * MiB, 6 * MiB]
    assert disks["scsi1"].format == "qcow2" and disks["scsi1"].format_node == "n3"


async def test_filter_above_format_node(
        qemu: QemuBinaries, tmp_path: Path, qemu_vm: Callable[..., RunningQemu]) -> None:
    """A throttle filter on top (as Proxmox 9 sets up -blockdev disks): format node below it."""
    img = image(qemu, tmp_path / "t.qcow2", "qcow2", 7 * MiB)
    vm = qemu_vm(
        [],
        extra_args=[
            "-object", "throttle-group,id=tg0",
            "-blockdev", f'{{"driver":"file","filename":"{img}","node-name":"e0"}}',
            "-blockdev", '{"driver":"qcow2","file":"e0","node-name":"f0"}',
            "-blockdev", '{"driver":"throttle","throttle-group":"tg0","file":"f0","node-name":"drive-scsi3"}',
            "-device", "virtio-scsi-pci,id=scsihw0",
            "-device", "scsi-hd,bus=scsihw0.0,drive=drive-scsi3,id=scsi3",
        ],
    )  # fmt: skip
    disks = await discover(vm)
    d = disks["scsi3"]
    assert (d.top_node, d.format_node, d.file_node, d.format, d.size) == ("drive-scsi3", "f0", "e0", "qcow2", 7 * MiB)


class NoBlockGraph:
    """A session whose QEMU lacks x-debug-query-block-graph (it may go away one day)."""

    def __init__(self, qmp: QmpSession) -> None:
        self.qmp = qmp

    async def execute(
            self, command: str, args: Mapping[str, object] | None = None, timeout: float | None = None) -> Any:
        if command == "x-debug-query-block-graph":
            raise QmpCommandError(command, args, "CommandNotFound", "not here", "200")
        return await self.qmp.execute(command, args, timeout)


async def test_without_block_graph(qemu: QemuBinaries, tmp_path: Path, qemu_vm: Callable[..., RunningQemu]) -> None:
    a = image(qemu, tmp_path / "a.qcow2", "qcow2", 4 * MiB)
    b = image(qemu, tmp_path / "b.raw", "raw", 2 * MiB)
    vm = qemu_vm([
        DriveSpec(a, "scsi", "qcow2", dev_id="scsi0", drive_id="drive-scsi0"),
        DriveSpec(b, "virtio", style="blockdev", node_name="vb"),
    ])  # fmt: skip
    async with QmpSession("200", vm.qmp_path) as qmp:
        disks = {d.key: d for d in await discover_disks(NoBlockGraph(qmp), "200")}
    assert disks["scsi0"].format == "qcow2" and disks["scsi0"].file_node != disks["scsi0"].format_node
    assert disks["scsi0"].filename == str(a)
    assert (disks["virtio0"].format_node, disks["virtio0"].file_node) == ("vb", "vb-file")
