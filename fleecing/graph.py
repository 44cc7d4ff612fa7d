"""The per-drive fleecing graph, built and torn down in the proven order.

::

    device --drive--> cbw (copy-before-write) --file--> the disk's top node
                       |  target                 ^
                       v                         | file
                     fleece (qcow2|raw) <- flfile   snap (snapshot-access) <- backup job

Build: image → ``flfile`` + ``fleece`` (``discard: unmap``) → ``cbw`` (``on-cbw-error:
break-snapshot``, ``cbw-timeout`` where the schema has it, optional ``bitmap``) → device's
``drive`` set to ``cbw`` (the snapshot point; never to the node it already has: that
aborts QEMU 7.2) → ``snap``. Teardown in reverse. Every resource is recorded in the
journal before it is created; every undo step first asks QEMU what is there, so it is
safe to run twice and after a crash.

Which node a device uses is read from ``query-block`` (``qom-get drive`` answers with the
BlockBackend's *name* for ``-drive`` devices, which never changes; it is logged only).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fleecing.errors import GraphError
from fleecing.images import FleecingImage, create_image, free_image, image_exists
from fleecing.runner import Runner, run_command
from fleecing.storage import FleecingPlan
from qmpbackup.qemu import naming
from qmpbackup.qemu.capabilities import Capabilities
from qmpbackup.qemu.discovery import Disk
from qmpbackup.qemu.errors import QmpCommandError
from qmpbackup.qemu.nodes import add_node, delete_node, node_exists
from qmpbackup.qemu.session import QmpSession
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Entry, Journal

log = logging.getLogger(__name__)

#: Proxmox's value: VirtIO-win drivers time guest I/O out at 60 s; give up a bit before.
CBW_TIMEOUT_S = 45
EXPORT_GONE_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class DriveNames:
    """Our node names for one drive (all from :mod:`qmpbackup.qemu.naming`)."""

    fleece_file: str
    fleece: str
    cbw: str
    snap: str
    snaptrim: str

    @classmethod
    def of(cls, vmid: int, key: str) -> DriveNames:
        return cls(*(naming.node_name(vmid, key, r) for r in (
            naming.ROLE_FLEECE_FILE, naming.ROLE_FLEECE, naming.ROLE_CBW, naming.ROLE_SNAPSHOT,
            naming.ROLE_SNAPSHOT_TRIM)))


def check_capabilities(caps: Capabilities) -> None:
    """Fleecing that could fail guest writes is worse than none: refuse such a QEMU."""
    missing = [what for what, ok in (("copy-before-write", caps.has_copy_before_write),
                                     ("snapshot-access", caps.has_snapshot_access),
                                     ("on-cbw-error", caps.has_on_cbw_error)) if not ok]
    if missing:
        raise GraphError(f"QEMU {caps.version_text} cannot fleece safely (no {', '.join(missing)}); needs QEMU >= 7.1")


async def current_node(session: QmpSession, qdev: str) -> str | None:
    """The node the device ``qdev``'s BlockBackend uses now, or None (no such device or medium)."""
    for block in await session.execute("query-block"):
        if block.get("qdev") == qdev:
            inserted = block.get("inserted")
            return str(inserted["node-name"]) if inserted else None
    return None


async def set_device_node(session: QmpSession, qdev: str, qom_path: str, node: str) -> bool:
    """Point the device at ``node`` unless it is there already. True if it was changed.

    The guard matters: ``qom-set drive`` to the node the device already has aborts QEMU 7.2.
    """
    now = await current_node(session, qdev)
    try:
        shown = await session.execute("qom-get", {"path": qom_path, "property": "drive"})
    except QmpCommandError as exc:
        raise GraphError(f"device {qom_path} has no 'drive' property: {exc.desc}") from exc
    log.debug("device %s: drive %r, node %r, wanted %r", qom_path, shown, now, node)
    if now is None:
        raise GraphError(f"device {qdev} has no block node (was it unplugged?)")
    if now == node:
        return False
    await session.execute("qom-set", {"path": qom_path, "property": "drive", "value": node})
    return True


