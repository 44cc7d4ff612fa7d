"""Guest agent (qemu-ga) client: sync-delimited handshake, bounded commands, the freeze window.

Typical use by the backup engine::

    async with GuestAgentClient(qga_path, name="VM 100") as agent:
        async with frozen_window(agent) as freeze:
            ...start the backup job...      # freeze.frozen says whether the guest is frozen
"""

from qmpbackup.guest_agent.client import (
    COMMAND_TIMEOUTS_S,
    DEFAULT_TIMEOUT_S,
    AgentState,
    FreezeStatus,
    GuestAgentClient,
)
from qmpbackup.guest_agent.errors import (
    GuestAgentCommandError,
    GuestAgentError,
    GuestAgentNotConnectedError,
    GuestAgentProtocolError,
    GuestAgentTimeoutError,
    GuestAgentUnavailableError,
    GuestFreezeError,
    GuestThawError,
)
from qmpbackup.guest_agent.freeze import FreezeOutcome, FreezeTimeouts, frozen_window

__all__ = [
    "COMMAND_TIMEOUTS_S",
    "DEFAULT_TIMEOUT_S",
    "AgentState",
    "FreezeOutcome",
    "FreezeStatus",
    "FreezeTimeouts",
    "GuestAgentClient",
    "GuestAgentCommandError",
    "GuestAgentError",
    "GuestAgentNotConnectedError",
    "GuestAgentProtocolError",
    "GuestAgentTimeoutError",
    "GuestAgentUnavailableError",
    "GuestFreezeError",
    "GuestThawError",
    "frozen_window",
]
