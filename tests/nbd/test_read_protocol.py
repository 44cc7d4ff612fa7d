"""The read path of a read-only export, driven by our test client: replies byte by byte."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from qmpbackup.nbd import proto
from qmpbackup.nbd.proto import Cmd, CmdFlag, Errno, Opt, Rep, ReplyType, TFlag
from tests.nbd.client import Client
from tests.nbd.conftest import ReadServeFactory
from tests.nbd.images import MiB

SIZE = 3 * MiB + 12345  # odd: the last 4 KiB block is short


def _meta_request(name: str, *queries: str) -> bytes:
    raw = name.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        data += struct.pack(">I", len(q.encode())) + q.encode()
    return data


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """Data in the first MiB, zeroes (a hole) in the second, data again from 2 MiB on."""
    path = tmp_path / "img.raw"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (MiB // 256))
        f.seek(2 * MiB)
        f.write(b"\x5a" * (SIZE - 2 * MiB))
    return path


async def _structured(server_path: str, name: str = "d0", *, meta: bool = True) -> tuple[Client, int]:
    c = await Client.connect(server_path)
    assert [r.type for r in await c.option(Opt.STRUCTURED_REPLY)] == [Rep.ACK]
    if meta:
        replies = await c.option(Opt.SET_META_CONTEXT, _meta_request(name, "base:allocation"))
        assert [r.type for r in replies] == [Rep.META_CONTEXT, Rep.ACK]
        assert replies[0].payload == struct.pack(">I", 1) + b"base:allocation"
    negotiated = await c.go(name)
    assert negotiated.size == SIZE
    assert negotiated.tflags & TFlag.READ_ONLY and negotiated.tflags & TFlag.SEND_DF
    assert not negotiated.tflags & TFlag.SEND_WRITE_ZEROES
    return c, negotiated.tflags


async def test_structured_read_hole_and_block_status(image: Path, serve_files: ReadServeFactory) -> None:
    expect = image.read_bytes()
    async with serve_files({"d0": image}) as server:
        c, _ = await _structured(str(server.path))
        cookie = c.send_request(Cmd.READ, 4096, 8192)
        [(got, flags, rtype, payload)] = await c.read_structured_reply()
        assert (got, flags, rtype) == (cookie, proto.REPLY_FLAG_DONE, ReplyType.OFFSET_DATA)
        assert payload == struct.pack(">Q", 4096) + expect[4096:12288]

        c.send_request(Cmd.READ, MiB + 4096, 65536)  # inside the zero MiB: a hole chunk
        [(_, _, rtype, payload)] = await c.read_structured_reply()
        assert (rtype, payload) == (ReplyType.OFFSET_HOLE, struct.pack(">QI", MiB + 4096, 65536))

        c.send_request(Cmd.READ, MiB, 4096, flags=CmdFlag.DF)  # DF: the zeroes as data
        [(_, _, rtype, payload)] = await c.read_structured_reply()
        assert (rtype, payload[8:]) == (ReplyType.OFFSET_DATA, bytes(4096))

        c.send_request(Cmd.READ, SIZE - 100, 100)  # the short tail
        [(_, _, rtype, payload)] = await c.read_structured_reply()
        assert payload[8:] == expect[-100:]

        c.send_request(Cmd.BLOCK_STATUS, 0, SIZE)
        [(_, flags, rtype, payload)] = await c.read_structured_reply()
        assert (flags, rtype) == (proto.REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS)
        ctx, *words = struct.unpack(f">I{(len(payload) - 4) // 4}I", payload)
        assert ctx == 1
        extents = list(zip(words[::2], words[1::2], strict=True))
        assert extents == [(MiB, 0), (MiB, proto.STATE_HOLE | proto.STATE_ZERO), (SIZE - 2 * MiB, 0)]

        c.send_request(Cmd.BLOCK_STATUS, MiB - 4096, 3 * 4096, flags=CmdFlag.REQ_ONE)
        [(_, _, _, payload)] = await c.read_structured_reply()
        assert payload == struct.pack(">III", 1, 4096, 0)

        cookie = c.send_request(Cmd.WRITE, 0, 512, payload=bytes(512))
        [(got, _, rtype, payload)] = await c.read_structured_reply()
        assert (got, rtype) == (cookie, ReplyType.ERROR)
        assert struct.unpack_from(">I", payload)[0] == Errno.EPERM

        for cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
            c.send_request(cmd, 0, 512)
            [(_, _, rtype, payload)] = await c.read_structured_reply()
            assert struct.unpack_from(">I", payload)[0] == Errno.EPERM

        c.send_request(Cmd.READ, SIZE - 100, 101)  # beyond the end
        [(_, _, rtype, payload)] = await c.read_structured_reply()
        assert rtype == ReplyType.ERROR and struct.unpack_from(">I", payload)[0] == Errno.EINVAL

        # Pipelined reads: every cookie answered once, each with its own range.
        cookies = {c.send_request(Cmd.READ, off, 65536, flags=CmdFlag.DF): off
                   for off in range(0, 2 * MiB, 65536)}
        await c.writer.drain()
        for _ in range(len(cookies)):
            [(got, _, rtype, payload)] = await c.read_structured_reply()
            off = cookies.pop(got)
            assert payload == struct.pack(">Q", off) + expect[off:off + 65536]
        assert not cookies
        await c.disconnect()
        server.check()


async def test_replies_larger_than_the_socket_buffer_arrive_whole(image: Path, serve_files: ReadServeFactory) -> None:
    """A client that reads late: the server's scatter-gather sends stop part-way (in the middle of a
    piece) and go on when the socket drains; no reply is cut or interleaved with another."""
    expect = image.read_bytes()
    async with serve_files({"d0": image}) as server:
        c, _ = await _structured(str(server.path))
        cookies = {c.send_request(Cmd.READ, off, MiB + 4096, flags=CmdFlag.DF): off
                   for off in range(0, 2 * MiB - 4096, 65536 + 4096)}  # 30 MiB: more than any socket buffer
        await c.writer.drain()
        await asyncio.sleep(0.3)  # the server meanwhile fills the socket and waits for it to drain
        for _ in range(len(cookies)):
            [(got, _, rtype, payload)] = await c.read_structured_reply()
            off = cookies.pop(got)
            assert (rtype, payload) == (ReplyType.OFFSET_DATA,
                                        struct.pack(">Q", off) + expect[off:off + MiB + 4096])
        await c.disconnect()
        server.check()


async def test_simple_replies_without_negotiation(image: Path, serve_files: ReadServeFactory) -> None:
    expect = image.read_bytes()
    async with serve_files({"d0": image}) as server:
        c = await Client.connect(str(server.path))
        negotiated = await c.go("d0")
        assert negotiated.tflags & TFlag.READ_ONLY and not negotiated.tflags & TFlag.SEND_DF
        cookie = c.send_request(Cmd.READ, MiB - 10, 20)
        assert await c.read_simple_reply() == (Errno.OK, cookie)
        assert await c.reader.readexactly(20) == expect[MiB - 10:MiB + 10]
        assert await c.request(Cmd.BLOCK_STATUS, 0, 4096) == Errno.EINVAL  # no context negotiated
        assert await c.write(0, b"x" * 512) == Errno.EPERM
        assert await c.request(Cmd.FLUSH) == Errno.OK
        assert await c.request(Cmd.READ, SIZE, 1) == Errno.EINVAL
        await c.disconnect()


async def test_meta_context_options(image: Path, serve_files: ReadServeFactory) -> None:
    async with serve_files({"d0": image}) as server:
        c = await Client.connect(str(server.path))
        # Meta contexts need structured replies first.
        assert [r.type for r in await c.option(Opt.SET_META_CONTEXT, _meta_request("d0", "base:allocation"))] \
            == [Rep.ERR_INVALID]
        await c.option(Opt.STRUCTURED_REPLY)
        for queries in ((), ("base:",), ("base:allocation", "qemu:dirty-bitmap:x")):
            replies = await c.option(Opt.LIST_META_CONTEXT, _meta_request("d0", *queries))
            assert [(r.type, r.payload[4:]) for r in replies] == [
                (Rep.META_CONTEXT, b"base:allocation"), (Rep.ACK, b"")]
        replies = await c.option(Opt.SET_META_CONTEXT, _meta_request("d0", "qemu:dirty-bitmap:x"))
        assert [r.type for r in replies] == [Rep.ACK]  # nothing selected, no error
        replies = await c.option(Opt.SET_META_CONTEXT, _meta_request("nope", "base:allocation"))
        assert [r.type for r in replies] == [Rep.ERR_UNKNOWN]
        replies = await c.option(Opt.SET_META_CONTEXT, b"\x00\x00\x00\x09d0")
        assert [r.type for r in replies] == [Rep.ERR_INVALID]
        replies = await c.option(Opt.LIST)
        assert [r.payload[4:] for r in replies if r.type == Rep.SERVER] == [b"d0"]
        # The selection was for another export (and then cleared): BLOCK_STATUS is refused.
        await c.go("d0")
        c.send_request(Cmd.BLOCK_STATUS, 0, 4096)
        [(_, _, rtype, payload)] = await c.read_structured_reply()
        assert rtype == ReplyType.ERROR and struct.unpack_from(">I", payload)[0] == Errno.EINVAL
        await c.disconnect()


async def test_bad_client_does_not_stop_the_export(image: Path, serve_files: ReadServeFactory) -> None:
    async with serve_files({"d0": image}) as server:
        c = await Client.connect(str(server.path))
        await c.go("d0")
        c.send_request(Cmd.READ, 0, 512, magic=0x12345678)
        await c.writer.drain()
        assert await c.reader.read() == b""  # closed on the violation
        await c.close()
        c, _ = await _structured(str(server.path))
        c.send_request(Cmd.READ, 0, 16)
        [(_, _, rtype, _)] = await c.read_structured_reply()
        assert rtype == ReplyType.OFFSET_DATA
        await c.disconnect()
        assert server.failure is None
