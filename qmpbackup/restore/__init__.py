"""Restore (a ``qmrestore`` work-alike) and verify of VMA archives.

``restore`` turns an archive into sparse raw or qcow2 images plus a guest
definition, all or nothing; ``checksums`` hashes devices while an archive
streams by, for ``verify --checksums``.
"""

from qmpbackup.restore.checksums import DeviceHasher
from qmpbackup.restore.errors import DeviceMapError, RestoreError, RestoreRefusedError
from qmpbackup.restore.phases import RestoreOptions
from qmpbackup.restore.restore import RestoreResult, restore

__all__ = [
    "DeviceHasher",
    "DeviceMapError",
    "RestoreError",
    "RestoreOptions",
    "RestoreRefusedError",
    "RestoreResult",
    "restore",
]
