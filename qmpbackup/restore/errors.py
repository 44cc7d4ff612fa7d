"""Errors of restore and verify: what failed, in one line a user can act on."""

from __future__ import annotations

from qmpbackup.errors import QmpBackupError, UsageError


class RestoreError(QmpBackupError):
    """The restore failed; everything it created has been removed again (exit 1)."""


class DeviceMapError(RestoreError):
    """The archive's ``#qmdump#map:`` lines and its devices do not match one to one."""


class RestoreRefusedError(UsageError):
    """The restore would replace something that exists (without ``--force``) or is in use (exit 2)."""