async def restore_device(session: QmpSession, data: Mapping[str, Any]) -> None:
    """Give the device its original node back if our filter still sits there (undo of ``drive-filter``).

    A filter node that no longer exists counts as undone: whatever the device uses now
    (its QEMU was restarted, someone else changed it) is not ours to change.
    """
    qdev, original, filter_node = str(data["qdev"]), str(data["original"]), str(data["filter"])
    now = await current_node(session, qdev)
    if now is None or now == original:
        return
    if now != filter_node:
        if not await node_exists(session, filter_node):
            return
        raise GraphError(f"device {qdev} is on node {now!r}, neither ours ({filter_node}) nor its own ({original})")
    await set_device_node(session, qdev, str(data["qom_path"]), original)
    log.info("device %s is back on node %s", qdev, original)


async def delete_export(session: QmpSession, export_id: str, timeout: float = EXPORT_GONE_TIMEOUT_S) -> None:
    """Remove a block export (hard: drop its clients) and wait until QEMU lists it no more."""
    async with asyncio.timeout(timeout):
        asked = False
        while True:
            exports = await session.execute("query-block-exports")
            if not any(e.get("id") == export_id for e in exports):
                return
            if not asked:
                try:
                    await session.execute("block-export-del", {"id": export_id, "mode": "hard"})
                except QmpCommandError:
                    pass  # it may be going away already; the next look decides
                asked = True
            await asyncio.sleep(0.05)


async def stop_nbd_server(session: QmpSession) -> None:
    try:
        await session.execute("nbd-server-stop")
    except QmpCommandError as exc:
        if "not running" not in exc.desc:
            raise


class GraphState(enum.Enum):
    NEW = "new"
    PREPARED = "prepared"  # image, fleece nodes and cbw exist; the device is unchanged
    INSERTED = "inserted"  # the device writes through cbw; snap exists (snapshot taken)
    TORN_DOWN = "torn-down"
    FAILED = "failed"


