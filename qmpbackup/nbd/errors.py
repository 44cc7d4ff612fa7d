"""Errors of the NBD endpoint; each fails the backup that owns the server (exit 1)."""

from __future__ import annotations

from qmpbackup.errors import QmpBackupError


class NbdError(QmpBackupError):
    """The NBD endpoint could not serve a backup target."""


class NbdProtocolError(NbdError):
    """A client broke the NBD protocol; the connection was closed and the backup fails.

    ``export`` names the export the connection was using (None during the handshake).
    """

    def __init__(self, message: str, export: str | None = None) -> None:
        self.export = export
        where = f"NBD export {export!r}" if export is not None else "NBD handshake"
        super().__init__(f"{where}: protocol violation: {message}")


class NbdConsumerError(NbdError):
    """The consumer of an export failed on a request; QEMU got EIO and the backup fails."""

    def __init__(self, message: str, export: str) -> None:
        self.export = export
        super().__init__(f"NBD export {export!r}: {message}")
