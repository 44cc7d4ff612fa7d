"""A QMP peer on a real unix socket, for testing a backup run's phase logic in-process.

It is not QEMU and does not try to be: it answers the commands a run sends with replies of
QEMU's shape, keeps a small block graph (nodes, a device's node, dirty bitmaps, block jobs),
emits ``JOB_STATUS_CHANGE`` events, and plays the block job's part of the data path: for each
``blockdev-backup`` it writes the disk's content into the NBD export (our endpoint) of the
target node, or of its ``data-file`` node (our qcow2 target), then FLUSH and DISC when that NBD
node is deleted. What only QEMU can show (point in time, copy-before-write, bitmaps that
really track writes) stays with the tests that run real QEMU.

Scripting: ``fail[command] = "text"`` answers that command with an error; ``busy_nodes``
are nodes ``blockdev-del`` refuses; ``job_error = "text"`` makes every block job conclude
with that error after writing; ``log`` records every command with its arguments.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmpbackup.nbd.proto import Cmd
from tests.nbd.client import Client

VERSION: dict[str, Any] = {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": "fake"}
GREETING: dict[str, Any] = {"QMP": {"version": VERSION, "capabilities": []}}


def disk_content(size: int) -> bytes:
    """What the fake disk holds: every 64 KiB cluster its index, the rest zero (sparse)."""
    data = bytearray(size)
    for offset in range(0, size, 4 << 16):
        data[offset:offset + 8] = struct.pack(">Q", offset // 65536 + 1)
    return bytes(data)


def schema(*, fleecing: bool) -> list[dict[str, Any]]:
    """A ``query-qmp-schema`` reply with just enough in it for the capability probe."""
    drivers = ["file", "raw", "qcow2", "nbd"] + (["copy-before-write", "snapshot-access"] if fleecing else [])
    cbw = [{"name": n, "type": "str"} for n in ("file", "target", "on-cbw-error")]
    return [
        {"meta-type": "command", "name": "blockdev-add", "arg-type": "0", "ret-type": "17"},
        {"meta-type": "object", "name": "0", "tag": "driver", "members": [{"name": "driver", "type": "1"}],
         "variants": [{"case": "copy-before-write", "type": "2"}] if fleecing else []},
        {"meta-type": "enum", "name": "1", "values": drivers},
        {"meta-type": "object", "name": "2", "members": cbw},
        {"meta-type": "command", "name": "blockdev-backup", "arg-type": "3", "ret-type": "17"},
        {"meta-type": "object", "name": "3", "members": [{"name": n, "type": "str"} for n in ("job-id", "device")]},
        {"meta-type": "command", "name": "block-dirty-bitmap-add", "arg-type": "4", "ret-type": "17"},
        {"meta-type": "object", "name": "4", "members": [{"name": "persistent", "type": "bool"}]},
        {"meta-type": "builtin", "name": "str", "json-type": "string"},
        {"meta-type": "builtin", "name": "bool", "json-type": "boolean"},
    ]


@dataclass
class Job:
    id: str
    device: str
    target: str
    size: int
    status: str = "created"
    done: int = 0
    error: str | None = None
    task: asyncio.Task[None] | None = None


@dataclass
class FakeDisk:
    key: str  # scsi0
    size: int
    node: str = ""
    file_node: str = ""

    def __post_init__(self) -> None:
        self.node = self.node or f"drive-{self.key}"
        self.file_node = self.file_node or f"{self.node}-file"


@dataclass
class FakeQemu:
    """One VM's QMP monitor. ``async with FakeQemu(path, disks) as qemu``."""

    path: Path
    disks: list[FakeDisk]
    fleecing: bool = False
    status: str = "running"
    fail: dict[str, str] = field(default_factory=dict)
    busy_nodes: set[str] = field(default_factory=set)  # blockdev-del refuses these
    job_error: str | None = None
    log: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    device_node: dict[str, str] = field(default_factory=dict)  # qdev -> node the device uses
    bitmaps: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # node -> name -> info
    jobs: dict[str, Job] = field(default_factory=dict)
    _targets: dict[str, Client] = field(default_factory=dict)  # target node -> NBD connection
    _writer: asyncio.StreamWriter | None = None
    _server: asyncio.Server | None = None

    def __post_init__(self) -> None:
        for d in self.disks:
            self.nodes[d.file_node] = {"drv": "file", "file": f"/images/{d.key}.raw", "size": d.size}
            self.nodes[d.node] = {"drv": "raw", "file": f"/images/{d.key}.raw", "size": d.size,
                                  "children": {"file": d.file_node}}
            self.device_node[d.key] = d.node

    async def __aenter__(self) -> FakeQemu:
        self._server = await asyncio.start_unix_server(self._on_client, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for job in self.jobs.values():
            if job.task is not None:
                job.task.cancel()
        for client in self._targets.values():
            await client.close()
        if self._writer is not None:
            self._writer.close()

    # -- what a test asks -----------------------------------------------------------------

    def commands(self) -> list[str]:
        return [name for name, _ in self.log]

    def ours(self) -> list[str]:
        """Everything of a backup still in the VM: nodes, jobs, bitmaps, a device moved, a pause."""
        left = [n for n in self.nodes if n.startswith("qmpbackup-")]
        left += [f"job {j}" for j in self.jobs]
        left += [f"bitmap {b}" for bms in self.bitmaps.values() for b in bms]
        left += [f"device {q} on {n}" for q, n in self.device_node.items() if n.startswith("qmpbackup-")]
        if self.status != "running":
            left.append(f"VM {self.status}")
        return left

    # -- the wire -------------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._send(GREETING)
        decoder = json.JSONDecoder()
        buffer = ""
        try:
            while chunk := await reader.read(65536):
                buffer += chunk.decode()
                while buffer.strip():
                    try:
                        message, end = decoder.raw_decode(buffer.lstrip())
                    except json.JSONDecodeError:
                        break
                    buffer = buffer.lstrip()[end:]
                    await self._dispatch(message)
        except (ConnectionError, asyncio.CancelledError):
            pass

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(message).encode() + b"\n")

    def _event(self, name: str, data: dict[str, Any]) -> None:
        self._send({"event": name, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}})

    async def _dispatch(self, message: dict[str, Any]) -> None:
        command, args, mid = message["execute"], message.get("arguments") or {}, message.get("id")
        self.log.append((command, args))
        reply: dict[str, Any]
        try:
            if command in self.fail:
                raise QmpError(self.fail[command])
            handler = getattr(self, "_cmd_" + command.replace("-", "_"), None)
            if handler is None:
                raise QmpError(f"The command {command} has not been found", "CommandNotFound")
            reply = {"return": await handler(args)}
        except QmpError as exc:
            reply = {"error": {"class": exc.cls, "desc": exc.desc}}
        if mid is not None:
            reply["id"] = mid
        self._send(reply)

    # -- commands -------------------------------------------------------------------------

    async def _cmd_qmp_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def _cmd_query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status, "running": self.status == "running"}

    async def _cmd_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        self.status = "paused"
        return {}

    async def _cmd_cont(self, args: dict[str, Any]) -> dict[str, Any]:
        self.status = "running"
        return {}

    async def _cmd_query_version(self, args: dict[str, Any]) -> dict[str, Any]:
        return dict(VERSION)

    async def _cmd_query_qmp_schema(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return schema(fleecing=self.fleecing)

    async def _cmd_query_block(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"device": f"drive-{d.key}", "qdev": d.key,
                 "inserted": {"node-name": self.device_node[d.key], "ro": False}} for d in self.disks]

    async def _cmd_query_named_block_nodes(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"node-name": name, "drv": n["drv"], "file": n.get("file", ""), "ro": False,
                 "image": {"virtual-size": n.get("size", 0)},
                 "dirty-bitmaps": [dict(b, name=bname) for bname, b in self.bitmaps.get(name, {}).items()]}
                for name, n in self.nodes.items()]

    async def _cmd_x_debug_query_block_graph(self, args: dict[str, Any]) -> dict[str, Any]:
        ids = {name: i for i, name in enumerate(self.nodes)}
        return {"nodes": [{"id": i, "type": "block-driver", "name": name} for name, i in ids.items()],
                "edges": [{"parent": ids[name], "child": ids[child], "name": role}
                          for name, n in self.nodes.items() for role, child in n.get("children", {}).items()
                          if child in ids]}

    async def _cmd_qom_get(self, args: dict[str, Any]) -> Any:
        qdev = str(args["path"]).removeprefix("/machine/peripheral/")
        if args["property"] == "type":
            return "scsi-hd"
        if args["property"] == "drive":
            return f"drive-{qdev}"
        raise QmpError(f"Property '{args['property']}' not found")

    async def _cmd_qom_set(self, args: dict[str, Any]) -> dict[str, Any]:
        qdev = str(args["path"]).removeprefix("/machine/peripheral/")
        if args["value"] not in self.nodes:
            raise QmpError(f"Cannot find device='' nor node-name='{args['value']}'")
        self.device_node[qdev] = str(args["value"])
        return {}

    async def _cmd_blockdev_add(self, args: dict[str, Any]) -> dict[str, Any]:
        name = str(args["node-name"])
        if name in self.nodes:
            raise QmpError(f"Duplicate nodes with node-name='{name}'")
        size = next((d.size for d in self.disks if d.key in name), 0)
        self.nodes[name] = {"drv": args["driver"], "size": size,
                            "children": {r: args[r] for r in ("file", "target", "data-file")
                                         if isinstance(args.get(r), str)}}
        if args["driver"] == "nbd":
            client = await Client.connect(str(args["server"]["path"]))
            negotiated = await client.go(str(args["export"]))
            self.nodes[name]["size"] = negotiated.size
            self._targets[name] = client
        return {}

    async def _cmd_blockdev_del(self, args: dict[str, Any]) -> dict[str, Any]:
        name = str(args["node-name"])
        if name not in self.nodes:
            raise QmpError(f"Failed to find node with node-name='{name}'")
        if any(job.target == name or job.device == name for job in self.jobs.values()):
            raise QmpError(f"Node '{name}' is busy: block device is in use by block job: backup")
        if name in self.busy_nodes:
            raise QmpError(f"Node '{name}' is busy: node is used as backing hd of '{name}-user'")
        client = self._targets.pop(name, None)
        if client is not None:
            try:  # as QEMU: flush and disconnect; an endpoint that is gone already is fine
                await client.request(Cmd.FLUSH)
                await client.disconnect()
            except (OSError, asyncio.IncompleteReadError):
                await client.close()
        del self.nodes[name]
        return {}

    async def _cmd_block_dirty_bitmap_add(self, args: dict[str, Any]) -> dict[str, Any]:
        node, name = str(args["node"]), str(args["name"])
        self.bitmaps.setdefault(node, {})[name] = {
            "granularity": args.get("granularity", 65536), "count": 0, "recording": not args.get("disabled"),
            "busy": False, "persistent": bool(args.get("persistent")), "inconsistent": False}
        return {}

    async def _cmd_block_dirty_bitmap_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        node, name = str(args["node"]), str(args["name"])
        if name not in self.bitmaps.get(node, {}):
            raise QmpError(f"Dirty bitmap '{name}' not found")
        del self.bitmaps[node][name]
        if not self.bitmaps[node]:
            del self.bitmaps[node]
        return {}

    async def _cmd_transaction(self, args: dict[str, Any]) -> dict[str, Any]:
        for action in args["actions"]:  # all or nothing: check first
            if action["type"] == "blockdev-backup":
                data = action["data"]
                for node in (data["device"], data["target"]):
                    if node not in self.nodes:
                        raise QmpError(f"Cannot find device='' nor node-name='{node}'")
        for action in args["actions"]:
            data = action["data"]
            if action["type"] == "block-dirty-bitmap-add":
                await self._cmd_block_dirty_bitmap_add(data)
            elif action["type"] == "blockdev-backup":
                job = Job(str(data["job-id"]), str(data["device"]), str(data["target"]),
                          int(self.nodes[data["target"]]["size"]))
                self.jobs[job.id] = job
                job.task = asyncio.create_task(self._run_job(job))
        return {}

    async def _run_job(self, job: Job) -> None:
        self._set_job_status(job, "running")
        content = disk_content(job.size)
        target = job.target
        target = self.nodes[target]["children"].get("data-file", target)  # a qcow2 target's raw data file
        client = self._targets[target]
        try:
            for offset in range(0, job.size, 1 << 20):
                if await client.write(offset, content[offset:offset + (1 << 20)]) != 0:
                    raise OSError("the target refused a write")
                job.done = min(job.size, offset + (1 << 20))
                await asyncio.sleep(0)
        except (OSError, asyncio.IncompleteReadError):
            job.error = "Input/output error"
        job.error = job.error or self.job_error
        self._set_job_status(job, "concluded")

    def _set_job_status(self, job: Job, status: str) -> None:
        job.status = status
        self._event("JOB_STATUS_CHANGE", {"id": job.id, "status": status})

    async def _cmd_query_jobs(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": j.id, "type": "backup", "status": j.status, "current-progress": j.done,
                 "total-progress": j.size, **({"error": j.error} if j.error else {})} for j in self.jobs.values()]

    async def _cmd_job_dismiss(self, args: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.get(str(args["id"]))
        if job is None or job.status != "concluded":
            raise QmpError(f"Job '{args['id']}' in state '{job.status if job else '?'}' cannot accept command")
        del self.jobs[job.id]
        return {}

    async def _cmd_block_job_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.get(str(args["device"]))
        if job is None:
            raise QmpError(f"Block job '{args['device']}' not found", "DeviceNotActive")
        if job.task is not None:
            job.task.cancel()
        job.error = job.error or "Operation canceled"
        self._set_job_status(job, "concluded")
        return {}

    async def _cmd_block_job_set_speed(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def _cmd_query_block_exports(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return []


class QmpError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc, self.cls = desc, cls