class DriveFleecing:
    """One drive's fleecing graph. :meth:`prepare` before the freeze, :meth:`insert` inside it
    (that is the point in time), the job reads :attr:`read_node`, then :meth:`teardown`."""

    def __init__(self, session: QmpSession, journal: Journal, caps: Capabilities, vmid: int, disk: Disk,
                 image: FleecingImage, plan: FleecingPlan, *, runner: Runner = run_command,
                 qemu_img: str = "qemu-img", bitmap: Mapping[str, str] | None = None,
                 cbw_timeout_s: int = CBW_TIMEOUT_S, no_flush: bool = True) -> None:
        check_capabilities(caps)
        self.session, self.journal, self.caps = session, journal, caps
        self.vmid, self.disk, self.image, self.plan = vmid, disk, image, plan
        self.names = DriveNames.of(vmid, disk.key)
        self.runner, self.qemu_img = runner, qemu_img
        self.bitmap = dict(bitmap) if bitmap else None
        self.cbw_timeout_s = cbw_timeout_s
        self.no_flush = no_flush
        self._entries: list[tuple[Entry, Callable[[], Awaitable[None]]]] = []
        self._state = GraphState.NEW

    def __repr__(self) -> str:
        return f"<DriveFleecing vm{self.vmid} {self.disk.key} {self._state.value}>"

    @property
    def state(self) -> GraphState:
        return self._state

    def _set_state(self, state: GraphState) -> None:
        log.debug("fleecing %s/%s: %s -> %s", self.vmid, self.disk.key, self._state.value, state.value)
        self._state = state

    @property
    def read_node(self) -> str:
        """The node the backup job reads (the snapshot)."""
        return self.names.snap

    def _record(self, kind: kinds.Kind, undo: Callable[[], Awaitable[None]], **data: Any) -> Entry:
        """Journal a resource about to be created, with the step that undoes it (same as cleanup's)."""
        entry = self.journal.record(kind, **data)
        self._track(entry, undo)
        return entry

    def _track(self, entry: Entry, undo: Callable[[], Awaitable[None]]) -> None:
        self._entries.append((entry, undo))

    def _forget(self, entry: Entry) -> None:
        self.journal.resolve(entry)
        self._entries = [(e, u) for e, u in self._entries if e is not entry]

    async def _add_node(self, args: dict[str, Any]) -> None:
        node = str(args["node-name"])
        await add_node(self.session, self.journal, args, error=GraphError,
                       recorded=lambda entry: self._track(entry, lambda: delete_node(self.session, node)),
                       refused=self._forget)

    def cbw_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"driver": "copy-before-write", "node-name": self.names.cbw,
                                "file": self.disk.top_node, "target": self.names.fleece,
                                "on-cbw-error": "break-snapshot"}
        if self.caps.has_cbw_timeout and self.cbw_timeout_s:
            args["cbw-timeout"] = self.cbw_timeout_s
        if self.bitmap:
            if not self.caps.has_cbw_bitmap:
                raise GraphError(f"QEMU {self.caps.version_text} has no copy-before-write bitmap")
            args["bitmap"] = self.bitmap
        return args

    def fleece_args(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(protocol node, format node) of the image."""
        img = self.image
        # No flushes: the image is thrown away after the backup and after a crash, so durability
        # buys nothing, and qcow2's metadata flushes would make guest writes wait for fsync.
        cache = {"direct": False, "no-flush": self.no_flush}
        proto = {"driver": "file" if img.is_file else "host_device", "node-name": self.names.fleece_file,
                 "filename": img.path, "discard": "unmap", "cache": cache}
        fmt: dict[str, Any] = {"driver": img.format, "node-name": self.names.fleece,
                               "file": self.names.fleece_file, "discard": "unmap", "cache": cache}
        if img.format == "raw" and img.alloc_size != img.size:
            fmt["size"] = img.size  # the volume was rounded up; QEMU must see the source's size
        return proto, fmt

    async def prepare(self) -> None:
        """Image, fleecing nodes and the filter; the device and the guest see nothing yet."""
        if self._state is not GraphState.NEW:
            raise GraphError(f"{self!r}: prepare twice")
        self._set_state(GraphState.FAILED)
        if await image_exists(self.image, self.runner):  # never record (and so delete) a stranger's image
            raise GraphError(f"fleecing image {self.image.path} already exists")
        self._record(kinds.FLEECING_IMAGE, lambda: free_image(self.image, self.runner), **self.image.as_record())
        await create_image(self.image, self.plan, self.runner, self.qemu_img)
        proto, fmt = self.fleece_args()
        await self._add_node(proto)
        await self._add_node(fmt)
        await self._add_node(self.cbw_args())
        self._set_state(GraphState.PREPARED)

    async def insert(self) -> None:
        """The point in time: the device writes through the filter from now on; add the snapshot."""
        if self._state is not GraphState.PREPARED:
            raise GraphError(f"{self!r}: insert needs a prepared graph")
        self._set_state(GraphState.FAILED)
        now = await current_node(self.session, self.disk.qdev)
        if now != self.disk.top_node:
            raise GraphError(f"device {self.disk.qdev} is on node {now!r}, expected {self.disk.top_node!r}:"
                             " its graph changed since discovery")
        data = {"qdev": self.disk.qdev, "qom_path": self.disk.qom_path, "original": self.disk.top_node,
                "filter": self.names.cbw}
        self._record(kinds.DRIVE_FILTER, lambda: restore_device(self.session, data), **data)
        await set_device_node(self.session, self.disk.qdev, self.disk.qom_path, self.names.cbw)
        await self._add_node({"driver": "snapshot-access", "node-name": self.names.snap,
                              "file": self.names.cbw, "discard": "unmap"})
        self._set_state(GraphState.INSERTED)

    async def teardown(self) -> None:
        """Undo everything this drive created, newest first; safe twice. Leaves failures pending
        in the journal (and raises the first) so the next run retries."""
        first: BaseException | None = None
        for entry, undo in reversed(list(self._entries)):
            try:
                await undo()
            except Exception as exc:  # keep going: the rest may still come down
                log.warning("fleecing teardown %s %s: %s", entry.kind, dict(entry.data), exc)
                first = first or exc
                continue
            self._forget(entry)
        if first is not None:
            self._set_state(GraphState.FAILED)
            raise first
        self._set_state(GraphState.TORN_DOWN)
