"""What one guest's backup is given (:class:`GuestRequest`) and what it reports (:class:`GuestResult`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from qmpbackup.backup.features import Feature
from qmpbackup.errors import QmpBackupError
from qmpbackup.guest_config import GuestDefinition
from qmpbackup.jobs.hooks import HookRunner
from qmpbackup.jobs.vzdump_conf import VzdumpOptions
from qmpbackup.recovery.state import DEFAULT_STATE_DIR

class BackupError(QmpBackupError):
    """A guest's backup failed for a reason of its own (not a QEMU or format error)."""


@dataclass(frozen=True, slots=True)
class GuestRequest:
    """Everything one guest's backup needs, resolved and typed (no argparse below here)."""

    vmid: int
    options: VzdumpOptions
    dump_dir: Path
    storeid: str | None
    definition: GuestDefinition | None
    qmp: Path | None = None
    qga: Path | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    stdout: BinaryIO | None = None
    hooks: HookRunner | None = None
    features: tuple[Feature, ...] = ()  # fleecing, incremental reads: handed in by the job layer
    node: str = field(default_factory=lambda: os.uname().nodename)


@dataclass(slots=True)
class GuestResult:
    """One guest's outcome, as ``--output-format json`` prints it."""

    vmid: int
    status: str = "error"
    archive: str | None = None
    archive_size: int | None = None
    log: str | None = None
    duration_s: float = 0.0
    bytes_read: int = 0
    bytes_reused: int = 0  # taken from the previous archive (incremental runs)
    zero_bytes: int = 0
    written_bytes: int = 0
    freeze_window_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)
