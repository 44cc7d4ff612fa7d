"""The per-drive graph on real QEMU: point in time, teardown to the original graph, idempotence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleecing.drives import Fleecing
from fleecing.graph import GraphState, set_device_node
from qmpbackup.recovery.kinds import DRIVE_FILTER, FLEECING_IMAGE
from qmpbackup.recovery.replay import Sessions, replay
from tests.fleecing.conftest import MiB, VMID, WorldFactory, dir_storage, random_disk
from tests.fleecing.helpers import backup_node_to_file, expect_pattern, guest_write
from tests.support.qemu import DriveSpec

pytestmark = pytest.mark.qemu

SIZE = 8 * MiB


@pytest.mark.parametrize("style", ["drive", "blockdev"])
async def test_point_in_time_and_teardown(world: WorldFactory, tmp_path: Path, style: str) -> None:
    src = random_disk(tmp_path / "disk.raw", SIZE)
    before = src.read_bytes()
    drives = [DriveSpec(src, bus="scsi", style=style, dev_id="scsi0", node_name="disk0")]
    async with world(drives) as w:
        original = await w.graph()
        storage = dir_storage(tmp_path / "store")
        (tmp_path / "store").mkdir()
        plan = await w.plan(storage)
        fl = Fleecing(w.session, w.journal, w.caps, VMID, list(w.disks.values()), plan, rundir=w.rundir,
                      qemu_img=str(w.qemu.img), reclaim=False)
        await fl.prepare()
        assert await w.graph() != original
        assert [d for d in (await w.graph())["devices"]] == original["devices"], "prepare changes no device"
        await fl.insert()
        disk = w.disks["scsi0"]
        drive = fl.drives["scsi0"]
        assert drive.state is GraphState.INSERTED
        nodes = {n["node-name"]: n for n in await w.session.execute("query-named-block-nodes", {"flat": True})}
        assert nodes[drive.names.fleece]["cache"]["no-flush"] is True  # a throw-away image: no fsync stalls
        assert nodes[drive.names.cbw]["drv"] == "copy-before-write"
        image = Path(drive.image.path)
        assert image.name == f"vm-{VMID}-fleece-0.qcow2" and image.parent == tmp_path / "store/images/100"
        # guest writes after the snapshot point
        expected_now = bytearray(before)
        for pattern, off, length in ((0xAB, 0, MiB), (0xCD, 5 * MiB + 4096, 4096), (0xEF, SIZE - 64 * 1024, 65536)):
            await guest_write(w.session, disk.qdev, pattern, off, length)
            expect_pattern(expected_now, pattern, off, length)
        assert "wrote 65536/65536" in w.vm.stderr()
        # the snapshot still shows the disk as it was
        copy = tmp_path / "snapshot.raw"
        event = await backup_node_to_file(w.session, drive.read_node, copy, SIZE)
        assert event["event"] == "BLOCK_JOB_COMPLETED" and "error" not in event, event
        assert copy.read_bytes() == before
        assert os.stat(image).st_blocks > 0, "old data went into the fleecing image"
        await fl.teardown()
        assert await w.graph() == original
        assert not image.exists()
        assert not w.journal.pending()
        await fl.teardown()  # twice is fine
        # the device writes into the disk again, and the disk has every guest write
        await guest_write(w.session, disk.qdev, 0x11, 2 * MiB, 4096)
        expect_pattern(expected_now, 0x11, 2 * MiB, 4096)
        await w.session.execute("quit")
        w.vm.proc.wait(10)
        assert src.read_bytes() == bytes(expected_now)


async def test_qom_set_to_current_node_is_never_sent(world: WorldFactory, tmp_path: Path) -> None:
    src = random_disk(tmp_path / "disk.raw", SIZE)
    async with world([DriveSpec(src, bus="virtio", style="blockdev", dev_id="virtio0", node_name="disk0")]) as w:
        disk = w.disks["virtio0"]
        assert await set_device_node(w.session, disk.qdev, disk.qom_path, disk.top_node) is False
        assert (await w.session.execute("query-status"))["status"] == "prelaunch"  # QEMU still alive


async def test_unwind_after_partial_build_restores(world: WorldFactory, tmp_path: Path) -> None:
    """A run that stopped anywhere (here: after insert) is undone by the journal alone, twice."""
    src = random_disk(tmp_path / "disk.raw", SIZE)
    drives = [DriveSpec(src, bus="virtio", style="drive", dev_id="virtio0"),
              DriveSpec(random_disk(tmp_path / "d1.raw", 4 * MiB, seed=3), bus="scsi", dev_id="scsi1")]
    async with world(drives) as w:
        original = await w.graph()
        fl = await w.fleecing(tmp_path / "store")
        await fl.prepare()
        await fl.insert()
        kinds = [e.kind for e in w.journal.pending()]
        assert kinds.count(FLEECING_IMAGE.name) == 2 and kinds.count(DRIVE_FILTER.name) == 2
        names = sorted(d.image.name for d in fl.drives.values())
        assert names == [f"vm-{VMID}-fleece-0.qcow2", f"vm-{VMID}-fleece-1.qcow2"]
        sessions = Sessions(VMID, w.session)
        assert await replay(w.journal, sessions) == []
        assert await w.graph() == original
        assert not list((tmp_path / "store/images/100").iterdir())
        assert await replay(w.journal, sessions) == []


async def test_cbw_bitmap_limits_the_snapshot_to_dirty_areas(world: WorldFactory, tmp_path: Path) -> None:
    """With the job's bitmap on the filter, only dirty areas are kept (and readable): incremental."""
    from qmpbackup.nbd.client import NbdClient, NbdClientError

    src = random_disk(tmp_path / "disk.raw", SIZE)
    before = src.read_bytes()
    async with world([DriveSpec(src, bus="scsi", style="blockdev", dev_id="scsi0", node_name="disk0")]) as w:
        disk = w.disks["scsi0"]
        await w.session.execute("block-dirty-bitmap-add", {"node": disk.top_node, "name": "bm0"})
        await guest_write(w.session, disk.qdev, 0x01, 0, 65536)  # dirty: cluster 0
        await w.session.execute("block-dirty-bitmap-disable", {"node": disk.top_node, "name": "bm0"})
        before = bytes([1]) * 65536 + before[65536:]
        fl = await w.fleecing(tmp_path / "store", bitmaps={"scsi0": {"node": disk.top_node, "name": "bm0"}},
                              reclaim=False)
        await fl.prepare()
        await fl.insert()
        await guest_write(w.session, disk.qdev, 0x02, 0, 65536)
        sock = w.rundir / "e.sock"
        await w.session.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        await w.session.execute("block-export-add", {"type": "nbd", "id": "e", "name": "e",
                                                     "node-name": fl.drives["scsi0"].read_node})
        client = await NbdClient.connect(str(sock), "e")
        try:
            assert await client.read(0, 65536) == before[:65536]
            with pytest.raises(NbdClientError):
                await client.read(MiB, 65536)  # not in the bitmap: not part of this snapshot
        finally:
            await client.close()
        await w.session.execute("nbd-server-stop")
        await fl.teardown()
        assert not w.journal.pending()


