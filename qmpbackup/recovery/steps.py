"""The undo step of every journal kind, in one table.

Each step first asks whether its resource still exists, so it is safe to run twice and
after any crash. The steps themselves live beside the code that creates the resource
(:mod:`qmpbackup.qemu.nodes`, :mod:`fleecing.graph`, :mod:`fleecing.images`,
:mod:`qmpbackup.guest_agent.freeze`, :mod:`qmpbackup.recovery.host_files`,
:mod:`qmpbackup.instant_copy`, :mod:`qmpbackup.qemu.start_command`); this module only says which undoes what.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from fleecing.graph import delete_export, restore_device, stop_nbd_server
from fleecing.errors import FleecingError
from fleecing.images import FleecingImage, free_image
from fleecing.runner import Runner, run_command
from qmpbackup.guest_agent.freeze import thaw_left_frozen
from qmpbackup.instant_copy import drop_copy
from qmpbackup.qemu.nodes import (
    cancel_job,
    delete_node,
    remove_bitmap,
    resume_if_paused,
)
from qmpbackup.qemu.session import QmpSession
from qmpbackup.qemu.start_command import start_left_stopped
from qmpbackup.recovery import kinds
from qmpbackup.recovery.host_files import remove_output_file, remove_run_folder
from qmpbackup.recovery.journal import Entry, Undo


async def open_in_qemu(session: QmpSession) -> set[str]:
    """The files and devices QEMU's nodes have open."""
    return {str(n.get("file")) for n in await session.execute("query-named-block-nodes", {"flat": True})}


def undo_steps(session: QmpSession | None, *, runner: Runner = run_command,
               say: Callable[[str], None] | None = None, state_dir: Path | None = None) -> dict[str, Undo]:
    """Kind → undo step. Without ``session`` only the kinds that need no QEMU are there.

    ``say`` gets one line when a step found something the user should hear of (a thawed guest,
    a VM started again). ``stopped-vm`` has a step only with ``state_dir`` (the spawned-QEMU
    records: a VM is never started while a QEMU we spawned may hold its disks).
    """

    async def freeze(entry: Entry) -> None:
        qga = str(entry.data["qga"])
        if await thaw_left_frozen(qga, str(entry.data.get("vm") or qga)) and say is not None:
            say("guest filesystems were still frozen by an earlier run that died - thawed them")

    async def image(entry: Entry) -> None:
        found = FleecingImage.from_record(entry.data)
        if session is not None and found.path in await open_in_qemu(session):
            raise FleecingError(f"fleecing image {found.path} is still open in QEMU")
        await free_image(found, runner)

    async def output_file(entry: Entry) -> None:
        remove_output_file(Path(entry.data["path"]))

    async def run_folder(entry: Entry) -> None:
        remove_run_folder(Path(entry.data["path"]))

    async def instant_copy(entry: Entry) -> None:  # lvremove/zfs destroy block: run them off the loop
        await asyncio.to_thread(drop_copy, str(entry.data["method"]), Path(entry.data["path"]))

    steps: dict[str, Undo] = {kinds.FREEZE.name: freeze, kinds.FLEECING_IMAGE.name: image,
                              kinds.OUTPUT_FILE.name: output_file, kinds.RUN_FOLDER.name: run_folder,
                              kinds.INSTANT_COPY.name: instant_copy}
    if state_dir is not None:
        spawned = state_dir  # (narrowed for the closure)

        async def stopped_vm(entry: Entry) -> None:
            vmid = int(entry.data["vmid"])
            if await start_left_stopped(vmid, Path(entry.data["qmp"]), entry.data["start"], spawned) \
                    and say is not None:
                say(f"VM {vmid} was left stopped by a stop-mode backup that died - started it again")

        steps[kinds.STOPPED_VM.name] = stopped_vm
    if session is None:
        return steps
    s = session

    async def blockdev(entry: Entry) -> None:
        await delete_node(s, str(entry.data["node"]))

    async def blockjob(entry: Entry) -> None:
        await cancel_job(s, str(entry.data["job"]))

    async def bitmap(entry: Entry) -> None:
        await remove_bitmap(s, str(entry.data["node"]), str(entry.data["name"]))

    async def pause(entry: Entry) -> None:
        await resume_if_paused(s)

    async def drive_filter(entry: Entry) -> None:
        await restore_device(s, entry.data)

    async def export(entry: Entry) -> None:
        await delete_export(s, str(entry.data["id"]))

    async def nbd_server(entry: Entry) -> None:
        await stop_nbd_server(s)

    steps.update({kinds.BLOCKDEV.name: blockdev, kinds.BLOCKJOB.name: blockjob, kinds.BITMAP.name: bitmap,
                  kinds.PAUSE.name: pause, kinds.DRIVE_FILTER.name: drive_filter,
                  kinds.BLOCK_EXPORT.name: export, kinds.NBD_SERVER.name: nbd_server})
    return steps
