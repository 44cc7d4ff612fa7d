"""A tiny asyncio NBD client for poking our server in tests (handshake, simple replies)."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

from qmpbackup.nbd import proto
from qmpbackup.nbd.proto import Cmd, Opt, Rep


@dataclass
class OptionReply:
    option: int
    type: int
    payload: bytes


@dataclass
class Negotiated:
    size: int = -1
    tflags: int = 0
    block_sizes: tuple[int, int, int] | None = None
    replies: list[OptionReply] = field(default_factory=list)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.handshake_flags = 0
        self._cookie = 0

    @classmethod
    async def connect(cls, path: str, *, client_flags: int = 3) -> Client:
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        magic, opt, flags = proto.SERVER_GREETING.unpack(
            await reader.readexactly(proto.SERVER_GREETING.size))
        assert (magic, opt) == (proto.NBDMAGIC, proto.IHAVEOPT)
        client.handshake_flags = flags
        writer.write(proto.CLIENT_FLAGS.pack(client_flags))
        return client

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, BrokenPipeError):
            pass

    async def send_option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(proto.OPTION_HEADER.pack(proto.IHAVEOPT, option, len(data)) + data)
        await self.writer.drain()

    async def read_reply(self) -> OptionReply:
        magic, option, rtype, length = proto.OPTION_REPLY_HEADER.unpack(
            await self.reader.readexactly(proto.OPTION_REPLY_HEADER.size))
        assert magic == proto.OPTION_REPLY_MAGIC
        return OptionReply(option, rtype, await self.reader.readexactly(length))

    async def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Sends an option; returns its replies up to and including ACK or an error."""
        await self.send_option(option, data)
        replies = []
        while True:
            reply = await self.read_reply()
            replies.append(reply)
            if reply.type == Rep.ACK or reply.type & proto.REP_FLAG_ERROR:
                return replies

    async def go(self, name: str, *, option: int = Opt.GO, infos: tuple[int, ...] = (3,)) -> Negotiated:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
        data += b"".join(struct.pack(">H", i) for i in infos)
        result = Negotiated(replies=await self.option(option, data))
        for reply in result.replies:
            if reply.type == Rep.INFO:
                (kind,) = struct.unpack_from(">H", reply.payload)
                if kind == 0:
                    _, result.size, result.tflags = proto.INFO_EXPORT.unpack(reply.payload)
                elif kind == 3:
                    _, *sizes = proto.INFO_BLOCK_SIZE.unpack(reply.payload)
                    result.block_sizes = (sizes[0], sizes[1], sizes[2])
        return result

    def send_request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                     payload: bytes = b"", magic: int = proto.REQUEST_MAGIC) -> int:
        self._cookie += 1
        self.writer.write(proto.REQUEST.pack(magic, flags, cmd, self._cookie, offset, length)
                          + payload)
        return self._cookie

    async def read_simple_reply(self) -> tuple[int, int]:
        """Returns (error, cookie)."""
        magic, error, cookie = proto.SIMPLE_REPLY.unpack(
            await self.reader.readexactly(proto.SIMPLE_REPLY.size))
        assert magic == proto.SIMPLE_REPLY_MAGIC
        return error, cookie

    async def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                      payload: bytes = b"") -> int:
        cookie = self.send_request(cmd, offset, length, flags=flags, payload=payload)
        await self.writer.drain()
        error, got = await self.read_simple_reply()
        assert got == cookie
        return error

    async def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        return await self.request(Cmd.WRITE, offset, len(data), flags=flags, payload=data)

    async def read_structured_reply(self) -> list[tuple[int, int, int, bytes]]:
        """Reads chunks up to the one flagged DONE; returns (cookie, flags, type, payload) each."""
        chunks = []
        while True:
            magic, flags, rtype, cookie, length = proto.STRUCTURED_REPLY.unpack(
                await self.reader.readexactly(proto.STRUCTURED_REPLY.size))
            assert magic == proto.STRUCTURED_REPLY_MAGIC
            chunks.append((cookie, flags, rtype, await self.reader.readexactly(length)))
            if flags & proto.REPLY_FLAG_DONE:
                return chunks

    async def disconnect(self) -> None:
        self.send_request(Cmd.DISC)
        await self.writer.drain()
        await self.close()
