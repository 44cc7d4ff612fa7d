"""A small NBD client: connect, ``OPT_GO``, ``TRIM``, ``READ``, ``DISC``.

Fleecing's 7.2 reclaim path uses it to talk to QEMU's own NBD server on a private unix socket. Simple replies only (no
structured replies are negotiated), one request in flight: TRIMs are batched by the
caller, so the round trips do not matter.
"""

from __future__ import annotations

import asyncio
import logging
import struct

from qmpbackup.nbd import proto
from qmpbackup.nbd.errors import NbdError
from qmpbackup.nbd.proto import Cmd, Opt, Rep, TFlag

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 60.0


class NbdClientError(NbdError):
    """The NBD conversation with QEMU failed; ``errno`` is the server's error code if it sent one."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        self.errno = errno
        super().__init__(message)


class NbdClient:
    """One connection to one export. Use :meth:`connect`, then requests, then :meth:`close`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        self._reader = reader
        self._writer = writer
        self.name = name
        self.size = -1
        self.tflags = TFlag(0)
        self._cookie = 0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<NbdClient {self.name} size={self.size}>"

    @classmethod
    async def connect(cls, socket: str, name: str, timeout: float = CONNECT_TIMEOUT_S) -> NbdClient:
        """Connect to ``socket`` and select export ``name``."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(socket)
                client = cls(reader, writer, name)
                try:
                    await client._handshake()
                except BaseException:
                    writer.close()
                    raise
        except TimeoutError:
            raise NbdClientError(f"NBD export {name} at {socket}: no handshake within {timeout:g} s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise NbdClientError(f"NBD export {name} at {socket}: {exc}") from exc
        return client

    async def _handshake(self) -> None:
        magic, opt, _flags = proto.SERVER_GREETING.unpack(await self._reader.readexactly(proto.SERVER_GREETING.size))
        if (magic, opt) != (proto.NBDMAGIC, proto.IHAVEOPT):
            raise NbdClientError(f"NBD export {self.name}: not a newstyle NBD server")
        self._writer.write(proto.CLIENT_FLAGS.pack(proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES))
        raw = self.name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        self._writer.write(proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.GO, len(data)) + data)
        await self._writer.drain()
        while True:
            rmagic, _opt, rtype, length = proto.OPTION_REPLY_HEADER.unpack(
                await self._reader.readexactly(proto.OPTION_REPLY_HEADER.size))
            payload = await self._reader.readexactly(length)
            if rmagic != proto.OPTION_REPLY_MAGIC:
                raise NbdClientError(f"NBD export {self.name}: bad option reply")
            if rtype & proto.REP_FLAG_ERROR:
                raise NbdClientError(f"NBD export {self.name}: server refused it ({rtype & 0xFF}):"
                                     f" {payload.decode(errors='replace')}")
            if rtype == Rep.INFO and len(payload) >= proto.INFO_EXPORT.size:
                kind, size, tflags = proto.INFO_EXPORT.unpack(payload[: proto.INFO_EXPORT.size])
                if kind == 0:
                    self.size, self.tflags = size, TFlag(tflags)
            if rtype == Rep.ACK:
                return

    async def _request(self, cmd: int, offset: int, length: int, timeout: float) -> bytes:
        async with self._lock:
            self._cookie += 1
            try:
                async with asyncio.timeout(timeout):
                    self._writer.write(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, cmd, self._cookie, offset, length))
                    await self._writer.drain()
                    magic, error, cookie = proto.SIMPLE_REPLY.unpack(
                        await self._reader.readexactly(proto.SIMPLE_REPLY.size))
                    if magic != proto.SIMPLE_REPLY_MAGIC or cookie != self._cookie:
                        raise NbdClientError(f"NBD export {self.name}: unexpected reply")
                    data = b""
                    if cmd == Cmd.READ and error == 0:
                        data = await self._reader.readexactly(length)
            except TimeoutError:
                raise NbdClientError(f"NBD export {self.name}: no reply within {timeout:g} s") from None
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise NbdClientError(f"NBD export {self.name}: connection lost: {exc}") from exc
        if error:
            raise NbdClientError(f"NBD export {self.name}: {Cmd(cmd).name} {offset}+{length} failed:"
                                 f" errno {error}", error)
        return data

    async def trim(self, offset: int, length: int, timeout: float = REQUEST_TIMEOUT_S) -> None:
        if not self.tflags & TFlag.SEND_TRIM:
            raise NbdClientError(f"NBD export {self.name} does not accept TRIM")
        await self._request(Cmd.TRIM, offset, length, timeout)

    async def read(self, offset: int, length: int, timeout: float = REQUEST_TIMEOUT_S) -> bytes:
        return await self._request(Cmd.READ, offset, length, timeout)

    async def close(self) -> None:
        """Send DISC and close; safe twice, never raises an ``Exception``."""
        if self._writer.is_closing():
            return
        try:
            self._writer.write(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
            async with asyncio.timeout(5):
                await self._writer.drain()
        except (OSError, TimeoutError):
            pass
        self._writer.close()
        try:
            async with asyncio.timeout(5):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            pass
