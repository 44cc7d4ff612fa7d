"""A guest's clean shutdown: the guest agent first (when the VM has one), else ACPI.

QEMU started with ``-no-shutdown`` stays after the guest powers off; it is asked to quit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from qmpbackup.errors import QmpBackupError
from qmpbackup.guest_agent import GuestAgentClient
from qmpbackup.qemu.session import QmpSession


async def clean_shutdown(vmid: int, qmp: Path, qga: Path | None, timeout: float,
                         warn: Callable[[str], None]) -> bool:
    """Ask the guest to power off and wait up to ``timeout`` s for QEMU to end; False on timeout."""
    async with QmpSession(str(vmid), qmp) as session:
        asked = False
        if qga is not None:
            try:
                async with GuestAgentClient(str(qga), name=f"VM {vmid}") as agent:
                    await agent.shutdown()
                asked = True
            except QmpBackupError as exc:
                warn(f"guest agent shutdown failed ({exc}), trying ACPI")
        if not asked:
            await session.execute("system_powerdown")
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        status = (await session.execute("query-status"))["status"]
                    except QmpBackupError:
                        return True  # QEMU has gone away
                    if status == "shutdown":
                        with contextlib.suppress(QmpBackupError):
                            await session.execute("quit")
                        return True
                    await asyncio.sleep(0.5)
        except TimeoutError:
            return False
