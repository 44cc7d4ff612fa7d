"""What a backup changes in QEMU, and how each change is undone — each step safe to run twice.

These are the undo steps of the journal kinds ``blockdev`` (a node), ``blockjob``, ``bitmap``
(a dirty bitmap a failed run started) and ``pause`` (the VM paused in suspend mode);
:mod:`qmpbackup.recovery.steps` maps the kinds to them, so a step never has two versions.
:func:`add_node` is the one way a node of ours comes to be (journaled first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from qmpbackup.errors import QmpBackupError
from qmpbackup.qemu.errors import QmpCommandError
from qmpbackup.qemu.session import QmpSession
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Entry, Journal

#: How long a cancelled job may take to go away.
CANCEL_TIMEOUT_S = 60.0


async def node_exists(session: QmpSession, node: str) -> bool:
    nodes = await session.execute("query-named-block-nodes", {"flat": True})
    return any(n.get("node-name") == node for n in nodes)


def _nothing(entry: Entry) -> None:
    pass


async def add_node(session: QmpSession, journal: Journal, args: Mapping[str, Any], *,
                   error: Callable[[str], QmpBackupError],
                   recorded: Callable[[Entry], None] = _nothing,
                   refused: Callable[[Entry], None] = _nothing) -> Entry:
    """``blockdev-add`` a node of ours, recorded in the journal (``blockdev``) before QEMU is asked.

    A node that already has the name (an earlier run's whose journal is lost, or someone
    else's) raises ``error`` before anything is recorded: recorded, this run's teardown or
    replay would delete it. When QEMU refuses the node and there is none, the entry is
    resolved (nothing was created) before the error goes on. ``recorded`` and ``refused``
    are for a caller with its own undo list (fleecing's graph): it hears of the entry as soon
    as it is written, and again if it was resolved that way.
    """
    node = str(args["node-name"])
    if await node_exists(session, node):
        raise error(f"node {node} already exists in QEMU (left by an earlier run? "
                    f"'qmpbackup cleanup {session.vm}' removes it)")
    entry = journal.record(kinds.BLOCKDEV, node=node)
    recorded(entry)
    try:
        await session.execute("blockdev-add", dict(args))
    except QmpCommandError:
        if not await node_exists(session, node):
            journal.resolve(entry)  # QEMU said no: nothing was created
            refused(entry)
        raise
    return entry


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


async def bitmap_exists(session: QmpSession, node: str, name: str) -> bool:
    for info in await session.execute("query-named-block-nodes", {"flat": True}):
        if info.get("node-name") == node:
            return any(b.get("name") == name for b in info.get("dirty-bitmaps") or ())
    return False


async def remove_bitmap(session: QmpSession, node: str, name: str) -> None:
    """``block-dirty-bitmap-remove`` unless it is gone already (or its node is)."""
    try:
        await session.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
    except QmpCommandError:
        if await bitmap_exists(session, node, name):
            raise


async def resume_if_paused(session: QmpSession) -> None:
    """``cont`` a VM that we paused; a VM in any other state is left as it is."""
    if (await session.execute("query-status"))["status"] == "paused":
        await session.execute("cont")
