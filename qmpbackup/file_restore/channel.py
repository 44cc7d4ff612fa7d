"""The host end of the helper channel: one request at a time, each answered by frames up to ``E``.

QEMU holds the channel's unix socket; the helper's service reads a request only once it has
booted, so the first request (``hello``) also tells us that the helper is up.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from qmpbackup.errors import QmpBackupError
from qmpbackup.file_restore.wire import END, FRAME, WireError, parse_header, request_line


class ChannelError(QmpBackupError):
    """The helper's channel failed (the helper died, or broke the framing)."""


class HelperChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: Path, timeout: float) -> HelperChannel:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 22)
                return cls(reader, writer)
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise ChannelError(f"the helper's channel {path} did not appear") from None
                await asyncio.sleep(0.05)

    async def request(self, req: dict[str, Any],
                      first_timeout: float = 60.0) -> AsyncGenerator[tuple[bytes, bytes], None]:
        """Frames of the reply, the ``E`` frame last. The whole reply is always read, even when
        the caller stops early, so the next request starts at a frame boundary."""
        async with self._lock:
            self._writer.write(request_line(req))
            await self._writer.drain()
            done = False
            first = True
            try:
                while not done:
                    kind, payload = await self._frame(first_timeout if first else 300.0)
                    first = False
                    done = kind == END
                    yield kind, payload
            finally:
                while not done:  # the consumer went away: drain to the end frame
                    kind, _ = await self._frame(300.0)
                    done = kind == END

    async def call(self, req: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """A request whose whole answer is its end frame (``hello``)."""
        async for kind, payload in self.request(req, timeout):
            if kind == END:
                return end_status(payload)
        raise ChannelError("reply without end frame")  # pragma: no cover - request() guarantees it

    async def _frame(self, timeout: float) -> tuple[bytes, bytes]:
        return await read_frame(self._reader, timeout, ChannelError, "the helper VM")

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass


def end_status(payload: bytes) -> dict[str, Any]:
    try:
        status = json.loads(payload)
    except ValueError:
        raise ChannelError("the helper VM sent a bad end frame") from None
    if not isinstance(status, dict):
        raise ChannelError("the helper VM sent a bad end frame")
    return status


async def read_frame(reader: asyncio.StreamReader, timeout: float, error: type[QmpBackupError],
                     peer: str) -> tuple[bytes, bytes]:
    """One frame; a closed, silent or garbling peer is ``error`` naming ``peer``."""
    try:
        kind, length = parse_header(await asyncio.wait_for(reader.readexactly(FRAME.size), timeout))
        payload = await asyncio.wait_for(reader.readexactly(length), timeout)
    except asyncio.IncompleteReadError:
        raise error(f"{peer} closed the connection") from None
    except asyncio.TimeoutError:
        raise error(f"{peer} did not answer within {timeout:.0f} s") from None
    except WireError as exc:
        raise error(f"{peer} broke the protocol: {exc}") from None
    return kind, payload
