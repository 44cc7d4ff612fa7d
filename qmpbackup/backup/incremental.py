"""Which drives may be read incrementally, and the dirty bitmaps that make it possible (issue 8).

Every backup of a drive starts, in the same ``transaction`` as its job, a dirty bitmap
named after the new archive's VMA uuid (:func:`qmpbackup.qemu.naming.bitmap_name`, the
uuid's hex form as tag): persistent when the job's node is a writable qcow2 node, in memory
otherwise. The next backup of the VM reads a drive incrementally only when nothing is in
doubt: the newest complete archive of the VM in the dump dir is readable, holds the drive
with the same size, and the drive's node carries our bitmap named after that archive, neither
``inconsistent`` nor busy, and recording. Anything else means a full read, with one log line
naming the reason.

Why ``sync: bitmap`` with ``bitmap-mode: never``: the base bitmap is never changed by the
job (QEMU freezes it for the job and merges the writes made meanwhile back in), so after a
failed run it still covers every change since the previous archive. It is removed only after
the new archive is published (:meth:`IncrementalPlan.commit`). The new bitmap is journaled
before the transaction creates it, so a failed or killed run drops it again (the chain of a
failed run never survives).

The clusters the job does not send are taken from the previous archive by
:mod:`qmpbackup.backup.synthetic`.

When another feature takes the point in time before the transaction (fleecing) the order
is: the plan on the disk nodes; :meth:`IncrementalPlan.start_bitmaps` (instead of
``record``) before the snapshot point; the snapshot point;
:meth:`IncrementalPlan.bind_snapshots` with the snapshot-access nodes; the block jobs with
:meth:`IncrementalPlan.job_args` (``actions()`` is empty then); after publishing,
:meth:`IncrementalPlan.commit`. The copy-before-write filter gets *no* bitmap while it is
added before the snapshot point (see :meth:`IncrementalPlan.cbw_bitmap`).
:mod:`qmpbackup.backup.incremental_feature` drives all this as a feature of the run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from uuid import UUID

from qmpbackup.backup.archive_config import vma_device_name
from qmpbackup.errors import QmpBackupError
from qmpbackup.qemu import naming
from qmpbackup.qemu.errors import QmpCommandError
from qmpbackup.qemu.nodes import remove_bitmap
from qmpbackup.qemu.session import QmpSession
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Entry, Journal
from qmpbackup.render import render_bytes
from qmpbackup.store.dumpdir import list_backups
from qmpbackup.vma import VmaReader
from qmpbackup.vma.archive_io import open_archive
from qmpbackup.vma.index import ArchiveIndex, ArchiveIndexError, NoIndexError

log = logging.getLogger(__name__)

#: Our bitmaps' granularity: one VMA cluster, so every dirty bit is exactly one cluster.
GRANULARITY = 65536
#: Role of the frozen copy of a base bitmap on a fleecing snapshot-access node.
ROLE_SNAPSHOT_COPY = "snapbitmap"

# The reasons for a full read (one log line each).
NO_PREVIOUS = "no previous archive"
DISABLED = "dirty-bitmap disabled (--dirty-bitmap 0)"
TO_STDOUT = "the archive goes to standard output"


@dataclass(frozen=True, slots=True)
class PreviousArchive:
    """The newest complete archive of the VM: its file, uuid and devices (VMA name → size)."""

    path: Path
    uuid: UUID
    sizes: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class BitmapState:
    """One named dirty bitmap as ``query-named-block-nodes`` reports it."""

    name: str
    granularity: int
    count: int
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: bool


@dataclass(frozen=True, slots=True)
class NodeState:
    driver: str
    read_only: bool
    bitmaps: tuple[BitmapState, ...]


@dataclass(frozen=True, slots=True)
class DriveDecision:
    """How one drive is read: ``base`` is the bitmap the job uses, None for a full read."""

    key: str
    node: str
    size: int
    new_bitmap: str | None
    persistent: bool
    base: str | None = None
    reason: str | None = None

    @property
    def incremental(self) -> bool:
        return self.base is not None


def bitmap_for(vmid: int, key: str, archive_uuid: UUID | str) -> str:
    """The bitmap that tracks changes since the archive ``archive_uuid`` (uuid hex as tag)."""
    return naming.bitmap_name(vmid, key, tag=UUID(str(archive_uuid)).hex)


def newest_archive(dump_dir: Path, vmid: int) -> tuple[PreviousArchive | None, str | None]:
    """The newest archive of ``vmid`` with its header read, or None and the reason why not."""
    backups = list_backups(dump_dir, vmid) if dump_dir.is_dir() else []
    if not backups:
        return None, NO_PREVIOUS
    newest = backups[-1].path
    try:
        with open_archive(str(newest), read_to_end=False) as source:
            reader = VmaReader(source)
            sizes = {dev.name: dev.size for dev in reader.devices.values() if not dev.is_vmstate}
            uuid = reader.uuid
    except QmpBackupError as exc:
        return None, f"previous archive {newest.name} damaged or unreadable: {exc}"
    try:
        ArchiveIndex.open(newest).close()
    except NoIndexError:
        return None, f"previous archive {newest.name} has no index, so its data cannot be checked"
    except ArchiveIndexError as exc:
        return None, f"previous archive's index not usable: {str(exc).partition(' (run:')[0]}"
    return PreviousArchive(newest, uuid, sizes), None


def _bitmap_state(raw: Mapping[str, Any]) -> BitmapState | None:
    name = raw.get("name")
    if not name:
        return None  # internal, unnamed bitmaps (e.g. a cbw filter's copy bitmap)
    return BitmapState(
        name=str(name),
        granularity=int(raw.get("granularity", 0)),
        count=int(raw.get("count", 0)),
        recording=bool(raw.get("recording", True)),
        busy=bool(raw.get("busy", False)),
        persistent=bool(raw.get("persistent", False)),
        inconsistent=bool(raw.get("inconsistent", False)),
    )


async def node_states(session: QmpSession) -> dict[str, NodeState]:
    """Every named node's driver, read-only flag and named dirty bitmaps."""
    states = {}
    for node in await session.execute("query-named-block-nodes", {"flat": True}):
        bitmaps = (_bitmap_state(b) for b in node.get("dirty-bitmaps") or ())
        states[str(node.get("node-name"))] = NodeState(
            driver=str(node.get("drv", "")), read_only=bool(node.get("ro", False)),
            bitmaps=tuple(b for b in bitmaps if b is not None))
    return states


