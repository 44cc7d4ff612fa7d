"""Fleecing as a feature of one guest's backup run, handed in by the job layer.

It has the shape of :class:`qmpbackup.backup.features.Feature` without importing it (this
package never imports the backup engine): the run calls :meth:`FleecingFeature.attach`
before its freeze/pause window, :meth:`FleecingFeature.at_snapshot_point` inside it right
before the block jobs' transaction, and :meth:`FleecingFeature.teardown` on every way out.
The block jobs read each drive's snapshot-access node instead of the disk, so this feature
takes the point in time: the device is moved onto the copy-before-write filter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fleecing.drives import Fleecing
from fleecing.errors import SnapshotBrokenError
from fleecing.runner import Runner, run_command
from fleecing.storage import plan_fleecing
from qmpbackup.jobs.storage_cfg import Storage
from qmpbackup.nbd.export import ExportConsumer
from qmpbackup.qemu.capabilities import Capabilities
from qmpbackup.qemu.discovery import Disk
from qmpbackup.qemu.session import QmpSession
from qmpbackup.recovery.journal import Journal


class RunLog(Protocol):
    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...


class RunView(Protocol):
    """What fleecing reads from the run (a ``qmpbackup.backup.features.RunContext``)."""

    @property
    def vmid(self) -> int: ...

    @property
    def session(self) -> QmpSession: ...

    @property
    def journal(self) -> Journal: ...

    @property
    def caps(self) -> Capabilities: ...

    @property
    def disks(self) -> Sequence[Disk]: ...

    @property
    def rundir(self) -> Path: ...

    @property
    def running(self) -> bool: ...

    @property
    def log(self) -> RunLog: ...


class FleecingFeature:
    """Copy-before-write into images on ``storage`` while the block jobs read a snapshot."""

    def __init__(self, storage: Storage, *, runner: Runner = run_command, qemu_img: str = "qemu-img") -> None:
        self.storage = storage
        self.runner, self.qemu_img = runner, qemu_img
        self.fleecing: Fleecing | None = None

    async def attach(self, run: RunView) -> Mapping[str, str]:
        """Checks before any change in QEMU, then images, fleecing nodes and filters (the guest
        sees nothing yet). Returns the snapshot node each drive's block job reads."""
        if not run.disks:
            return {}
        if not run.running:
            run.log.info("fleecing not used: the guest does not run during the backup")
            return {}
        plan = await plan_fleecing(self.storage, [d.size for d in run.disks], self.runner)
        fleecing = self.fleecing = Fleecing(run.session, run.journal, run.caps, run.vmid, run.disks, plan,
                                            rundir=run.rundir, runner=self.runner, qemu_img=self.qemu_img)
        for warning in fleecing.warnings:
            run.log.warn(warning)
        for disk in run.disks:
            run.log.info(f"drive-{disk.key}: attaching fleecing image on storage '{plan.storeid}' to QEMU")
        await fleecing.prepare()
        return {key: node for key, node, _size in fleecing.sources()}

    def actions(self) -> list[dict[str, Any]]:
        return []

    def job_args(self) -> Mapping[str, Mapping[str, Any]]:
        return self.fleecing.job_extra() if self.fleecing is not None else {}

    async def at_snapshot_point(self, run: RunView) -> None:
        if self.fleecing is not None:
            await self.fleecing.insert()

    def wrap_consumer(self, key: str, consumer: ExportConsumer) -> ExportConsumer:
        return self.fleecing.consumer(key, consumer) if self.fleecing is not None else consumer

    def explain(self, key: str, error: str) -> SnapshotBrokenError | None:
        return self.fleecing.broken(key, error) if self.fleecing is not None else None

    async def complete_archive(self, run: RunView, archive: object) -> int:
        return 0

    def closing_lines(self, received: Mapping[str, int]) -> list[str]:
        return []

    async def commit(self, run: RunView) -> list[str]:
        return []

    async def teardown(self) -> None:
        if self.fleecing is not None:
            await self.fleecing.teardown()
