"""Space reclaim: the TRIM path's alignment rules (no QEMU), and fleecing space really falling
during a backup through the engine's own block-job layer (each QEMU version)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleecing.drives import Fleecing
from fleecing.errors import FleecingError
from fleecing.probe import allocated_bytes
from fleecing.reclaim import BLOCK, ReclaimState, TrimReclaimer, copy_granularity, job_extra, needs_trim_path
from fleecing.storage import plan_fleecing
from qmpbackup.backup.blockjobs import BlockJobs, attach_targets, detach_targets, plan_block_jobs
from qmpbackup.errors import QmpBackupError
from qmpbackup.nbd import Export, NbdServer
from tests.fleecing.conftest import MiB, VMID, LoopFs, WorldFactory, dir_storage, random_disk
from tests.fleecing.helpers import FileConsumer, guest_write
from tests.support.qemu import DriveSpec


class FakeClient:
    def __init__(self) -> None:
        self.trims: list[tuple[int, int]] = []

    async def trim(self, offset: int, length: int) -> None:
        self.trims.append((offset, length))

    async def close(self) -> None:
        pass


def reclaimer(size: int, alignment: int) -> tuple[TrimReclaimer, FakeClient]:
    graph = SimpleNamespace(session=None, journal=None, disk=SimpleNamespace(size=size, key="scsi0"),
                            names=SimpleNamespace(snaptrim="x"), vmid=VMID)
    r = TrimReclaimer(graph, None)  # type: ignore[arg-type]
    r.set_alignment(alignment)
    client = FakeClient()
    r.trim_through(client)
    return r, client


async def test_trims_only_whole_aligned_units() -> None:
    r, c = reclaimer(8 * MiB, MiB)
    await r.received(0, 512 * 1024)
    await r.received(MiB + 64 * 1024, 960 * 1024)  # unit 1 lacks its first block
    await r.flush()
    assert c.trims == []
    await r.received(512 * 1024, 512 * 1024)
    await r.received(MiB, 64 * 1024)
    await r.received(3 * MiB, MiB)
    await r.flush()
    assert c.trims == [(0, 2 * MiB), (3 * MiB, MiB)]
    await r.received(3 * MiB, MiB)  # received twice: trimmed once
    await r.flush()
    assert c.trims == [(0, 2 * MiB), (3 * MiB, MiB)]


async def test_partial_blocks_and_disk_tail() -> None:
    size = 3 * MiB + 4608  # the last unit is short; only it may end unaligned
    r, c = reclaimer(size, MiB)
    await r.received(4096, 3 * MiB - 4096)  # first 64 KiB block only partly covered: not counted
    await r.received(3 * MiB, 4608)
    await r.flush()
    assert c.trims == [(MiB, 2 * MiB + 4608)]  # merged; ends exactly at the disk end
    await r.received(0, 4096)  # a block is counted only when one range covers it (conservative)
    await r.flush()
    assert (0, MiB) not in c.trims
    await r.received(0, 64 * 1024)
    await r.flush()
    assert (0, MiB) in c.trims
    for off, length in c.trims:
        assert off % MiB == 0 and (length % MiB == 0 or off + length == size)


async def test_trim_task_merges_and_refuses_bad_alignment() -> None:
    r, c = reclaimer(64 * MiB, BLOCK)
    r.start_trimming()
    try:
        for off in range(0, 3 * MiB, MiB):  # arrives before the task runs: one merged TRIM
            await r.received(off, MiB)
        assert c.trims == []  # the data path never waits for a TRIM
        await asyncio.sleep(0.01)
        assert c.trims == [(0, 3 * MiB)]
        await r.received(5 * MiB, MiB)
        await asyncio.sleep(0.01)
        assert c.trims == [(0, 3 * MiB), (5 * MiB, MiB)]
    finally:
        await r.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("trim-")], "close ends the TRIM task"
    assert r.state is ReclaimState.CLOSED
    with pytest.raises(FleecingError):
        r.set_alignment(4096)


@pytest.mark.qemu
@pytest.mark.parametrize(("where", "cluster"), [("tmp", 64 * 1024), ("tmp", MiB), ("ext4", 64 * 1024),
                                                ("xfs", 64 * 1024), ("btrfs", 64 * 1024)],
                         ids=["tmp-64k", "tmp-1M", "ext4-64k", "xfs-64k", "btrfs-64k"])
async def test_space_falls_during_backup(world: WorldFactory, loopfs: Callable[[str, int], LoopFs],
                                         tmp_path: Path, where: str, cluster: int) -> None:
    size = 32 * MiB
    src = random_disk(tmp_path / "disk.raw", size)
    before = src.read_bytes()
    if where == "tmp":
        store = tmp_path / "store"
        store.mkdir()
    else:
        store = loopfs(where, 64 * MiB).mountpoint
    async with world([DriveSpec(src, bus="scsi", style="blockdev", dev_id="scsi0", node_name="disk0")]) as w:
        storage = dir_storage(store, extra="\tpreallocation off\n")
        plan = await plan_fleecing(storage, [size], cluster_size=cluster)
        disk = w.disks["scsi0"]
        fl = Fleecing(w.session, w.journal, w.caps, VMID, [disk], plan, rundir=w.rundir, qemu_img=str(w.qemu.img))
        await fl.prepare()
        if needs_trim_path(w.caps):  # 7.2 shows the filter's copy bitmap (10.0 hides it, and aligns itself)
            assert await copy_granularity(w.session, disk.top_node) == cluster
        await fl.insert()
        extra = fl.job_extra()["scsi0"]
        assert extra == job_extra(w.caps, cluster)
        if w.caps.has_backup_min_cluster_size and cluster > 64 * 1024:
            assert extra["x-perf"] == {"min-cluster-size": cluster}
        image = fl.drives["scsi0"].image.path
        for off in range(0, size, 2 * MiB):  # the guest overwrites half the disk
            await guest_write(w.session, disk.qdev, 0x5A, off, MiB)
        await w.session.execute("human-monitor-command", {"command-line": "info version"})
        peak = allocated_bytes(image)
        assert peak >= 16 * MiB
        samples: list[int] = []
        consumer = FileConsumer(tmp_path / "received.raw", size, rate_bps=32 * MiB)
        jobs = plan_block_jobs(VMID, fl.sources())
        server = NbdServer(tmp_path / "nbd.sock", [Export(j.export, j.size, fl.consumer(j.key, consumer))
                                                    for j in jobs], name="test")
        await server.start()
        try:
            await attach_targets(w.session, w.journal, jobs, server.path, w.caps)

            async with BlockJobs(w.session, w.journal, jobs, w.caps, limit_bps=0, max_workers=None) as block_jobs:
                await block_jobs.start(job_args=fl.job_extra())
                async for _ in block_jobs.progress():
                    samples.append(allocated_bytes(image))
            assert bool(fl.reclaimers) == needs_trim_path(w.caps)
            for r in fl.reclaimers.values():
                assert r.alignment == cluster
                await r.flush()
            after = allocated_bytes(image)
            await detach_targets(w.session, w.journal, jobs)
            await server.wait_disconnected(jobs[0].export, 10)
        finally:
            await server.close()
            consumer.close()
        server.check()
        assert (tmp_path / "received.raw").read_bytes() == before
        assert after < peak / 4, f"fleecing image {peak} -> {after} bytes (samples {samples})"
        await fl.teardown()
        assert not os.path.exists(image)


@pytest.mark.qemu
async def test_busy_nbd_server_means_no_reclaim_not_no_backup(world: WorldFactory, tmp_path: Path) -> None:
    src = random_disk(tmp_path / "disk.raw", 4 * MiB)
    async with world([DriveSpec(src, bus="virtio", style="blockdev", dev_id="virtio0", node_name="disk0")]) as w:
        if not needs_trim_path(w.caps):
            pytest.skip(f"QEMU {w.caps.version_text} reclaims with discard-source")
        await w.session.execute("nbd-server-start", {"addr": {"type": "unix",
                                                              "data": {"path": str(w.rundir / "theirs.sock")}}})
        fl = await w.fleecing(tmp_path / "store")
        await fl.prepare()
        await fl.insert()
        assert not fl.reclaimers and any("not reclaimed" in m for m in fl.warnings)
        await fl.teardown()
        assert not w.journal.pending()
        # their server is still running: starting another one fails
        with pytest.raises(QmpBackupError, match="already running"):
            await w.session.execute("nbd-server-start", {"addr": {"type": "unix",
                                                                  "data": {"path": str(w.rundir / "x.sock")}}})


@pytest.mark.qemu
async def test_a_trim_node_left_by_an_earlier_run_means_no_reclaim_and_stays(world: WorldFactory,
                                                                             tmp_path: Path) -> None:
    """A node under the trim node's name (an earlier run's, its journal lost) is refused before anything
    is recorded for it: the drive is backed up without reclaim, and no teardown deletes the node as ours."""
    from fleecing.graph import DriveNames

    src = random_disk(tmp_path / "disk.raw", 4 * MiB)
    async with world([DriveSpec(src, bus="virtio", style="blockdev", dev_id="virtio0", node_name="disk0")]) as w:
        if not needs_trim_path(w.caps):
            pytest.skip(f"QEMU {w.caps.version_text} reclaims with discard-source")
        (key,) = w.disks
        leftover = DriveNames.of(VMID, key).snaptrim
        await w.session.execute("blockdev-add", {"driver": "null-co", "node-name": leftover, "size": 4 * MiB})
        fl = await w.fleecing(tmp_path / "store")
        await fl.prepare()
        await fl.insert()
        assert not fl.reclaimers and any("already exists" in m for m in fl.warnings), fl.warnings
        await fl.teardown()
        assert not w.journal.pending()
        nodes = {n["node-name"] for n in await w.session.execute("query-named-block-nodes", {"flat": True})}
        assert leftover in nodes, "not ours to delete: cleanup's by-name pass removes it"