def _ours(vmid: int, key: str, name: str) -> bool:
    parsed = naming.parse_name(name)
    return (parsed is not None and parsed.vmid == vmid and parsed.key == key
            and parsed.role == naming.ROLE_BITMAP and parsed.tag is not None)


def _check_base(base: BitmapState | None) -> str | None:
    """Why a bitmap cannot serve as the base of an incremental read (None: it can)."""
    if base is None:
        return "bitmap missing (QEMU restarted or bitmap removed)"
    if base.inconsistent:
        return "bitmap inconsistent (QEMU did not store it cleanly)"
    if base.busy:
        return "bitmap busy (in use by another job)"
    if not base.recording:
        return "bitmap not recording"
    if base.granularity < 512 or base.granularity & (base.granularity - 1):
        return f"bitmap has an unusable granularity {base.granularity}"
    return None


@dataclass(slots=True)
class IncrementalPlan:
    """Per drive: full or incremental, and the bitmaps this run starts and retires."""

    vmid: int
    previous: PreviousArchive | None
    drives: list[DriveDecision]
    vm_reason: str | None = None
    removed: list[str] = field(default_factory=list)
    _entries: dict[str, Entry] = field(default_factory=dict)
    _started_early: bool = False
    _tracking: bool = False  # new bitmaps wanted; named once the new archive's uuid is known

    @property
    def incremental(self) -> list[DriveDecision]:
        return [d for d in self.drives if d.incremental]

    def log_lines(self) -> list[str]:
        """One line per drive (or one for the whole VM when the reason is the VM's)."""
        if self.vm_reason is not None:
            return [f"dirty-bitmap: full read - {self.vm_reason}"]
        lines = []
        for d in self.drives:
            if d.incremental:
                assert self.previous is not None
                lines.append(f"{d.key}: dirty-bitmap status: OK - unchanged clusters from "
                             f"{self.previous.path.name}")
            else:
                lines.append(f"{d.key}: dirty-bitmap: full read - {d.reason}")
        return lines

    def actions(self) -> list[dict[str, Any]]:
        """``block-dirty-bitmap-add`` actions for the jobs' transaction (new bitmaps start with the jobs)."""
        if self._started_early:
            return []
        return [{"type": "block-dirty-bitmap-add",
                 "data": {"node": d.node, "name": d.new_bitmap, "granularity": GRANULARITY,
                          "persistent": d.persistent}}
                for d in self.drives if d.new_bitmap is not None]

    def job_args(self) -> dict[str, dict[str, Any]]:
        """Per drive key, the job arguments of an incremental read (see the module docstring)."""
        args = {}
        for d in self.incremental:
            # With fleecing the job reads the snapshot node, through the base's copy there.
            bitmap = self._snapshot_copy(d.key) if self._started_early else d.base
            args[d.key] = {"sync": "bitmap", "bitmap": bitmap, "bitmap-mode": "never"}
        return args

    def _snapshot_copy(self, key: str) -> str:
        return naming.bitmap_name(self.vmid, key, ROLE_SNAPSHOT_COPY)

    def cbw_bitmap(self, key: str) -> dict[str, str] | None:
        """The ``bitmap`` argument of the drive's copy-before-write filter (copy only changed areas).

        Only for a filter created *at* the snapshot point: QEMU copies the bitmap when the
        filter opens, and a cluster changed between then and the snapshot point is neither
        copied before write nor readable from the snapshot, so the job fails (proven in
        tests/backup/test_incremental_fleecing.py). Our fleecing adds its filters earlier,
        so it must not use this.
        """
        for d in self.drives:
            if d.key == key and d.base is not None:
                return {"node": d.node, "name": d.base}
        return None

    def set_new_uuid(self, new_uuid: UUID | str) -> None:
        """Name the new bitmaps after the new archive (when it was not known at planning time)."""
        if self._tracking:
            self.drives = [replace(d, new_bitmap=bitmap_for(self.vmid, d.key, new_uuid)) for d in self.drives]

    def record(self, journal: Journal) -> None:
        """Journal the new bitmaps before the transaction creates them."""
        for d in self.drives:
            if d.new_bitmap is not None:
                self._entries[d.key] = journal.record(kinds.BITMAP, node=d.node, name=d.new_bitmap)

    async def start_bitmaps(self, session: QmpSession, journal: Journal) -> None:
        """Fleecing, before the snapshot point: start the new bitmaps now (journaled).

        ``qom-set`` (the snapshot point) cannot be in a transaction; a bitmap started a
        little early holds a few more clusters than needed, never fewer. From now on
        :meth:`job_args` names the base copies :meth:`bind_snapshots` will make.
        """
        self.record(journal)
        if self._entries:
            await session.execute("transaction", {"actions": self.actions()})
        self._started_early = True

    async def bind_snapshots(self, session: QmpSession, journal: Journal, snapshots: Mapping[str, str]) -> None:
        """Fleecing, after the snapshot point: the job reads the snapshot-access node (key → node).

        A job's bitmap must live on its source node, so each base is copied into a disabled
        bitmap there; the copy goes with the node. The base itself stays
        enabled and untouched: after a failure it still covers every change.
        """
        for d in self.incremental:
            assert d.base is not None
            snap = snapshots[d.key]
            copy = self._snapshot_copy(d.key)
            self._entries[f"{d.key}/snapshot"] = journal.record(kinds.BITMAP, node=snap, name=copy)
            await session.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": snap, "name": copy, "granularity": GRANULARITY, "disabled": True}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": snap, "target": copy, "bitmaps": [{"node": d.node, "name": d.base}]}},
            ]})

    async def commit(self, session: QmpSession, journal: Journal) -> list[str]:
        """After the archive is published: keep the new bitmaps, remove the bases; warnings."""
        warnings = []
        for name, entry in self._entries.items():
            if name.endswith("/snapshot"):
                node, bitmap = str(entry.data["node"]), str(entry.data["name"])
                try:
                    await remove_bitmap(session, node, bitmap)
                except QmpCommandError as exc:
                    warnings.append(f"could not remove dirty bitmap {bitmap} from {node}: {exc}")
                    continue  # left to the journal
            journal.resolve(entry)
        self._entries.clear()
        for d in self.drives:
            if d.base is None:
                continue
            try:
                await remove_bitmap(session, d.node, d.base)
            except QmpCommandError as exc:
                warnings.append(f"{d.key}: could not remove dirty bitmap {d.base}: {exc}")
        return warnings

    async def drop_bases(self, session: QmpSession) -> None:
        """The previous archive proved damaged: no later run may build on it."""
        for d in self.drives:
            if d.base is not None:
                try:
                    await remove_bitmap(session, d.node, d.base)
                except QmpCommandError as exc:
                    log.warning("%s: could not remove dirty bitmap %s: %s", d.key, d.base, exc)


