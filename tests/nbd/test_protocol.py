"""Our NBD server against a raw test client: options, commands, violations, lifecycle."""

from __future__ import annotations

import asyncio
import os
import stat
import struct
from pathlib import Path

import pytest

from qmpbackup.errors import StateError
from qmpbackup.nbd import (
    Export, NbdConsumerError, NbdError, NbdProtocolError, NbdServer, ServerState,
)
from qmpbackup.nbd import proto
from qmpbackup.nbd.proto import Cmd, CmdFlag, Errno, Opt, Rep, TFlag
from tests.nbd.client import Client
from tests.nbd.conftest import ServeFactory

MiB = 1024 * 1024


async def eof(client: Client) -> bool:
    """True when the server closed the connection (a reset counts: it had unread data)."""
    async with asyncio.timeout(5):
        try:
            return await client.reader.read(1) == b""
        except ConnectionResetError:
            return True


async def test_greeting_list_info_go(serve: ServeFactory) -> None:
    async with serve({"a": 3 * MiB + 512, "b": MiB}) as served:
        c = await Client.connect(served.socket)
        assert c.handshake_flags == proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES
        replies = await c.option(Opt.LIST)
        assert [r.type for r in replies] == [Rep.SERVER, Rep.SERVER, Rep.ACK]
        assert replies[0].payload == struct.pack(">I", 1) + b"a"
        assert [r.type for r in await c.option(Opt.LIST, b"x")] == [Rep.ERR_INVALID]
        info = await c.go("a", option=Opt.INFO)
        assert info.size == 3 * MiB + 512
        assert info.tflags == (TFlag.HAS_FLAGS | TFlag.SEND_FLUSH | TFlag.SEND_FUA
                               | TFlag.SEND_TRIM | TFlag.SEND_WRITE_ZEROES)
        assert info.block_sizes == (1, 65536, 32 * MiB)
        assert info.replies[-1].type == Rep.ACK
        for option in (Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS, Opt.STARTTLS,
                       Opt.SET_META_CONTEXT, 99):
            assert [r.type for r in await c.option(option)] == [Rep.ERR_UNSUP]
        assert [r.type for r in (await c.go("nope")).replies] == [Rep.ERR_UNKNOWN]
        assert [r.type for r in await c.option(Opt.GO, b"\0\0\0\x09a")] == [Rep.ERR_INVALID]
        go = await c.go("b", infos=())
        assert go.size == MiB
        assert await c.write(0, b"\1" * 65536) == Errno.OK
        await c.disconnect()
        await served.server.wait_disconnected("b", timeout=5)
        assert served.server.failure is None
        assert served.assemblers["b"].stats.bytes_written == 65536


@pytest.mark.parametrize("client_flags", [1, 3])
async def test_export_name(serve: ServeFactory, client_flags: int) -> None:
    async with serve({"a": MiB}) as served:
        c = await Client.connect(served.socket, client_flags=client_flags)
        await c.send_option(Opt.EXPORT_NAME, b"a")
        size, tflags = proto.EXPORT_NAME_REPLY.unpack(await c.reader.readexactly(10))
        assert size == MiB and tflags & TFlag.SEND_WRITE_ZEROES
        if client_flags == 1:
            assert await c.reader.readexactly(124) == bytes(124)
        assert await c.request(Cmd.WRITE_ZEROES, 0, MiB) == Errno.OK
        await c.disconnect()


async def test_export_name_unknown_and_abort_close_without_failure(serve: ServeFactory) -> None:
    async with serve({"a": MiB}) as served:
        c = await Client.connect(served.socket)
        await c.send_option(Opt.EXPORT_NAME, b"zz")
        assert await eof(c)
        await c.close()
        c = await Client.connect(served.socket)
        assert [r.type for r in await c.option(Opt.ABORT)] == [Rep.ACK]
        assert await eof(c)
        await c.close()
        assert served.server.failure is None


async def test_command_errors_and_pipelining(serve: ServeFactory) -> None:
    async with serve({"a": MiB}) as served:
        c = await Client.connect(served.socket)
        await c.go("a")
        assert await c.write(MiB - 512, b"x" * 1024) == Errno.ENOSPC
        assert await c.request(Cmd.WRITE_ZEROES, 0, 4096, flags=CmdFlag.FAST_ZERO) == Errno.ENOTSUP
        assert await c.request(Cmd.WRITE_ZEROES, MiB, 1) == Errno.ENOSPC
        assert await c.request(Cmd.WRITE, 0, 4, flags=CmdFlag.DF, payload=b"abcd") == Errno.EINVAL
        for cmd in (Cmd.READ, Cmd.CACHE, Cmd.BLOCK_STATUS, Cmd.RESIZE, 42):
            assert await c.request(cmd, 0, 4096) == Errno.EINVAL
        assert await c.request(Cmd.TRIM, 0, MiB, flags=CmdFlag.FUA) == Errno.OK
        # 16 requests in flight, the replies come back in order
        cookies = [c.send_request(Cmd.WRITE, i * 65536, 65536, payload=bytes([i + 1]) * 65536)
                   for i in range(16)]
        cookies.append(c.send_request(Cmd.FLUSH))
        await c.writer.drain()
        replies = [await c.read_simple_reply() for _ in cookies]
        assert replies == [(0, cookie) for cookie in cookies]
        await c.disconnect()
        await served.server.wait_disconnected("a", timeout=5)
        assert served.server.failure is None
        asm = served.assemblers["a"]
        asm.finish()
        assert served.sink.image(1, MiB) == b"".join(bytes([i + 1]) * 65536 for i in range(16))