async def test_a_node_left_by_an_earlier_run_is_never_journaled_as_ours(world: WorldFactory, tmp_path: Path) -> None:
    """A node under our name that already exists (an earlier run's, its journal lost) makes prepare fail
    before anything is recorded for it: teardown and the journal never delete it as this run's."""
    from fleecing.errors import GraphError
    from fleecing.graph import DriveNames

    src = random_disk(tmp_path / "disk.raw", SIZE)
    async with world([DriveSpec(src, bus="scsi", style="blockdev", dev_id="scsi0", node_name="disk0")]) as w:
        leftover = DriveNames.of(VMID, "scsi0").fleece_file
        await w.session.execute("blockdev-add", {"driver": "null-co", "node-name": leftover, "size": SIZE})
        fl = await w.fleecing(tmp_path / "store", reclaim=False)
        with pytest.raises(GraphError, match="already exists"):
            await fl.prepare()
        assert not [e for e in w.journal.pending() if e.data.get("node") == leftover]
        await fl.teardown()
        assert await replay(w.journal, Sessions(VMID, w.session)) == []
        nodes = {n["node-name"] for n in await w.session.execute("query-named-block-nodes", {"flat": True})}
        assert leftover in nodes, "not ours to delete: cleanup's by-name pass removes it"
        assert not list((tmp_path / "store/images/100").iterdir())
