"""A qemu-ga stand-in on a unix socket, for fast tests of the client's protocol rules.

It copies the behaviour the real agent showed in the test guest: a 0xFF resets
the parser and is answered with a JSON parse error;
commands run one at a time; a reply produced after its client left is
delivered to the next client; freeze state outlives connections; a second
freeze while frozen is refused. Knobs let tests delay, fail, hang or cut the
connection. The real guest tests check the same rules against real qemu-ga.

The fixtures ``short_dir`` and ``fake_agent`` (a started agent in a short folder) are
imported by every conftest or test module that needs them.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

PARSE_ERROR = {"error": {"class": "GenericError", "desc": "JSON parse error, stray '\ufffd'"}}


class FakeAgent:
    def __init__(self, path: str) -> None:
        self.path = path
        self.frozen = False
        self.silent = False  # accept connections, never answer (QEMU up, no agent in the guest)
        self.delays: dict[str, float] = {}
        self.errors: dict[str, tuple[str, str]] = {}
        self.kick_on: set[str] = set()  # close the connection when this command arrives
        self.received: list[str] = []
        self.connections = 0
        self.shutdowns: list[str] = []
        self._writer: asyncio.StreamWriter | None = None
        self._pending = bytearray()
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self._worker: asyncio.Task[None] | None = None
        self._free = asyncio.Event()
        self._free.set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> FakeAgent:
        self._server = await asyncio.start_unix_server(self._on_client, self.path)
        self._worker = asyncio.create_task(self._work(), name="fake-agent worker")
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.kick()
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for task in list(self._handlers):
            task.cancel()
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 5)

    def queue_stale(self, data: bytes) -> None:
        """Bytes the next client receives first (replies left over from an earlier client)."""
        self._pending += data

    def kick(self) -> None:
        """Cut the current client's connection from the agent side."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _emit(self, data: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)
        else:
            self._pending += data

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._free.wait()  # QEMU serves one client at a time
            self._free.clear()
            self.connections += 1
            self._writer = writer
            if self._pending:
                writer.write(bytes(self._pending))
                self._pending.clear()
            buf = bytearray()
            while True:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                for byte in chunk:
                    if byte == 0xFF:
                        buf.clear()
                        self._queue.put_nowait({"execute": "__parse_error__"})
                    elif byte == ord("\n"):
                        if buf.strip():
                            self._queue.put_nowait(json.loads(bytes(buf)))
                        buf.clear()
                    else:
                        buf.append(byte)
        except (ConnectionError, OSError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            self._free.set()
            self._handlers.discard(task)

    async def _work(self) -> None:
        while True:
            request = await self._queue.get()
            if request is None:
                return
            command = request["execute"]
            self.received.append(command)
            if self.silent:
                continue
            if command in self.kick_on:
                self.kick()
            if command in self.delays:
                await asyncio.sleep(self.delays[command])
            answer = self._answer(command, request.get("arguments") or {})
            if answer:
                self._emit(answer)

    def _answer(self, command: str, args: dict[str, Any]) -> bytes:
        def reply(obj: object) -> bytes:
            return json.dumps(obj).encode() + b"\n"

        if command == "__parse_error__":
            return reply(PARSE_ERROR)
        if command == "guest-sync-delimited":
            return b"\xff" + reply({"return": args["id"]})
        if command in self.errors:
            cls, desc = self.errors[command]
            return reply({"error": {"class": cls, "desc": desc}})
        if self.frozen and command not in ("guest-ping", "guest-info", "guest-sync",
                                           "guest-fsfreeze-status", "guest-fsfreeze-thaw"):
            return reply({"error": {"class": "CommandNotFound",
                                    "desc": f"Command {command} has been disabled: "
                                            "the agent is in frozen state"}})
        if command == "guest-sync":
            return reply({"return": args["id"]})
        if command == "guest-ping":
            return reply({"return": {}})
        if command == "guest-info":
            return reply({"return": {"version": "7.2.99-fake", "supported_commands": []}})
        if command == "guest-fsfreeze-status":
            return reply({"return": "frozen" if self.frozen else "thawed"})
        if command == "guest-fsfreeze-freeze":
            self.frozen = True
            return reply({"return": 1})
        if command == "guest-fsfreeze-thaw":
            was, self.frozen = self.frozen, False
            return reply({"return": 1 if was else 0})
        if command == "guest-shutdown":
            self.shutdowns.append(args.get("mode", "powerdown"))
            return b""  # no reply on success
        if command == "guest-get-fsinfo":
            return reply({"return": [{"name": "vda", "mountpoint": "/mnt/data", "type": "ext4",
                                      "disk": []}]})
        return reply({"error": {"class": "CommandNotFound",
                                "desc": f"The command {command} has not been found"}})


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder for unix sockets (107-byte path limit; tmp_path can be long)."""
    with tempfile.TemporaryDirectory(prefix="qga-", dir="/tmp") as path:
        yield Path(path)


@pytest.fixture
async def fake_agent(short_dir: Path) -> AsyncIterator[FakeAgent]:
    agent = await FakeAgent(str(short_dir / "qga.sock")).start()
    try:
        yield agent
    finally:
        await agent.stop()