class SlowConsumer:
    """Holds FLUSH until released; raises on a write to show consumer errors."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.flushed = False

    async def write(self, offset: int, data: memoryview, /) -> None:
        raise RuntimeError("disk on fire")

    async def write_zeroes(self, offset: int, length: int, /) -> None:
        pass

    async def trim(self, offset: int, length: int, /) -> None:
        pass

    async def flush(self) -> None:
        await self.release.wait()
        self.flushed = True


async def test_flush_replies_after_consumer_flush_and_consumer_error(sockdir: Path) -> None:
    consumer = SlowConsumer()
    async with NbdServer(sockdir / "s", [Export("a", MiB, consumer)]) as server:
        c = await Client.connect(str(server.path))
        await c.go("a")
        cookie = c.send_request(Cmd.FLUSH)
        await c.writer.drain()
        read = asyncio.create_task(c.read_simple_reply())
        await asyncio.sleep(0.2)
        assert not read.done()
        consumer.release.set()
        assert await read == (0, cookie)
        assert consumer.flushed
        assert await c.write(0, b"1" * 512) == Errno.EIO
        assert isinstance(server.failure, NbdConsumerError)
        assert "disk on fire" in str(server.failure)
        async with asyncio.timeout(1):
            assert await server.wait_failure() is server.failure
        with pytest.raises(NbdConsumerError):
            server.check()
        await c.disconnect()


@pytest.mark.parametrize("violation", [
    "garbage-flags", "option-magic", "option-too-long", "request-magic", "oversized-write",
    "truncated-write", "extended-request",
])
async def test_protocol_violation_closes_and_fails(serve: ServeFactory, violation: str) -> None:
    async with serve({"a": 64 * MiB}) as served:
        if violation == "garbage-flags":
            reader, writer = await asyncio.open_unix_connection(served.socket)
            await reader.readexactly(18)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            c = Client(reader, writer)
        else:
            c = await Client.connect(served.socket)
            if violation == "option-magic":
                c.writer.write(struct.pack(">QII", 0x1234, Opt.GO, 0))
            elif violation == "option-too-long":
                c.writer.write(struct.pack(">QII", proto.IHAVEOPT, Opt.GO, 1 << 30))
            else:
                await c.go("a")
                if violation == "request-magic":
                    c.send_request(Cmd.WRITE, 0, 4, payload=b"abcd", magic=0xDEADBEEF)
                elif violation == "oversized-write":
                    c.send_request(Cmd.WRITE, 0, 32 * MiB + 1)
                elif violation == "extended-request":
                    c.send_request(Cmd.FLUSH, magic=proto.EXTENDED_REQUEST_MAGIC)
                elif violation == "truncated-write":
                    c.send_request(Cmd.WRITE, 0, 65536, payload=b"x" * 1000)
                    await c.writer.drain()
                    c.writer.write_eof()
        await c.writer.drain()
        assert await eof(c)
        await c.close()
        async with asyncio.timeout(5):
            failure = await served.server.wait_failure()
        assert isinstance(failure, NbdProtocolError)
        assert "protocol violation" in str(failure)
        # Later connections are refused at once.
        reader, writer = await asyncio.open_unix_connection(served.socket)
        async with asyncio.timeout(5):
            assert await reader.read(100) == b""
        writer.close()


async def test_lifecycle_and_socket_permissions(sockdir: Path) -> None:
    path = sockdir / "nbd.sock"
    server = NbdServer(path, name="life")
    assert server.state is ServerState.IDLE
    assert "idle" in repr(server)
    async with server:
        assert server.state is ServerState.SERVING  # type: ignore[comparison-overlap]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        with pytest.raises(StateError):
            await server.start()
        c = await Client.connect(str(path))   # left open: close() must end it
    assert server.state is ServerState.CLOSED
    assert not path.exists()
    assert await eof(c)
    await c.close()
    await server.close()  # twice is fine


async def test_refuses_a_shared_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    with pytest.raises(NbdError, match="mode 0700"):
        await NbdServer(shared / "s").start()
    with pytest.raises(NbdError, match="socket directory"):
        await NbdServer(tmp_path / "missing" / "s").start()


async def test_handshake_timeout(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with NbdServer(sockdir / "s", handshake_timeout=0.2) as server:
        c = await Client.connect(str(server.path))
        assert await eof(c)
        await c.close()
        assert server.failure is None
    assert "handshake not finished" in caplog.text


async def test_connect_and_close_is_no_failure(serve: ServeFactory) -> None:
    async with serve({"a": MiB}) as served:
        for _ in range(3):
            reader, writer = await asyncio.open_unix_connection(served.socket)
            await reader.readexactly(proto.SERVER_GREETING.size)
            writer.close()
            await writer.wait_closed()
        c = await Client.connect(served.socket)
        await c.go("a")
        await c.disconnect()
        await served.server.wait_disconnected("a", timeout=5)
        async with asyncio.timeout(5):
            while served.server.connection_count():
                await asyncio.sleep(0.01)
        assert served.server.failure is None
