"""Errors of the guest agent client.

Each carries the VM label, the socket path and the command, so a caller can
decide (skip the freeze, retry, give up) without parsing the message, and the
message itself is one line a user can act on.
"""

from __future__ import annotations

from qmpbackup.errors import QmpBackupError


class GuestAgentError(QmpBackupError):
    """Something went wrong talking to qemu-ga; ``command`` is None for connect/sync."""

    def __init__(self, message: str, *, target: str, socket_path: str, command: str | None) -> None:
        self.target = target
        self.socket_path = socket_path
        self.command = command
        super().__init__(message)


class GuestAgentUnavailableError(GuestAgentError):
    """No agent to talk to: socket missing or refused, connection lost, or nobody answers the sync."""


class GuestAgentNotConnectedError(GuestAgentUnavailableError):
    """A command was issued on a client that is not connected."""


class GuestAgentTimeoutError(GuestAgentError):
    """A command got no reply within its limit; the outcome in the guest is unknown."""

    def __init__(self, message: str, *, target: str, socket_path: str, command: str | None,
                 timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(message, target=target, socket_path=socket_path, command=command)


class GuestAgentCommandError(GuestAgentError):
    """The agent answered with an error (``error_class`` e.g. ``GenericError``, ``CommandNotFound``)."""

    def __init__(self, message: str, *, target: str, socket_path: str, command: str | None,
                 error_class: str, desc: str) -> None:
        self.error_class = error_class
        self.desc = desc
        super().__init__(message, target=target, socket_path=socket_path, command=command)


class GuestAgentProtocolError(GuestAgentError):
    """The agent sent something that is not a QGA reply (garbage, oversized, wrong shape)."""


class GuestFreezeError(GuestAgentError):
    """The guest's filesystems could not be frozen (a thaw was attempted afterwards)."""


class GuestThawError(GuestAgentError):
    """The guest could not be thawed: its filesystems may still be frozen. Never ignore this."""
