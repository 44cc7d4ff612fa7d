"""``qmpbackup cleanup``: removing what a crashed or killed run left behind in a VM and on disk.

Two sources, in this order:

1. the VM's journal (``<state-dir>/journal/<vmid>.jsonl``), replayed by
   :func:`qmpbackup.recovery.replay.replay`: the QEMU each entry belongs to is reached
   through the socket given (``--qmp``, the guest definition) or the one the journal names;
   entries of a QEMU that is gone are dropped; a QEMU that runs but cannot be reached keeps
   its entries, and then no file it may hold open is deleted;
2. *by name*, when the journal is gone or incomplete: our jobs, exports and nodes in the
   VM's QEMU (:func:`qmpbackup.qemu.naming.parse_name`), a device still sitting on our
   filter, QEMU's NBD server listening in one of our run folders, and ``vm-<vmid>-fleece-*``
   files on the file storages of storage.cfg that no process has open. What the by-name
   pass removed counts as undone: the journal is replayed once more after it.

Orphaned QEMUs we spawned are killed (:func:`qmpbackup.recovery.spawned.kill_orphans`), the VM's
own before its journal is replayed. A VM that a stop-mode run shut down and did not start again
(``stopped-vm``) is started with its start command after that run's instant copies are dropped,
unless it runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fleecing.graph import delete_export, set_device_node, stop_nbd_server
from fleecing.images import leftover_files
from fleecing.runner import Runner, run_command
from fleecing.storage import FILE_TYPES, images_dir
from qmpbackup.jobs.storage_cfg import Storage
from qmpbackup.qemu import naming
from qmpbackup.qemu.errors import QmpCommandError, QmpConnectError, QmpSocketBusyError
from qmpbackup.qemu.nodes import cancel_job, delete_node
from qmpbackup.qemu.session import QmpSession
from qmpbackup.recovery import kinds
from qmpbackup.recovery.host_files import RUN_FOLDER_PREFIX
from qmpbackup.recovery.journal import Entry, Journal, JournalError, Undo
from qmpbackup.recovery.replay import Sessions, replay
from qmpbackup.recovery.spawned import kill_orphans
from qmpbackup.recovery.state import journal_path
from qmpbackup.recovery.steps import open_in_qemu, undo_steps

log = logging.getLogger(__name__)

#: Our node roles, in the order they can be deleted (users before what they use).
NODE_ORDER = (naming.ROLE_SNAPSHOT, naming.ROLE_SNAPSHOT_TRIM, naming.ROLE_TARGET, naming.ROLE_TARGET_META,
              naming.ROLE_TARGET_DATA, naming.ROLE_CBW, naming.ROLE_FLEECE, naming.ROLE_FLEECE_FILE)


@dataclass(slots=True)
class CleanupReport:
    """What was done for one VM, one line per action, and what could not be done."""

    vmid: int
    qemu_reachable: bool = False
    actions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"vmid": self.vmid, "qemu": self.qemu_reachable, "actions": self.actions, "failures": self.failures}


async def _connect(vmid: int, socket: Path | None) -> tuple[QmpSession | None, bool]:
    """A session to the VM's QEMU, and whether the socket says that QEMU is gone (missing, refusing)."""
    if socket is None:
        return None, False
    session = QmpSession(str(vmid), socket)
    try:
        await session.connect()
    except QmpSocketBusyError:
        raise
    except QmpConnectError as exc:
        log.info("VM %d: QEMU not reachable at the given socket (%s)", vmid, exc)
        return None, True
    return session, False


async def _graph_children(session: QmpSession) -> dict[str, dict[str, str]]:
    """Node → {child role → child node}, from x-debug-query-block-graph."""
    try:
        graph = await session.execute("x-debug-query-block-graph")
    except QmpCommandError:
        return {}
    names = {n["id"]: n.get("name") for n in graph.get("nodes", ()) if n.get("type") == "block-driver"}
    out: dict[str, dict[str, str]] = {}
    for e in graph.get("edges", ()):
        parent, child = names.get(e.get("parent")), names.get(e.get("child"))
        if parent and child:
            out.setdefault(parent, {})[str(e.get("name"))] = child
    return out


async def remove_by_name(session: QmpSession, vmid: int, report: CleanupReport) -> None:
    """Our jobs, exports and nodes still in QEMU, and a device still on our filter."""
    for job in await session.execute("query-jobs"):
        if naming.is_ours(str(job["id"]), vmid):
            await cancel_job(session, str(job["id"]))
            report.actions.append(f"cancelled job {job['id']}")
    for export in await session.execute("query-block-exports"):
        if naming.is_ours(str(export["id"]), vmid):
            await delete_export(session, str(export["id"]))
            report.actions.append(f"removed export {export['id']}")
    nodes = [str(n["node-name"]) for n in await session.execute("query-named-block-nodes", {"flat": True})
             if n.get("node-name")]
    ours = {n: p for n in nodes if (p := naming.parse_name(n)) is not None and naming.is_ours(n, vmid)}
    children = await _graph_children(session)
    snaps = [n for n, p in ours.items() if p.role in (naming.ROLE_SNAPSHOT, naming.ROLE_SNAPSHOT_TRIM)]
    for n in snaps:  # a device cannot go back while a snapshot node still uses the filter
        await delete_node(session, n)
        report.actions.append(f"deleted node {n}")
    for block in await session.execute("query-block"):
        node = (block.get("inserted") or {}).get("node-name")
        parsed = ours.get(str(node))
        qdev = block.get("qdev")
        if parsed is None or parsed.role != naming.ROLE_CBW or not qdev:
            continue
        original = children.get(str(node), {}).get("file")
        if original is None:
            report.failures.append(f"device {qdev} is on our filter {node}, but its disk node is unknown")
            continue
        qom = qdev if str(qdev).startswith("/") else f"/machine/peripheral/{qdev}"
        await set_device_node(session, str(qdev), qom, original)
        report.actions.append(f"device {qdev} back on node {original}")
    for path in our_nbd_server_sockets(session, vmid):
        await stop_nbd_server(session)
        report.actions.append(f"stopped QEMU's NBD server on {path}")
    for role in NODE_ORDER:
        for n, p in ours.items():
            if p.role == role and n not in snaps:
                try:
                    await delete_node(session, n)
                    report.actions.append(f"deleted node {n}")
                except QmpCommandError as exc:
                    report.failures.append(f"cannot delete node {n}: {exc.desc}")


