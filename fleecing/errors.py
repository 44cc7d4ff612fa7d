"""Errors of the fleecing layer (all under :class:`qmpbackup.errors.QmpBackupError`).

Tree::

    FleecingConfigError (UsageError, exit 2)  unknown/unsuitable fleecing storage
    FleecingError (exit 1)                    something about fleecing failed
     +-- FleecingSpaceError                   the storage cannot hold what fleecing may need
     +-- CommandFailed                        an external tool (qemu-img, lvcreate, zfs) failed
     +-- GraphError                           the VM's block graph is not what we expect
     +-- SnapshotBrokenError                  the copy-before-write filter gave up (storage full/slow)
"""

from __future__ import annotations

from collections.abc import Sequence

from qmpbackup.errors import QmpBackupError, UsageError


class FleecingConfigError(UsageError):
    """The fleecing storage does not exist or is of a type we cannot fleece on."""


class FleecingError(QmpBackupError):
    """Root of the fleecing failures (exit 1)."""


class FleecingSpaceError(FleecingError):
    """Refused before any QEMU change: the storage may not hold what the fleecing needs."""

    def __init__(self, message: str, storeid: str, free_bytes: int, needed_bytes: int) -> None:
        self.storeid = storeid
        self.free_bytes = free_bytes
        self.needed_bytes = needed_bytes
        super().__init__(message)


class CommandFailed(FleecingError):
    """An external command failed; ``argv``, ``returncode`` and ``stderr`` say how."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
        status = "timed out" if returncode is None else f"failed: {last}"
        super().__init__(f"{argv[0]} {status}")


class GraphError(FleecingError):
    """The device's block graph changed under us or is not one we can fleece."""


class SnapshotBrokenError(FleecingError):
    """Reads from the snapshot failed: the copy-before-write filter could not keep old data."""
