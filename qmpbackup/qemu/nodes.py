"""Our block nodes and jobs in QEMU: does it exist, delete it, cancel it — each safe to run twice.

These are the journal's cleanup steps for the kinds ``blockdev`` and ``blockjob``:
the backup engine, fleecing and ``qmpbackup cleanup`` all undo through them, so a
step never has two versions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from qmpbackup.journal import Entry, Undo
from qmpbackup.qemu.errors import QmpCommandError
from qmpbackup.qemu.session import QmpSession

KIND_BLOCKDEV = "blockdev"
KIND_BLOCKJOB = "blockjob"
#: How long a cancelled job may take to go away.
CANCEL_TIMEOUT_S = 60.0


async def node_exists(session: QmpSession, node: str) -> bool:
    nodes = await session.execute("query-named-block-nodes", {"flat": True})
    return any(n.get("node-name") == node for n in nodes)


async def delete_node(session: QmpSession, node: str) -> None:
    """``blockdev-del`` if the node is there; a node that is already gone is fine."""
    if not await node_exists(session, node):
        return
    try:
        await session.execute("blockdev-del", {"node-name": node})
    except QmpCommandError:
        if await node_exists(session, node):
            raise


async def job_states(session: QmpSession) -> dict[str, Mapping[str, Any]]:
    """``query-jobs`` by job id: status, progress and, once concluded, the error if any."""
    return {str(j["id"]): j for j in await session.execute("query-jobs")}


async def cancel_job(session: QmpSession, job_id: str, timeout: float = CANCEL_TIMEOUT_S) -> None:
    """Cancel a job (forced, so one paused on error goes too), dismiss it, wait until it is gone."""
    asked = False
    async with asyncio.timeout(timeout):
        while True:
            job = (await job_states(session)).get(job_id)
            if job is None:
                return
            if job.get("status") == "concluded":
                await session.execute("job-dismiss", {"id": job_id})
                continue
            if not asked:
                try:
                    await session.execute("block-job-cancel", {"device": job_id, "force": True})
                except QmpCommandError:
                    pass  # it may have concluded in between; the next look decides
                asked = True
            await asyncio.sleep(0.1)


def undo_steps(session: QmpSession) -> dict[str, Undo]:
    """The journal's cleanup steps for what this module creates."""

    async def undo_blockdev(entry: Entry) -> None:
        await delete_node(session, str(entry.data["node"]))

    async def undo_blockjob(entry: Entry) -> None:
        await cancel_job(session, str(entry.data["job"]))

    return {KIND_BLOCKDEV: undo_blockdev, KIND_BLOCKJOB: undo_blockjob}
