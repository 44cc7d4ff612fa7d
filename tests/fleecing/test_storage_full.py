"""A fleecing storage that fills during the backup: the guest's writes all succeed, the snapshot
breaks (its reads fail), and teardown leaves the original graph and no fleecing file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fleecing.drives import Fleecing
from fleecing.errors import SnapshotBrokenError
from fleecing.probe import probe_directory
from qmpbackup.nbd.client import NbdClient, NbdClientError
from tests.fleecing.conftest import MiB, VMID, LoopFs, WorldFactory, dir_storage, random_disk
from tests.fleecing.helpers import backup_node_to_file, expect_pattern, guest_write
from tests.support.qemu import DriveSpec

pytestmark = pytest.mark.qemu


async def test_full_fleecing_storage_breaks_the_snapshot_not_the_guest(
        world: WorldFactory, loopfs: Callable[[str, int], LoopFs], tmp_path: Path) -> None:
    size = 32 * MiB
    fs = loopfs("ext4", 8 * MiB)
    free = probe_directory(fs.mountpoint).free_bytes
    assert free < 8 * MiB
    src = random_disk(tmp_path / "disk.raw", size)
    expected = bytearray(src.read_bytes())
    async with world([DriveSpec(src, bus="scsi", style="blockdev", dev_id="scsi0", node_name="disk0")]) as w:
        original = await w.graph()
        plan = await w.plan(dir_storage(fs.mountpoint, extra="\tpreallocation off\n"))
        assert any("backup fails (the guest does not)" in warning for warning in plan.warnings)
        disk = w.disks["scsi0"]
        fl = Fleecing(w.session, w.journal, w.caps, VMID, [disk], plan, rundir=w.rundir,
                      qemu_img=str(w.qemu.img), reclaim=False)
        await fl.prepare()
        await fl.insert()
        image = Path(fl.drives["scsi0"].image.path)
        writes = 0
        for off in range(0, 24 * MiB, MiB):  # far more old data than the storage can hold
            await guest_write(w.session, disk.qdev, 0x77, off, MiB)
            expect_pattern(expected, 0x77, off, MiB)
            writes += 1
        out = w.vm.stderr()  # qemu-io reports on QEMU's stdout (the test VM sends it there)
        assert out.count("wrote 1048576/1048576 bytes") == writes, out
        assert "failed" not in out
        # the snapshot is broken: a backup job reading it fails, and so does a plain read
        event = await backup_node_to_file(w.session, fl.drives["scsi0"].read_node, tmp_path / "copy.raw", size)
        assert event.get("error"), event
        broken = fl.broken("scsi0", str(event["error"]))
        assert isinstance(broken, SnapshotBrokenError)
        assert "storage full" in str(broken) and "guest writes were not affected" in str(broken)
        await w.session.execute("nbd-server-start", {"addr": {"type": "unix",
                                                              "data": {"path": str(w.rundir / "r.sock")}}})
        await w.session.execute("block-export-add", {"type": "nbd", "id": "ro", "node-name":
                                                     fl.drives["scsi0"].read_node, "name": "ro"})
        client = await NbdClient.connect(str(w.rundir / "r.sock"), "ro")
        with pytest.raises(NbdClientError) as e:
            await client.read(30 * MiB, 65536)
        assert e.value.errno is not None
        await client.close()
        await w.session.execute("block-export-del", {"id": "ro", "mode": "hard"})
        await w.session.execute("nbd-server-stop")
        await fl.teardown()
        assert await w.graph() == original
        assert not image.exists()
        assert not list(fs.mountpoint.rglob("vm-*"))
        await guest_write(w.session, disk.qdev, 0x78, 31 * MiB, 4096)
        expect_pattern(expected, 0x78, 31 * MiB, 4096)
        await w.session.execute("quit")
        w.vm.proc.wait(10)
    assert src.read_bytes() == bytes(expected), "every guest write reached the disk"
