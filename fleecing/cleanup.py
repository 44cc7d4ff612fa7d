"""Removing what a crashed or killed run left behind in a VM and on the fleecing storages.

Two sources, in this order:

1. the VM's journal (``<state-dir>/journal/<vmid>.jsonl``): replayed with every known
   undo step (block jobs and targets, fleecing graph and images, a pause, a freeze: thawed
   through the agent socket the entry names, whether QMP is reachable or not);
2. *by name*, when the journal is gone or incomplete: our jobs, exports and nodes in the
   VM's QEMU (:func:`qmpbackup.qemu.naming.parse_name`), a device still sitting on our
   filter, and ``vm-<vmid>-fleece-*`` files on the file storages of storage.cfg.

Without a reachable QEMU (it exited: its nodes went with it) only images and files are
removed. Orphaned QEMUs we spawned are killed (:func:`process_records.kill_orphans`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleecing.graph import delete_export, set_device_node, undo_steps
from fleecing.images import leftover_files
from fleecing.runner import Runner, run_command
from fleecing.storage import FILE_TYPES, images_dir
from qmpbackup.guest_agent.freeze import undo_steps as freeze_undo_steps
from qmpbackup.qemu.nodes import KIND_BITMAP, KIND_BLOCKJOB, KIND_PAUSE, cancel_job, delete_node
from qmpbackup.qemu.nodes import undo_steps as qemu_undo_steps
from qmpbackup.jobs.storage_cfg import Storage
from qmpbackup.journal import Entry, Journal, JournalError, Undo, unwind
from qmpbackup.qemu import naming
from qmpbackup.qemu.errors import QmpCommandError, QmpConnectError, QmpSocketBusyError
from qmpbackup.qemu.process_records import kill_orphans
from qmpbackup.qemu.session import QmpSession

log = logging.getLogger(__name__)

#: Our node roles, in the order they can be deleted (users before what they use).
NODE_ORDER = (naming.ROLE_SNAPSHOT, naming.ROLE_SNAPSHOT_TRIM, naming.ROLE_TARGET, naming.ROLE_CBW,
              naming.ROLE_FLEECE, naming.ROLE_FLEECE_FILE)


def journal_path(state_dir: Path, vmid: int) -> Path:
    """Where the backup engine keeps VM ``vmid``'s journal."""
    return state_dir / "journal" / f"{vmid}.jsonl"


def journaled_vmids(state_dir: Path) -> list[int]:
    d = state_dir / "journal"
    return sorted(int(p.stem) for p in d.glob("*.jsonl") if p.stem.isdigit()) if d.is_dir() else []


@dataclass(slots=True)
class CleanupReport:
    """What was done for one VM, one line per action, and what could not be done."""

    vmid: int
    qemu_reachable: bool = False
    actions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"vmid": self.vmid, "qemu": self.qemu_reachable, "actions": self.actions, "failures": self.failures}


def _handlers(session: QmpSession | None, runner: Runner, report: CleanupReport) -> dict[str, Undo]:
    fleecing = undo_steps(session, runner)

    async def noop(entry: Entry) -> None:
        pass

    handlers: dict[str, Undo] = {**fleecing, **freeze_undo_steps(report.actions.append)}  # needs only QGA
    if session is not None:
        handlers.update(qemu_undo_steps(session))
    else:  # QEMU is gone, and what lived in it went with it
        handlers.update({kind: noop for kind in (KIND_BLOCKJOB, KIND_BITMAP, KIND_PAUSE)})

    def logged(kind: str, step: Undo) -> Undo:
        async def run(entry: Entry) -> None:
            await step(entry)
            report.actions.append(f"undid {kind} {_describe(entry.data)}")
        return run

    return {k: logged(k, v) for k, v in handlers.items()}


def _describe(data: Mapping[str, Any]) -> str:
    for key in ("node", "job", "id", "path", "qdev", "socket", "qga", "qmp"):
        if key in data:
            return str(data[key])
    return ""


async def _connect(vmid: int, socket: Path | None) -> QmpSession | None:
    """A session to the VM, or None when its QEMU is not running (socket missing or refusing)."""
    if socket is None:
        return None
    session = QmpSession(str(vmid), socket)
    try:
        await session.connect()
    except QmpSocketBusyError:
        raise
    except QmpConnectError as exc:
        log.info("VM %d: QEMU not reachable (%s); only files are cleaned up", vmid, exc)
        return None
    return session


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
    for role in NODE_ORDER:
        for n, p in ours.items():
            if p.role == role and n not in snaps:
                try:
                    await delete_node(session, n)
                    report.actions.append(f"deleted node {n}")
                except QmpCommandError as exc:
                    report.failures.append(f"cannot delete node {n}: {exc.desc}")


async def remove_files(vmid: int, storages: Mapping[str, Storage], in_use: set[str],
                       report: CleanupReport) -> None:
    """``vm-<vmid>-fleece-*`` files on file storages that no QEMU node has open."""
    for storage in storages.values():
        if storage.type not in FILE_TYPES or storage.path is None or storage.disable:
            continue
        for path in leftover_files(images_dir(storage, vmid), vmid):
            if str(path) in in_use:
                report.failures.append(f"fleecing file {path} is still open in QEMU")
                continue
            path.unlink(missing_ok=True)
            report.actions.append(f"deleted fleecing file {path}")


async def cleanup_vm(vmid: int, state_dir: Path, qmp_socket: Path | None, storages: Mapping[str, Storage],
                     runner: Runner = run_command) -> CleanupReport:
    """Everything for one VM: journal replay, then by-name leftovers, then files."""
    report = CleanupReport(vmid)
    try:
        # Taken even when there is no journal: its lock keeps a backup from starting meanwhile,
        # and a running backup's lock keeps us away from its (live) nodes.
        journal = Journal.open(journal_path(state_dir, vmid))
    except JournalError as exc:
        report.failures.append(f"{exc} (is a backup of VM {vmid} running?)")
        return report
    session: QmpSession | None = None
    try:
        session = await _connect(vmid, qmp_socket)
        report.qemu_reachable = session is not None
        report.failures += await unwind(journal, _handlers(session, runner, report))
        in_use: set[str] = set()
        if session is not None:
            await remove_by_name(session, vmid, report)
            in_use = {str(n.get("file")) for n in await session.execute("query-named-block-nodes", {"flat": True})}
        await remove_files(vmid, storages, in_use, report)
    finally:
        journal.close()
        if session is not None:
            await session.close()
    return report


def kill_spawned_orphans(state_dir: Path) -> list[str]:
    """Kill QEMUs we spawned whose run is gone (the engine keeps their records under ``state_dir``,
    the same directory :class:`qmpbackup.qemu.spawn.SpawnedQemu` is given)."""
    return [f"killed orphaned QEMU pid {rec.pid} of VM {rec.vmid}" for rec in kill_orphans(state_dir)]
