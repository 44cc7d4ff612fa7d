"""Which disks a running VM has, under the keys Proxmox gives them (``scsi0``, ``virtio1`` …).

Sources: ``query-block`` (devices and the node each BlockBackend uses),
``query-named-block-nodes`` (drivers, sizes, file names), ``x-debug-query-block-graph``
(which node is whose ``file`` child) and ``qom-get`` (device type and bus). Works the
same for ``-drive`` and ``-blockdev`` VMs. CD-ROMs, empty drives and devices that are
not disks (pflash, floppies) are skipped.

A disk's key comes, in this order, from its qdev id (``-device …,id=scsi0``), from a
``drive-<key>`` drive id (``-drive …,id=drive-scsi0``), or else from its bus type and
order of appearance (the next free index of that bus). ``ide-hd`` devices on an AHCI
controller that was added with ``-device`` are ``sata``; on the machine's own controller
(q35's built-in AHCI, PIIX IDE) they are ``ide``, as Proxmox lays them out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qmpbackup.qemu.errors import DiscoveryError, QmpCommandError

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"(ide|sata|scsi|virtio)(\d{1,2})")
PERIPHERAL = "/machine/peripheral/"

#: qdev type -> bus family of the key. Anything else is not a disk we back up.
DISK_TYPES: Mapping[str, str] = {
    "virtio-blk-device": "virtio",
    "virtio-blk-pci": "virtio",
    "scsi-hd": "scsi",
    "scsi-block": "scsi",
    "ide-hd": "ide",  # or sata, by controller
}
CDROM_TYPES = frozenset({"ide-cd", "scsi-cd"})
#: Drivers that sit above the disk's format node and pass data through.
FILTER_DRIVERS = frozenset(
    {
        "throttle",
        "copy-before-write",
        "preallocate",
        "compress",
        "copy-on-read",
        "blkdebug",
        "blklogwrites",
        "blkverify",
    }
)
#: Image formats: their ``file`` child is the protocol node.
FORMAT_DRIVERS = frozenset(
    {"raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "luks", "parallels", "bochs", "cloop", "dmg"}
)


class Executor(Protocol):
    """The one call discovery needs from a session."""

    async def execute(
        self, command: str, args: Mapping[str, object] | None = None, timeout: float | None = None
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class Disk:
    """One disk of a running VM.

    ``qdev`` is the BlockBackend's device as ``query-block`` names it (use it with HMP
    ``qemu-io -d``); ``qom_path`` is the device's QOM path (use it for ``qom-get``/``qom-set
    drive``). ``top_node`` is the node the device's BlockBackend uses; ``format_node`` the
    image format node below any filters; ``file_node`` the protocol node under it (the
    same as ``format_node`` when the device sits on a protocol node directly).
    """

    key: str
    bus: str
    device_type: str
    qdev: str
    qom_path: str
    drive_id: str | None
    top_node: str
    format_node: str
    file_node: str
    size: int  # bytes, the virtual size the guest sees
    format: str
    filename: str
    read_only: bool

    @property
    def vma_device_name(self) -> str:
        """The name Proxmox gives this disk inside a VMA archive."""
        return f"drive-{self.key}"


@dataclass(frozen=True, slots=True)
class _Candidate:
    qdev: str
    qom_path: str
    drive_id: str | None
    device_type: str
    bus: str
    key_hint: str | None
    inserted: Mapping[str, Any]


def _qom_path(qdev: str) -> str:
    return qdev if qdev.startswith("/") else PERIPHERAL + qdev


def _id_from_qdev(qdev: str) -> str | None:
    """The ``-device id=`` from a qdev path: ``scsi0`` or ``/machine/peripheral/virtio1/virtio-backend``."""
    if not qdev.startswith("/"):
        return qdev
    if qdev.startswith(PERIPHERAL):
        return qdev[len(PERIPHERAL) :].split("/", 1)[0]
    return None


def _key_hint(qdev: str, drive_id: str | None) -> str | None:
    dev_id = _id_from_qdev(qdev)
    if dev_id and KEY_RE.fullmatch(dev_id):
        return dev_id
    if drive_id and drive_id.startswith("drive-") and KEY_RE.fullmatch(drive_id[6:]):
        return drive_id[6:]
    return None


async def _qom_get(qmp: Executor, path: str, prop: str) -> str | None:
    try:
        value = await qmp.execute("qom-get", {"path": path, "property": prop})
    except QmpCommandError:
        return None
    return str(value) if value is not None else None


async def _bus_of_ide(qmp: Executor, qom_path: str) -> str:
    """``sata`` if the IDE device hangs on an AHCI controller added with ``-device``."""
    parent_bus = await _qom_get(qmp, qom_path, "parent_bus")
    if parent_bus and parent_bus.rsplit("/", 1)[0].startswith(("/machine/peripheral/", "/machine/peripheral-anon/")):
        return "sata"
    return "ide"


def _assign_keys(cands: Sequence[_Candidate]) -> list[str]:
    """Keys in candidate order: hints first, then the next free index per bus."""
    taken = {c.key_hint for c in cands if c.key_hint}
    keys: list[str] = []
    next_index: dict[str, int] = {}
    for c in cands:
        if c.key_hint:
            keys.append(c.key_hint)
            continue
        i = next_index.get(c.bus, 0)
        while f"{c.bus}{i}" in taken:
            i += 1
        key = f"{c.bus}{i}"
        taken.add(key)
        next_index[c.bus] = i + 1
        keys.append(key)
    return keys


class _Graph:
    """Child edges by node name, from ``x-debug-query-block-graph`` (or guessed by file name)."""

    def __init__(self, graph: Mapping[str, Any] | None, nodes: Mapping[str, Mapping[str, Any]]) -> None:
        self._nodes = nodes
        self._children: dict[str, dict[str, str]] = {}
        if graph is not None:
            names = {n["id"]: n.get("name") for n in graph.get("nodes", ()) if n.get("type") == "block-driver"}
            for e in graph.get("edges", ()):
                parent, child = names.get(e.get("parent")), names.get(e.get("child"))
                if parent and child:
                    self._children.setdefault(parent, {})[str(e.get("name"))] = child
        self._guess = graph is None

    def child(self, node: str, role: str) -> str | None:
        found = self._children.get(node, {}).get(role)
        if found or not self._guess or role != "file":
            return found
        # Without the graph: the protocol node is the other node with the same file name.
        filename = self._nodes[node].get("file")
        for name, info in self._nodes.items():
            if name != node and info.get("file") == filename and info.get("drv") not in FORMAT_DRIVERS | FILTER_DRIVERS:
                return name
        return None


def _nodes_below(top: str, graph: _Graph, nodes: Mapping[str, Mapping[str, Any]], where: str) -> tuple[str, str]:
    """(format node, protocol node) under ``top``, skipping filters."""
    node = top
    for _ in range(16):
        info = nodes.get(node)
        if info is None:
            raise DiscoveryError(f"{where}: block node {node!r} is not in query-named-block-nodes")
        if info.get("drv") not in FILTER_DRIVERS:
            break
        below = graph.child(node, "file")
        if below is None:
            raise DiscoveryError(f"{where}: filter node {node!r} ({info.get('drv')}) has no file child")
        node = below
    else:
        raise DiscoveryError(f"{where}: more than 16 filter nodes above the disk")
    if nodes[node].get("drv") in FORMAT_DRIVERS:
        file_node = graph.child(node, "file")
        if file_node is None:
            raise DiscoveryError(f"{where}: format node {node!r} has no file child")
        return node, file_node
    return node, node


async def discover_disks(qmp: Executor, vm: str = "?") -> tuple[Disk, ...]:
    """The VM's disks, sorted by key as strings (Proxmox's device order in an archive).

    :raise DiscoveryError: the block graph is inconsistent or two disks claim one key.
    :raise QmpTimeoutError, QmpCommandError, QmpOutcomeUnknownError: from the session.
    """
    blocks = await qmp.execute("query-block")
    node_list = await qmp.execute("query-named-block-nodes")
    nodes = {str(n["node-name"]): n for n in node_list if n.get("node-name")}
    try:
        graph_reply = await qmp.execute("x-debug-query-block-graph")
    except QmpCommandError:
        graph_reply = None
    graph = _Graph(graph_reply, nodes)

    cands: list[_Candidate] = []
    for b in blocks:
        qdev = b.get("qdev")
        drive_id = b.get("device") or None
        name = drive_id or qdev or "?"
        if not qdev:
            log.debug("VM %s: %s has no guest device, skipped", vm, name)
            continue
        if "inserted" not in b:
            log.debug("VM %s: %s is empty, skipped", vm, name)
            continue
        qom_path = _qom_path(qdev)
        dev_type = await _qom_get(qmp, qom_path, "type") or ""
        if dev_type in CDROM_TYPES:
            log.debug("VM %s: %s is a CD-ROM (%s), skipped", vm, name, dev_type)
            continue
        bus = DISK_TYPES.get(dev_type)
        if bus is None:
            log.debug("VM %s: %s is a %r, not a disk, skipped", vm, name, dev_type)
            continue
        if bus == "ide":
            bus = await _bus_of_ide(qmp, qom_path)
        cands.append(_Candidate(qdev, qom_path, drive_id, dev_type, bus, _key_hint(qdev, drive_id), b["inserted"]))

    disks: dict[str, Disk] = {}
    for c, key in zip(cands, _assign_keys(cands), strict=True):
        where = f"VM {vm} disk {key} ({c.qdev})"
        if key in disks:
            raise DiscoveryError(f"VM {vm}: two disks are both {key} ({disks[key].qdev} and {c.qdev})", vm)
        top = str(c.inserted.get("node-name", ""))
        if top not in nodes:
            raise DiscoveryError(f"{where}: its node {top!r} is not in query-named-block-nodes", vm)
        fmt_node, file_node = _nodes_below(top, graph, nodes, where)
        fmt = str(nodes[fmt_node].get("drv")) if fmt_node != file_node else "raw"
        size = nodes[top].get("image", {}).get("virtual-size")
        if not isinstance(size, int):
            raise DiscoveryError(f"{where}: node {top!r} reports no virtual size", vm)
        disks[key] = Disk(
            key=key,
            bus=c.bus,
            device_type=c.device_type,
            qdev=c.qdev,
            qom_path=c.qom_path,
            drive_id=c.drive_id,
            top_node=top,
            format_node=fmt_node,
            file_node=file_node,
            size=size,
            format=fmt,
            filename=str(nodes[file_node].get("file", "")),
            read_only=bool(c.inserted.get("ro", False)),
        )
    return tuple(disks[k] for k in sorted(disks))
