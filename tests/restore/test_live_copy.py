"""The export's record of failed reads, which a failed live copy names (QEMU itself reports only EIO)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.errors import QmpBackupError
from qmpbackup.restore.live_copy import JOB_PREFIX, ReadFailures, copy_disks
from qmpbackup.restore.live_state import Target
from qmpbackup.restore.qcow2 import create_qcow2
from qmpbackup.vma.index import ArchiveIndex, DataChecksumError
from qmpbackup.vma.random_access import ArchiveDevices
from tests.restore.helpers import Disk, config_text, make_image, vma_create


def _damaged(tmp_path: Path, compress: str) -> tuple[Path, int, int]:
    """An archive of one random disk with one byte flipped in a full cluster; (archive, cluster, data offset)."""
    disk = Disk("scsi0", make_image(tmp_path / "scsi0.raw", 4 << 20, 7), 4 << 20)
    archive = vma_create(tmp_path / ("a.vma" + (".zst" if compress == "zstd" else "")), [disk],
                         config_text([disk]), compress)
    with ArchiveIndex.open(archive) as index:
        dev = index.devices[0]
        cluster = next(c for c in range(dev.clusters - 1, 0, -1) if index.record(dev, c).mask == 0xFFFF)
        offset = index.record(dev, cluster).data_offset
        at = offset + 1000 if compress == "none" else index.frame(index.frame_at(offset))[0] + 100
    with open(archive, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    return archive, cluster, offset


def test_a_digest_failure_is_named_as_verify_names_it(tmp_path: Path) -> None:
    archive, cluster, offset = _damaged(tmp_path, "none")
    failures = ReadFailures()
    with ArchiveDevices.open(archive) as devices:
        source = failures.watch(devices.devices[0])
        source.pieces(0, 65536)  # good reads leave no record
        assert failures.of("drive-scsi0") is None
        with pytest.raises(DataChecksumError):
            source.pieces((cluster - 2) << 16, 3 << 16)
    assert failures.of("drive-scsi0") == (f"data checksum mismatch in drive-scsi0 cluster {cluster} "
                                          f"(byte offset {offset})")


def test_a_damaged_zstd_frame_is_named_by_its_first_bad_cluster(tmp_path: Path) -> None:
    archive, cluster, _ = _damaged(tmp_path, "zstd")
    failures = ReadFailures()
    with ArchiveDevices.open(archive) as devices, pytest.raises(QmpBackupError):
        failures.watch(devices.devices[0]).pieces(cluster << 16, 1 << 16)
    named = failures.of("drive-scsi0")
    assert named is not None and "in drive-scsi0 cluster " in named, named


class _FakeQemu:
    """Just enough QMP for the copy's decisions (the real jobs run in test_live_restore.py): one
    disk on its overlay whose mirror turns ready at once and completes when told."""

    def __init__(self, fail_on: str | None = None, *, pivoted: bool = False) -> None:
        self.calls: list[str] = []
        self.running = not pivoted
        self._pivoted = pivoted
        self._fail_on = fail_on
        self._events: list[dict[str, Any]] = []

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        self.calls.append(command)
        if command == self._fail_on:
            raise QmpBackupError(f"{command} refused")
        if command == "query-block":
            return [{"device": "drive-scsi0", "inserted": {} if self._pivoted else {"backing_file": "json:{}"}}]
        if command == "blockdev-mirror":
            self._events.append({"event": "BLOCK_JOB_READY", "data": {"device": JOB_PREFIX + "drive-scsi0"}})
        if command == "block-job-complete":
            assert not self.running, "the pivot must happen with the VM paused"
            self._events.append({"event": "BLOCK_JOB_COMPLETED", "data": {"device": JOB_PREFIX + "drive-scsi0"}})
        if command == "query-status":
            return {"running": self.running}
        if command in ("stop", "cont"):
            self.running = command == "cont"
        return [] if command.startswith("query-") else {}

    @contextlib.asynccontextmanager
    async def events(self, names: object) -> AsyncIterator[_FakeQemu]:
        yield self

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        while self._events:
            event = self._events.pop(0)
            if predicate(event):
                return event
        raise QmpBackupError("no event")


def _target(tmp_path: Path) -> Target:
    image = tmp_path / "vm-100-disk-0.qcow2"
    create_qcow2(image, 1 << 20)
    return Target(image, 1 << 20, "drive-scsi0", False)


def test_the_fresh_image_takes_the_name_after_the_pivot_with_the_vm_paused(tmp_path: Path) -> None:
    qemu, target = _FakeQemu(), _target(tmp_path)
    marker = tmp_path / "paused"
    asyncio.run(copy_disks(qemu, {"drive-scsi0": target}, 0, 0.0, ReadFailures(), marker))  # type: ignore[arg-type]
    assert qemu.calls.index("stop") < qemu.calls.index("block-job-complete") < qemu.calls.index("cont")
    assert qemu.running and not marker.exists()
    assert [p.name for p in tmp_path.glob("*vm-100-disk-0*")] == ["vm-100-disk-0.qcow2"]  # the hidden name is gone


def test_a_failure_once_the_vm_runs_pauses_it_and_keeps_the_image(tmp_path: Path) -> None:
    qemu, target = _FakeQemu(fail_on="blockdev-mirror"), _target(tmp_path)
    marker = tmp_path / "paused"
    before = target.final.read_bytes()
    with pytest.raises(QmpBackupError, match="blockdev-mirror refused"):
        asyncio.run(copy_disks(qemu, {"drive-scsi0": target}, 0, 0.0, ReadFailures(), marker))  # type: ignore[arg-type]
    assert not qemu.running and marker.exists()  # --resume continues it
    assert target.final.read_bytes() == before  # the image's name still holds the overlay


def test_resume_names_a_pivoted_copy_before_the_vm_runs_again(tmp_path: Path) -> None:
    """A run killed between QEMU's pivot and the rename: the VM paused, the copy under its hidden name."""
    qemu, target = _FakeQemu(pivoted=True), _target(tmp_path)
    hidden = tmp_path / ".vm-100-disk-0.qcow2.live-target"
    hidden.write_bytes(b"the copy")
    marker = tmp_path / "paused"
    marker.touch()
    asyncio.run(copy_disks(qemu, {"drive-scsi0": target}, 0, 0.0, ReadFailures(), marker))  # type: ignore[arg-type]
    assert target.final.read_bytes() == b"the copy" and not hidden.exists()
    assert qemu.calls[-1] == "cont" and qemu.running and not marker.exists()
