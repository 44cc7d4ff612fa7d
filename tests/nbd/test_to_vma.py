"""End to end: QEMU blockdev-backup → our NBD server → ClusterAssembler → a real VMA archive."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from qmpbackup.backup.assembler import ClusterAssembler
from qmpbackup.nbd import Export, NbdServer
from qmpbackup.vma.format import CLUSTER_SIZE
from tests.nbd.images import MiB, make_raw, to_qcow2
from tests.nbd.qemu_vm import backup_to_nbd, paused_qemu
from tests.support.qemu import QemuBinaries

vma = pytest.importorskip("qmpbackup.vma")
pytestmark = pytest.mark.qemu


async def test_two_drives_into_a_vma_archive(qemu: QemuBinaries, tmp_path: Path,
                                             sockdir: Path) -> None:
    disks = {
        "drive-scsi0": (make_raw(tmp_path / "a.raw", 12 * MiB + 4608, "tail"), "qcow2"),
        "drive-virtio1": (make_raw(tmp_path / "b.raw", 8 * MiB, "sparse"), "raw"),
    }
    out = io.BytesIO()
    writer = vma.VmaWriter(out)
    writer.add_config("qemu-server.conf", b"name: test\n")
    assemblers: dict[str, ClusterAssembler] = {}
    sources: dict[str, tuple[Path, str]] = {}
    for n, (name, (raw, fmt)) in enumerate(disks.items()):
        size = raw.stat().st_size
        dev_id = writer.add_device(name, size)
        assemblers[name] = ClusterAssembler(writer, dev_id, size, name=name)
        src = raw if fmt == "raw" else to_qcow2(str(qemu.img), raw, tmp_path / f"{n}.qcow2")
        sources[f"disk{n}"] = (src, fmt)
    exports = [Export(name, a.size, a) for name, a in assemblers.items()]
    async with NbdServer(sockdir / "nbd.sock", exports, name="e2e") as server:
        async with paused_qemu(qemu, sockdir, sources) as qmp:
            for n, name in enumerate(disks):
                await backup_to_nbd(qmp, f"disk{n}", str(server.path), name, job=f"j{n}")
        server.check()
    for a in assemblers.values():
        a.finish()
    writer.close()

    out.seek(0)
    reader = vma.VmaReader(out)
    by_name = {d.name: d for d in reader.devices.values()}
    images = {dev_id: bytearray(d.size) for dev_id, d in reader.devices.items()}
    for cluster in reader.clusters():
        if cluster.data is not None:
            image = images[cluster.dev_id]
            start = cluster.cluster_num * CLUSTER_SIZE
            image[start:start + CLUSTER_SIZE] = cluster.data[:len(image) - start]
    for name, (raw, _fmt) in disks.items():
        assert bytes(images[by_name[name].dev_id]) == raw.read_bytes(), name
