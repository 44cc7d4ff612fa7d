"""The fleecing hook of the incremental plan, on real QEMU (QMP level, a file as job target).

The graph is built by hand as fleecing/graph.py builds it, in the fleecing package's order (the
filter is added first, the snapshot point comes later): the new bitmap starts before the
snapshot point, the job reads the snapshot-access node through a frozen copy of the base.
The target file must then hold exactly the clusters changed before the snapshot point,
with their content at that point, including a cluster changed between the filter's
creation and the snapshot point.

That last write is why the filter must not get the base bitmap in this order: QEMU copies
the bitmap when the filter opens, so such a cluster is neither copied before write nor
readable from the snapshot, and the job fails (the second test proves it).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.backup.incremental import DriveDecision, IncrementalPlan, remove_bitmap
from qmpbackup.recovery.journal import Journal
from qmpbackup.qemu.session import QmpSession
from tests.support.backup import make_image
from tests.support.qemu import DriveSpec, QemuBinaries

pytestmark = pytest.mark.qemu

MiB = 1 << 20
C = 65536
NODE = "drive-scsi0"
SIZE = 8 * MiB


async def _hmp_write(session: QmpSession, offset: int, length: int, pattern: int) -> None:
    out = await session.execute("human-monitor-command",
                                {"command-line": f'qemu-io -d scsi0 "write -P {pattern} {offset} {length}"'})
    assert not str(out).startswith("Error"), out


async def _bitmaps(session: QmpSession, node: str) -> dict[str, dict[str, Any]]:
    for n in await session.execute("query-named-block-nodes", {"flat": True}):
        if n["node-name"] == node:
            return {b["name"]: b for b in n.get("dirty-bitmaps") or () if "name" in b}
    return {}


async def _wait_job(session: QmpSession, job: str) -> str | None:
    """Waits until the job concluded; its error, if any."""
    async with asyncio.timeout(30):
        while True:
            jobs = {j["id"]: j for j in await session.execute("query-jobs")}
            if jobs[job]["status"] == "concluded":
                await session.execute("job-dismiss", {"id": job})
                return jobs[job].get("error")
            await asyncio.sleep(0.05)


async def _run(qemu: QemuBinaries, qemu_vm: Any, tmp_path: Path, *, cbw_bitmap: bool) -> tuple[bytes, str | None]:
    """The incremental job's target file, and the job's error (None: it succeeded)."""
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.qcow2", "qcow2", SIZE, [(0x10, 0, SIZE)])
    fleece = tmp_path / "fleece.qcow2"
    target = tmp_path / "target.raw"
    subprocess.run([str(qemu.img), "create", "-q", "-f", "qcow2", str(fleece), str(SIZE)], check=True)
    subprocess.run([str(qemu.img), "create", "-q", "-f", "raw", str(target), str(SIZE)], check=True)
    vm = qemu_vm([DriveSpec(disk, bus="scsi", fmt="qcow2", style="blockdev", dev_id="scsi0",
                            drive_id="drive-scsi0", node_name=NODE)])
    journal = Journal.open(tmp_path / "journal.jsonl")
    base, new = "qmpbackup-100-scsi0-bitmap-" + "a" * 32, "qmpbackup-100-scsi0-bitmap-" + "b" * 32
    async with QmpSession("100", vm.qmp_path) as s:
        await s.execute("block-dirty-bitmap-add", {"node": NODE, "name": base, "granularity": C})
        await _hmp_write(s, 1 * MiB, 4096, 0x21)  # changed before the snapshot point
        await _hmp_write(s, 3 * MiB, 2 * C, 0x22)
        plan = IncrementalPlan(100, None, [DriveDecision("scsi0", NODE, SIZE, new, False, base)])

        await plan.start_bitmaps(s, journal)
        assert plan.actions() == [], "the bitmaps started already"
        await s.execute("blockdev-add", {"driver": "qcow2", "node-name": "fl0",
                                         "file": {"driver": "file", "filename": str(fleece)}})
        cbw: dict[str, Any] = {"driver": "copy-before-write", "node-name": "cbw0", "file": NODE, "target": "fl0"}
        if cbw_bitmap:
            cbw["bitmap"] = plan.cbw_bitmap("scsi0")
        await s.execute("blockdev-add", cbw)
        await _hmp_write(s, 6 * MiB, C, 0x23)  # changed after the filter was added, before the point
        await s.execute("qom-set", {"path": "/machine/peripheral/scsi0", "property": "drive", "value": "cbw0"})
        await s.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "snap0", "file": "cbw0"})
        await plan.bind_snapshots(s, journal, {"scsi0": "snap0"})

        await _hmp_write(s, 1 * MiB, C, 0x31)  # after the point: changed area, must not show
        await _hmp_write(s, 5 * MiB, C, 0x32)  # after the point: unchanged area
        await s.execute("blockdev-add", {"driver": "raw", "node-name": "tgt0",
                                         "file": {"driver": "file", "filename": str(target)}})
        args = {"job-id": "inc0", "device": "snap0", "target": "tgt0", "auto-dismiss": False,
                **plan.job_args()["scsi0"]}
        await s.execute("blockdev-backup", args)
        error = await _wait_job(s, "inc0")
        await s.execute("blockdev-del", {"node-name": "tgt0"})
        await s.execute("blockdev-del", {"node-name": "snap0"})
        await s.execute("qom-set", {"path": "/machine/peripheral/scsi0", "property": "drive", "value": NODE})
        await s.execute("blockdev-del", {"node-name": "cbw0"})
        await s.execute("blockdev-del", {"node-name": "fl0"})

        bitmaps = await _bitmaps(s, NODE)
        assert bitmaps[base]["count"] >= 4 * C, "the base is untouched by the job (bitmap-mode never)"
        assert bitmaps[new]["count"] >= 3 * C, "the new bitmap saw the writes after it started"
        if error is None:
            assert await plan.commit(s, journal) == []
            assert set(await _bitmaps(s, NODE)) == {new}
            assert journal.pending() == []
            await remove_bitmap(s, NODE, new)
    journal.close()
    return target.read_bytes(), error


async def test_fleecing_incremental_copies_exactly_the_changes_at_the_snapshot_point(
        qemu: QemuBinaries, qemu_vm: Any, tmp_path: Path) -> None:
    data, error = await _run(qemu, qemu_vm, tmp_path, cbw_bitmap=False)
    assert error is None
    expected = bytearray(SIZE)  # clusters the job did not copy stay zero in the target
    expected[1 * MiB:1 * MiB + C] = b"\x10" * C
    expected[1 * MiB:1 * MiB + 4096] = b"\x21" * 4096
    expected[3 * MiB:3 * MiB + 2 * C] = b"\x22" * (2 * C)
    expected[6 * MiB:6 * MiB + C] = b"\x23" * C
    assert data == bytes(expected), json.dumps(
        [i * C for i in range(SIZE // C) if data[i * C:(i + 1) * C] != expected[i * C:(i + 1) * C]])


async def test_base_bitmap_on_a_filter_added_before_the_snapshot_point_breaks_the_job(
        qemu: QemuBinaries, qemu_vm: Any, tmp_path: Path) -> None:
    _, error = await _run(qemu, qemu_vm, tmp_path, cbw_bitmap=True)
    assert error is not None  # the cluster changed in between is not readable from the snapshot
