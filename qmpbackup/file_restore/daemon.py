"""The per-archive file-restore daemon: our NBD export of the archive, the helper VM, a control socket.

One daemon serves one archive, so follow-up calls skip the helper's boot (as Proxmox's file
restore keeps its VM). It lives in ``<run-dir>/file-restore/<key>/`` (0700): ``pid``,
``control.sock`` (clients), ``nbd.sock`` (the export), ``helper.sock`` (the helper's channel)
and QEMU's logs. It ends after ``idle_timeout`` seconds without a request, on ``stop``, on
SIGTERM/SIGINT, or when the helper dies, and removes its folder on the way out.

Client protocol on ``control.sock``: one JSON request line (``status``, ``stop``, ``list``,
``extract``), answered with the helper channel's frames (see ``wire``). Paths on this socket
use the archive's device names (``drive-scsi0/part1/etc``); the helper only ever sees serials.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmpbackup.errors import QmpBackupError
from qmpbackup.file_restore.channel import ChannelError, HelperChannel, end_status
from qmpbackup.file_restore.helper_vm import AttachedDevice, HelperVm, HelperVmSpec
from qmpbackup.file_restore.wire import END, HEAD, MAX_REQUEST, WireError, frame, json_frame, parse_request

DEFAULT_IDLE_S = 600.0
BOOT_TIMEOUT_S = 180.0

# serves the archive's devices read-only over NBD on the socket; yields (export name, size) pairs
DeviceSource = Callable[[Path, Path], AbstractAsyncContextManager[list[tuple[str, int]]]]


@dataclass(frozen=True)
class DaemonConfig:
    archive: Path
    folder: Path
    image: Path
    accel: str = "tcg"
    memory_mb: int = 256
    idle_timeout: float = DEFAULT_IDLE_S
    qemu: str = "qemu-system-x86_64"


class Daemon:
    def __init__(self, cfg: DaemonConfig, channel: HelperChannel, devices: tuple[AttachedDevice, ...],
                 vm: HelperVm) -> None:
        self.cfg = cfg
        self.channel = channel
        self.devices = devices
        self.vm = vm
        self.stop = asyncio.Event()
        self.activity = asyncio.Event()
        self.busy = 0

    def _to_guest(self, path: str) -> str:
        parts = [p for p in path.split("/") if p]
        for dev in self.devices:
            if parts and parts[0] == dev.name:
                return "/".join([dev.serial, *parts[1:]])
        raise _ClientError(f"{parts[0] if parts else path}: no such drive in this archive", "ENOENT")

    def _from_guest(self, text: str) -> str:
        for dev in self.devices:
            if text == dev.serial or text.startswith(dev.serial + "/"):
                return dev.name + text[len(dev.serial):]
        return text

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.busy += 1
        self.activity.set()
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), 30)
            await self._answer(parse_request(line[:-1]), writer)
        except _ClientError as exc:
            await _send(writer, json_frame(END, {"error": str(exc), "code": exc.code}))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, WireError,
                ConnectionError):
            pass
        except ChannelError as exc:
            with contextlib.suppress(ConnectionError):
                await _send(writer, json_frame(END, {"error": str(exc), "code": "EIO"}))
            self.stop.set()
        finally:
            self.busy -= 1
            self.activity.set()
            writer.close()

    async def _answer(self, req: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        op = req["op"]
        if op == "status":
            await _send(writer, json_frame(END, {"ok": True, "pid": os.getpid(), "archive": str(self.cfg.archive),
                                                  "drives": [d.name for d in self.devices]}))
            return
        if op == "stop":
            await _send(writer, json_frame(END, {"ok": True}))
            self.stop.set()
            return
        if op not in ("list", "extract"):
            raise _ClientError(f"unknown operation {op!r}", "EINVAL")
        path = str(req.get("path", ""))
        if op == "list" and not [p for p in path.split("/") if p]:
            entries = [{"name": d.name, "type": "drive", "size": d.size} for d in self.devices]
            await _send(writer, json_frame(HEAD, {"entries": entries}) + json_frame(END, {"ok": True}))
            return
        forward = dict(req, path=self._to_guest(path))
        client_gone = False
        async with contextlib.aclosing(self.channel.request(forward)) as frames:
            async for kind, payload in frames:
                if kind != b"D":
                    payload = self._rename(kind, payload)
                if client_gone:
                    continue
                try:
                    await _send(writer, frame(kind, payload))
                except ConnectionError:
                    client_gone = True  # keep reading: the helper's reply must end at its E frame

    def _rename(self, kind: bytes, payload: bytes) -> bytes:
        """Serials back to device names in errors (end frames) and drive entries (headers)."""
        obj = end_status(payload)
        if kind == END and "error" in obj:
            obj["error"] = self._from_guest(str(obj["error"]))
        return json.dumps(obj, separators=(",", ":")).encode()

    async def serve(self) -> None:
        sock = self.cfg.folder / "control.sock"
        server = await asyncio.start_unix_server(self.handle, path=str(sock), limit=MAX_REQUEST + 1)
        os.chmod(sock, 0o600)
        vm_dead = asyncio.ensure_future(self.vm.proc.wait())
        try:
            async with server:
                while not self.stop.is_set():
                    self.activity.clear()
                    waiters = [asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(self.activity.wait())]
                    done, _ = await asyncio.wait([*waiters, vm_dead], timeout=self.cfg.idle_timeout,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    for w in waiters:
                        w.cancel()
                    if vm_dead in done:
                        print(f"file-restore: the helper VM ended: {self.vm.last_words()}", file=sys.stderr)
                        break
                    if not done and self.busy == 0:
                        break  # idle
        finally:
            vm_dead.cancel()


class _ClientError(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def run(cfg: DaemonConfig, source: DeviceSource) -> None:
    """Serve until stopped or idle; everything started here is ended here."""
    (cfg.folder / "pid").write_text(f"{os.getpid()}\n")
    try:
        async with contextlib.AsyncExitStack() as stack:
            exports = await stack.enter_async_context(source(cfg.archive, cfg.folder / "nbd.sock"))
            devices = tuple(AttachedDevice(f"d{i}", name, size, name) for i, (name, size) in enumerate(exports))
            spec = HelperVmSpec(cfg.image, cfg.folder, cfg.folder / "nbd.sock", devices, cfg.accel,
                                cfg.memory_mb, cfg.qemu)
            vm = await HelperVm.start(spec)
            stack.push_async_callback(vm.stop)
            (cfg.folder / "qemu.pid").write_text(f"{vm.pid}\n")
            channel = await HelperChannel.connect(spec.channel, 30)
            stack.push_async_callback(channel.close)
            hello = asyncio.ensure_future(channel.call({"op": "hello"}, BOOT_TIMEOUT_S))
            dead = asyncio.ensure_future(vm.proc.wait())
            await asyncio.wait([hello, dead], return_when=asyncio.FIRST_COMPLETED)
            dead.cancel()
            if not hello.done() or hello.exception() is not None:
                hello.cancel()
                await asyncio.sleep(0.2)  # QEMU's last words reach its log
                raise QmpBackupError(f"the helper VM ended while booting: {vm.last_words()}")
            seen = hello.result().get("drives", {})
            missing = [d.name for d in devices if d.serial not in seen]
            if missing:
                raise QmpBackupError(f"the helper VM does not see {', '.join(missing)}")
            await Daemon(cfg, channel, devices, vm).serve()
    finally:
        shutil.rmtree(cfg.folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def archive_source(archive: Path, socket: Path) -> AsyncIterator[list[tuple[str, int]]]:
    """The archive's devices through our read-only NBD export (random access by the index)."""
    from qmpbackup.nbd import Export, NbdServer
    from qmpbackup.vma.random_access import ArchiveDevices

    with ArchiveDevices.open(archive) as archive_devices:
        devices = archive_devices.devices
        exports = [Export(d.name, d.size, source=d) for d in devices]
        async with NbdServer(socket, exports, name="file-restore", keep_serving=True):
            yield [(d.name, d.size) for d in devices]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qmpbackup-file-restore-daemon")
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--accel", default="tcg")
    parser.add_argument("--memory-mb", type=int, default=256)
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_S)
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    args = parser.parse_args(argv)
    cfg = DaemonConfig(args.archive, args.folder, args.image, args.accel, args.memory_mb, args.idle_timeout,
                       args.qemu)

    async def main_task() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
        await run(cfg, archive_source)

    try:
        asyncio.run(main_task())
    except asyncio.CancelledError:
        return 0
    except QmpBackupError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
