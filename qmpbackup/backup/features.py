"""The optional parts of one guest's backup (fleecing, incremental reads), behind one interface.

A :class:`Feature` is handed in by the job layer and called by :class:`qmpbackup.backup.run.GuestRun`
at fixed points of the run, always in the order the features were given (teardown in
reverse). The run knows nothing about any feature: it asks each one what to add.

The point in time: without a feature that reroutes a drive, it is the block jobs'
``transaction`` (inside the freeze/pause window). A feature that makes a drive's block job
read another node (fleecing: a snapshot of the disk) takes the point in time itself, in
:meth:`Feature.at_snapshot_point`, inside the same window right before the transaction;
later features see that in :attr:`RunContext.snapshot_in_transaction`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

from qmpbackup.backup.datapath import ArchiveDataPath
from qmpbackup.errors import QmpBackupError
from qmpbackup.nbd.export import ExportConsumer
from qmpbackup.qemu.capabilities import Capabilities
from qmpbackup.qemu.discovery import Disk
from qmpbackup.qemu.session import QmpSession
from qmpbackup.recovery.journal import Journal


class RunLog(Protocol):
    """The task log lines a feature may add (vzdump's ``INFO:``/``WARN:``)."""

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...


@dataclass(slots=True)
class RunContext:
    """What the run knows once QEMU is reached and the disks are chosen; shared with the features."""

    vmid: int
    session: QmpSession
    journal: Journal
    caps: Capabilities
    disks: list[Disk]
    rundir: Path  # private to this run, removed at its end
    running: bool  # the guest runs during the backup (not stop mode, not a QEMU we spawned)
    archive_uuid: UUID
    dump_dir: Path
    to_stdout: bool
    log: RunLog
    #: The node each drive's block job reads, by drive key (a disk's own node unless rerouted).
    sources: dict[str, str] = field(default_factory=dict)
    #: False once a feature rerouted a drive: then that feature takes the point in time.
    snapshot_in_transaction: bool = True
    #: Why every disk is read in full this time (the previous archive proved damaged), or None.
    full_reason: str | None = None


class Feature(Protocol):
    """One optional part of a guest's backup. Every method may do nothing."""

    async def attach(self, run: RunContext) -> Mapping[str, str]:
        """Before the window: check, then build what must exist before the point in time.

        Returns the drives whose block job reads another node than the disk's (key → node,
        a node that exists once :meth:`at_snapshot_point` ran); empty for most features.
        """
        ...

    def actions(self) -> list[dict[str, Any]]:
        """``transaction`` actions that go in before the block jobs."""
        ...

    def job_args(self) -> Mapping[str, Mapping[str, Any]]:
        """Extra ``blockdev-backup`` arguments, by drive key."""
        ...

    async def at_snapshot_point(self, run: RunContext) -> None:
        """Inside the freeze/pause window, right before the block jobs' transaction."""
        ...

    def wrap_consumer(self, key: str, consumer: ExportConsumer) -> ExportConsumer:
        """The consumer of drive ``key``'s NBD export (return it unchanged to leave it alone)."""
        ...

    def explain(self, key: str, error: str) -> QmpBackupError | None:
        """A clearer error for drive ``key``'s failed block job (QEMU's text), or None."""
        ...

    async def complete_archive(self, run: RunContext, archive: ArchiveDataPath) -> int:
        """After the block jobs' targets are gone, before the archive is closed: add what the
        block jobs did not send; returns how many bytes that was."""
        ...

    def closing_lines(self, received: Mapping[str, int]) -> list[str]:
        """Task log lines after the archive is written (``received``: bytes per drive key)."""
        ...

    async def commit(self, run: RunContext) -> list[str]:
        """After the archive is published under its final name; returns warnings."""
        ...

    async def teardown(self) -> None:
        """Remove what the feature built; runs on every way out, safe twice.

        A failure raises (its journal entries stay pending for the next run); the run logs
        it and never lets it replace the run's own error.
        """
        ...


class NoFeature:
    """Every hook doing nothing: a base for features inside ``qmpbackup`` that need only a few."""

    async def attach(self, run: RunContext) -> Mapping[str, str]:
        return {}

    def actions(self) -> list[dict[str, Any]]:
        return []

    def job_args(self) -> Mapping[str, Mapping[str, Any]]:
        return {}

    async def at_snapshot_point(self, run: RunContext) -> None:
        return None

    def wrap_consumer(self, key: str, consumer: ExportConsumer) -> ExportConsumer:
        return consumer

    def explain(self, key: str, error: str) -> QmpBackupError | None:
        return None

    async def complete_archive(self, run: RunContext, archive: ArchiveDataPath) -> int:
        return 0

    def closing_lines(self, received: Mapping[str, int]) -> list[str]:
        return []

    async def commit(self, run: RunContext) -> list[str]:
        return []

    async def teardown(self) -> None:
        return None


def merged_job_args(*per_feature: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per drive key, the extra block job arguments of several features together."""
    result: dict[str, dict[str, Any]] = {}
    for args in per_feature:
        for key, values in args.items():
            result.setdefault(key, {}).update(values)
    return result