def our_nbd_server_sockets(session: QmpSession, vmid: int) -> list[str]:
    """The sockets QEMU listens on in one of our run folders for ``vmid``: only our
    ``nbd-server-start`` puts a listener there (QMP has no query for the NBD server)."""
    pid = session.peer_pid()
    if pid is None:
        return []
    try:
        conns = psutil.Process(pid).net_connections(kind="unix")
    except psutil.Error:
        return []
    prefix = f"{RUN_FOLDER_PREFIX}{vmid}-"
    return sorted({str(c.laddr) for c in conns
                   if c.laddr and c.status == psutil.CONN_NONE and not c.raddr
                   and Path(str(c.laddr)).parent.name.startswith(prefix)})


def open_anywhere() -> set[str]:
    """Every path some process has open (from ``/proc/*/fd``; the processes we may look at)."""
    paths: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    return paths


async def remove_files(vmid: int, storages: Mapping[str, Storage], in_use: set[str],
                       report: CleanupReport) -> None:
    """``vm-<vmid>-fleece-*`` files on file storages that no QEMU node and no process has open."""
    open_now: set[str] | None = None
    for storage in storages.values():
        if storage.type not in FILE_TYPES or storage.path is None or storage.disable:
            continue
        for path in leftover_files(images_dir(storage, vmid), vmid):
            open_now = open_anywhere() if open_now is None else open_now
            if str(path) in in_use or str(path) in open_now:
                report.failures.append(f"fleecing file {path} is still open in QEMU")
                continue
            path.unlink(missing_ok=True)
            report.actions.append(f"deleted fleecing file {path}")


async def cleanup_vm(vmid: int, state_dir: Path, qmp_socket: Path | None, storages: Mapping[str, Storage],
                     runner: Runner = run_command) -> CleanupReport:
    """Everything for one VM: journal replay, then by-name leftovers, the journal again, then files."""
    report = CleanupReport(vmid)
    try:
        # Taken even when there is no journal: its lock keeps a backup from starting meanwhile,
        # and a running backup's lock keeps us away from its (live) nodes.
        journal = Journal.open(journal_path(state_dir, vmid))
    except JournalError as exc:
        report.failures.append(f"{exc} (is a backup of VM {vmid} running?)")
        return report
    session: QmpSession | None = None
    sessions: Sessions | None = None
    try:
        # The VM's QEMUs we spawned first: what they held (an instant copy, the disks of a VM that
        # stop mode shut down and that is started again below) is free once they are gone.
        for rec in await asyncio.to_thread(kill_orphans, state_dir, vmid=vmid):
            report.actions.append(f"killed orphaned QEMU pid {rec.pid} of VM {rec.vmid}")
        session, gone = await _connect(vmid, qmp_socket)
        sessions = Sessions(vmid, session, current_gone=gone, connect=True)

        def undone(entry: Entry) -> None:
            report.actions.append(f"undid {entry.describe()}")

        def steps(live: QmpSession | None) -> Mapping[str, Undo]:
            return undo_steps(live, runner=runner, say=report.actions.append, state_dir=state_dir)

        def not_start(entry: Entry) -> bool:
            return entry.kind != kinds.STOPPED_VM.name

        failures = await replay(journal, sessions, steps=steps, info=report.actions.append, undone=undone,
                                only=not_start)
        reachable = sessions.reachable()
        report.qemu_reachable = bool(reachable)
        for live in reachable:
            await remove_by_name(live, vmid, report)
        if failures and journal.pending():  # what the by-name pass removed is undone now
            failures = await replay(journal, sessions, steps=steps, info=report.actions.append, undone=undone,
                                    only=not_start)
        # Last, and once: a VM a stop-mode run left shut down starts when nothing of that run is left.
        failures += await replay(journal, sessions, steps=steps, info=report.actions.append, undone=undone,
                                 only=lambda e: not not_start(e))
        report.failures += failures
        if sessions.unreachable():
            return report  # a QEMU that may hold our files runs unreached: delete none of them
        in_use: set[str] = set()
        for live in reachable:
            in_use |= await open_in_qemu(live)
        await remove_files(vmid, storages, in_use, report)
    finally:
        journal.close()
        if sessions is not None:
            await sessions.close()
        if session is not None:
            await session.close()
    return report


def kill_spawned_orphans(state_dir: Path) -> list[str]:
    """Kill QEMUs we spawned whose run is gone (the engine keeps their records under ``state_dir``,
    the same directory :class:`qmpbackup.qemu.spawn.SpawnedQemu` is given)."""
    return [f"killed orphaned QEMU pid {rec.pid} of VM {rec.vmid}" for rec in kill_orphans(state_dir)]