async def plan_incremental(
    session: QmpSession,
    vmid: int,
    drives: Sequence[tuple[str, str, int]],
    *,
    dump_dir: Path,
    enabled: bool,
    new_uuid: UUID | str | None,
    to_stdout: bool,
    persistent_ok: bool,
    full_reason: str | None = None,
) -> IncrementalPlan:
    """Decide per drive ``(key, node, size)`` (module docstring); removes our bitmaps that can
    never serve again.

    The bitmaps live on each drive's own node (the disk's, also when its block job reads a
    fleecing snapshot). ``new_uuid`` None: the new bitmaps are named later, by
    :meth:`IncrementalPlan.set_new_uuid`. ``full_reason``: read every drive in full for this
    reason, but still start the new bitmaps (the run after a damaged previous archive).
    """
    if to_stdout:
        # The new archive will not be in the dump dir: leave the dump dir's chain as it is.
        return IncrementalPlan(vmid, None, [DriveDecision(key, node, size, None, False, None, TO_STDOUT)
                                            for key, node, size in drives], TO_STDOUT)
    previous: PreviousArchive | None
    vm_reason: str | None
    if not enabled:
        previous, vm_reason = None, DISABLED
    elif full_reason is not None:
        previous, vm_reason = None, full_reason
    else:
        previous, vm_reason = newest_archive(dump_dir, vmid)
    states = await node_states(session)
    plan = IncrementalPlan(vmid, previous, [], vm_reason, _tracking=enabled)
    for key, node, size in drives:
        state = states.get(node, NodeState("", False, ()))
        expected = bitmap_for(vmid, key, previous.uuid) if previous is not None else None
        mine = {b.name: b for b in state.bitmaps if _ours(vmid, key, b.name)}
        reason = vm_reason
        if reason is None:
            assert previous is not None and expected is not None
            old_size = previous.sizes.get(vma_device_name(key))
            if old_size is None:
                reason = f"drive added (not in {previous.path.name})"
            elif old_size != size:
                reason = f"drive resized ({old_size} -> {size} bytes)"
            else:
                reason = _check_base(mine.get(expected))
        base = expected if reason is None else None
        for name, bitmap in mine.items():
            if name == base or bitmap.busy:
                continue
            await remove_bitmap(session, node, name)
            plan.removed.append(name)
            log.info("%s: removed dirty bitmap %s (it can no longer serve)", key, name)
        new_bitmap = bitmap_for(vmid, key, new_uuid) if enabled and new_uuid is not None else None
        persistent = persistent_ok and state.driver == "qcow2" and not state.read_only
        plan.drives.append(DriveDecision(key, node, size, new_bitmap, persistent, base, reason))
    return plan


def closing_lines(plan: IncrementalPlan, received: Mapping[str, int], reused: Mapping[str, int]) -> list[str]:
    """vzdump's closing lines, extended: changed bytes per drive, and VM versus previous archive."""
    lines = []
    for d in plan.incremental:
        lines.append(f"{d.key}: dirty-bitmap: {render_bytes(received.get(d.key, 0))} of "
                     f"{render_bytes(d.size)} changed")
    if plan.incremental:
        lines.append(f"read {render_bytes(sum(received.values()))} from the VM, "
                     f"{render_bytes(sum(reused.values()))} taken from the previous archive")
    return lines
