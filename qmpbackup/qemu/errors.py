"""Errors of the QEMU control plane.

Tree (all under :class:`qmpbackup.errors.QmpBackupError`, exit 1)::

    QemuError                      something about a QEMU process went wrong
     +-- QmpConnectError           could not reach the QMP socket (missing, permission, refused)
     |    +-- QmpSocketBusyError   the socket accepted us but never greeted: another client holds it
     +-- QmpTimeoutError           a command got no answer within its limit
     +-- QmpCommandError           QEMU answered a command with an error
     +-- QmpOutcomeUnknownError    the connection died before the answer: ask QEMU what happened
     +-- QmpDisconnectedError      the session is not (or no longer) connected
     +-- DiscoveryError            a VM's block devices could not be mapped to disks
     +-- SpawnError                a paused QEMU for a stopped VM could not be started
"""

from __future__ import annotations

from collections.abc import Mapping

from qmpbackup.errors import QmpBackupError


class QemuError(QmpBackupError):
    """Root of the errors about a QEMU process; ``vm`` names the VM (its id) when known."""

    def __init__(self, message: str, vm: str | None = None) -> None:
        self.vm = vm
        super().__init__(message)


class QmpConnectError(QemuError):
    """The QMP socket could not be connected; ``path`` is the socket."""

    def __init__(self, message: str, path: str, vm: str | None = None) -> None:
        self.path = path
        super().__init__(message, vm)


class QmpSocketBusyError(QmpConnectError):
    """QMP serves one client at a time; a second one is accepted but never greeted."""


class QmpTimeoutError(QemuError):
    """``command`` got no reply within ``timeout_s`` seconds."""

    def __init__(self, command: str, timeout_s: float, vm: str | None = None) -> None:
        self.command = command
        self.timeout_s = timeout_s
        super().__init__(f"{command} on VM {vm or '?'} timed out after {timeout_s:g} s", vm)


class QmpCommandError(QemuError):
    """QEMU rejected ``command`` (sent with ``arguments``); ``error_class`` and ``desc`` are QMP's own words."""

    def __init__(
        self,
        command: str,
        args: Mapping[str, object] | None,
        error_class: str,
        desc: str,
        vm: str | None = None,
    ) -> None:
        self.command = command
        self.arguments = dict(args or {})
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"{command} on VM {vm or '?'} failed: {desc}", vm)


class QmpOutcomeUnknownError(QemuError):
    """The connection was lost before ``command`` was answered: it may or may not have run."""

    def __init__(self, command: str, vm: str | None = None) -> None:
        self.command = command
        super().__init__(
            f"{command} on VM {vm or '?'}: connection lost before the reply, outcome unknown", vm
        )


class QmpDisconnectedError(QemuError):
    """A command was attempted on a session that is not connected."""


class DiscoveryError(QemuError):
    """The VM's block devices do not look like anything we can back up."""


class SpawnError(QemuError):
    """Starting the paused QEMU failed; the message carries QEMU's own stderr lines."""
