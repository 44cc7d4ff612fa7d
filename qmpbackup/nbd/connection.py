"""One NBD client connection: fixed newstyle handshake, then the transmission phase.

Decisions (see the module docs of :mod:`qmpbackup.nbd`):

* A server with only writable exports (a backup's) uses simple replies only:
  ``NBD_OPT_STRUCTURED_REPLY`` and the meta context options are answered
  ``NBD_REP_ERR_UNSUP``; QEMU 7.2 and 10.0 then use simple replies, which is all a write-only
  target needs. A server with a read-only export accepts structured replies and offers the
  ``base:allocation`` context on its read-only exports (see :mod:`qmpbackup.nbd.read_path`,
  which serves their transmission phase). ``NBD_OPT_EXTENDED_HEADERS`` is never supported.
* A writable export is write-only: READ, CACHE, BLOCK_STATUS and RESIZE get EINVAL. QEMU's
  backup job and ``qemu-img convert -n`` never read the target; answering with data we no
  longer hold (clusters already went to the archive) would be wrong.
* WRITE_ZEROES with FAST_ZERO gets ENOTSUP (SEND_FAST_ZERO is not advertised, so QEMU's
  pre-zeroing falls back to plain writes). NO_HOLE changes nothing: zeroes are zeroes to us.
* Replies to pipelined requests are sent in batches (up to ``MAX_HELD_REPLIES``) once no
  further request is waiting; a client never waits for a held reply.
* Requests are handled one at a time in arrival order; pipelined requests wait in the socket
  buffer, which bounds memory to one receive buffer of the largest request seen (at most the
  advertised maximum). A larger request is a protocol violation: its payload cannot be skipped
  safely, so the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from qmpbackup.errors import QmpBackupError
from qmpbackup.nbd import proto
from qmpbackup.nbd.errors import NbdConsumerError, NbdError, NbdProtocolError
from qmpbackup.nbd.export import Export
from qmpbackup.nbd.proto import Cmd, CmdFlag, Errno, Info, Opt, Rep, TFlag
from qmpbackup.nbd.read_path import ReadTransmission

log = logging.getLogger(__name__)

TRANSMISSION_FLAGS: Final = (
    TFlag.HAS_FLAGS | TFlag.SEND_FLUSH | TFlag.SEND_FUA | TFlag.SEND_TRIM | TFlag.SEND_WRITE_ZEROES
)
READ_ONLY_FLAGS: Final = (
    TFlag.HAS_FLAGS | TFlag.READ_ONLY | TFlag.SEND_FLUSH | TFlag.SEND_CACHE | TFlag.CAN_MULTI_CONN
)
"""Read-only exports (``SEND_DF`` is added when structured replies were negotiated)."""
ALLOCATION_CONTEXT_ID: Final = 1
MIN_BLOCK: Final = 1
PREFERRED_BLOCK: Final = 64 * 1024
MAX_REQUEST: Final = 32 * 1024 * 1024
MAX_HELD_REPLIES: Final = 16
"""Replies held while more requests are waiting (see ``Connection._next_request``)."""
_KNOWN_CLIENT_FLAGS: Final = proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES
_WRITE_FLAGS: Final = CmdFlag.FUA
_ZERO_FLAGS: Final = CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO


class _ClientGone(Exception):
    """The peer closed the socket; ``clean`` when it happened between two messages."""

    def __init__(self, clean: bool) -> None:
        self.clean = clean
        super().__init__("peer closed the connection")


class Connection:
    """Serves one accepted socket until DISC, EOF, a violation or cancellation.

    ``exports`` is read at handshake time; ``report`` receives a failure that must fail the
    backup (a protocol violation, or the consumer's error). ``run`` never raises :class:`NbdError`; it
    reports and returns.
    """

    def __init__(
        self,
        sock: socket.socket,
        exports: Mapping[str, Export],
        report: Callable[[QmpBackupError], None],
        *,
        label: str,
        max_request: int = MAX_REQUEST,
        handshake_timeout: float = 30.0,
    ) -> None:
        self._sock = sock
        self._exports = exports
        self._report = report
        self._label = label
        self._max_request = max_request
        self._handshake_timeout = handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._header = bytearray(proto.REQUEST.size)
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None  # the export base:allocation was selected for
        self.export: Export | None = None
        self.requests = 0

    def __repr__(self) -> str:
        name = self.export.name if self.export is not None else None
        return f"<Connection {self._label} export={name!r} requests={self.requests}>"

    async def run(self) -> None:
        try:
            try:
                async with asyncio.timeout(self._handshake_timeout):
                    export = await self._handshake()
            except TimeoutError:
                log.warning("%s: NBD handshake not finished after %s s, closing", self._label,
                            self._handshake_timeout)
                return
            if export is None:
                return
            self.export = export
            log.debug("%s: transmission on export %r (%d bytes)", self._label, export.name,
                      export.size)
            if export.writable:
                await self._transmission(export)
            else:
                await self._read_transmission(export)
        except _ClientGone as gone:
            name = self.export.name if self.export is not None else None
            if gone.clean:
                level = logging.DEBUG if self.export is None else logging.WARNING
                log.log(level, "%s: client closed the connection without NBD_CMD_DISC", self._label)
            else:
                self._fail(NbdProtocolError("connection closed in the middle of a message", name))
        except NbdError as err:
            self._fail(err)
        except (ConnectionError, BrokenPipeError) as err:
            log.warning("%s: NBD connection lost: %s", self._label, err)
        finally:
            self._sock.close()

    def _fail(self, err: QmpBackupError) -> None:
        log.error("%s: %s", self._label, err)
        self._report(err)

    # -- socket helpers --------------------------------------------------------------------

    async def _recv_into(self, view: memoryview, *, boundary: bool = False) -> None:
        """Fill ``view`` completely; EOF before the first byte at a boundary is a clean close."""
        first = True
        while view:
            n = await self._loop.sock_recv_into(self._sock, view)
            if n == 0:
                raise _ClientGone(clean=boundary and first)
            first = False
            view = view[n:]

    async def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        await self._recv_into(memoryview(buf))
        return bytes(buf)

    async def _send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self._sock, data)

    # -- handshake -------------------------------------------------------------------------

    async def _handshake(self) -> Export | None:
        await self._send(proto.SERVER_GREETING.pack(
            proto.NBDMAGIC, proto.IHAVEOPT, proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES))
        flags = bytearray(proto.CLIENT_FLAGS.size)
        await self._recv_into(memoryview(flags), boundary=True)  # a bare connect+close is no error
        (cflags,) = proto.CLIENT_FLAGS.unpack(flags)
        if cflags & ~_KNOWN_CLIENT_FLAGS or not cflags & proto.FLAG_C_FIXED_NEWSTYLE:
            raise NbdProtocolError(f"client flags {cflags:#x} (need fixed newstyle, know only 0x3)")
        self._no_zeroes = bool(cflags & proto.FLAG_C_NO_ZEROES)
        while True:
            header = bytearray(proto.OPTION_HEADER.size)
            await self._recv_into(memoryview(header), boundary=True)
            magic, option, length = proto.OPTION_HEADER.unpack(header)
            if magic != proto.IHAVEOPT:
                raise NbdProtocolError(f"option magic {magic:#x}")
            if length > proto.MAX_OPTION_LENGTH:
                raise NbdProtocolError(f"option {option} with {length} bytes of data")
            data = await self._recv(length)
            log.debug("%s: option %s (%d bytes)", self._label, _opt_name(option), length)
            if option == Opt.GO or option == Opt.INFO:
                export = await self._opt_info(option, data)
                if export is not None and option == Opt.GO:
                    return export
            elif option == Opt.EXPORT_NAME:
                return await self._opt_export_name(data)
            elif option == Opt.ABORT:
                await self._opt_reply(option, Rep.ACK)
                return None
            elif option == Opt.LIST:
                await self._opt_list(data)
            elif option == Opt.STRUCTURED_REPLY and self._serves_reads():
                await self._opt_structured_reply(data)
            elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT) and self._serves_reads():
                await self._opt_meta_context(option, data)
            else:  # EXTENDED_HEADERS, STARTTLS, unknown; STRUCTURED_REPLY/META_CONTEXT for writes
                await self._opt_reply(option, Rep.ERR_UNSUP, b"option not supported")

    async def _opt_reply(self, option: int, reply: Rep, payload: bytes = b"") -> None:
        await self._send(proto.OPTION_REPLY_HEADER.pack(
            proto.OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload)

    async def _opt_list(self, data: bytes) -> None:
        if data:
            await self._opt_reply(Opt.LIST, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return
        for name in self._exports:
            raw = name.encode()
            await self._opt_reply(Opt.LIST, Rep.SERVER, proto.U32.pack(len(raw)) + raw)
        await self._opt_reply(Opt.LIST, Rep.ACK)

    def _serves_reads(self) -> bool:
        return any(not e.writable for e in self._exports.values())

    def _flags(self, export: Export) -> int:
        if export.writable:
            return TRANSMISSION_FLAGS
        return READ_ONLY_FLAGS | (TFlag.SEND_DF if self._structured else 0)

    async def _opt_structured_reply(self, data: bytes) -> None:
        if data:
            await self._opt_reply(Opt.STRUCTURED_REPLY, Rep.ERR_INVALID, b"option takes no data")
            return
        self._structured = True
        await self._opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK)

    async def _opt_meta_context(self, option: int, data: bytes) -> None:
        """LIST or SET: ``base:allocation`` is the one context, on read-only exports."""
        if option == Opt.SET_META_CONTEXT:
            self._meta_export = None  # a SET replaces the selection, even when it fails
        if not self._structured:
            await self._opt_reply(option, Rep.ERR_INVALID, b"negotiate structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            await self._opt_reply(option, Rep.ERR_INVALID, b"malformed meta context request")
            return
        name, queries = parsed
        export = self._exports.get(name)
        if export is None:
            await self._opt_reply(option, Rep.ERR_UNKNOWN, f"no export {name!r}".encode())
            return
        if option == Opt.LIST_META_CONTEXT:
            matches = not queries or any(
                q in (proto.META_BASE_NAMESPACE, proto.META_BASE_ALLOCATION) for q in queries)
        else:
            matches = proto.META_BASE_ALLOCATION in queries
        if matches and not export.writable:
            context_id = 0 if option == Opt.LIST_META_CONTEXT else ALLOCATION_CONTEXT_ID
            await self._opt_reply(option, Rep.META_CONTEXT,
                                  proto.U32.pack(context_id) + proto.META_BASE_ALLOCATION.encode())
            if option == Opt.SET_META_CONTEXT:
                self._meta_export = name
        await self._opt_reply(option, Rep.ACK)

    async def _read_transmission(self, export: Export) -> None:
        meta_id = ALLOCATION_CONTEXT_ID if self._meta_export == export.name else None

        async def recv_into(view: memoryview, boundary: bool) -> None:
            await self._recv_into(view, boundary=boundary)

        reads = ReadTransmission(self._sock, export, recv_into, label=self._label,
                                 structured=self._structured, meta_id=meta_id,
                                 max_request=self._max_request)
        try:
            await reads.run()
        finally:
            self.requests = reads.requests

    async def _opt_info(self, option: int, data: bytes) -> Export | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            await self._opt_reply(option, Rep.ERR_INVALID, b"malformed info request")
            return None
        name, _requests = parsed
        export = self._exports.get(name)
        if export is None:
            await self._opt_reply(option, Rep.ERR_UNKNOWN, f"no export {name!r}".encode())
            return None
        await self._opt_reply(option, Rep.INFO, proto.INFO_EXPORT.pack(
            Info.EXPORT, export.size, self._flags(export)))
        await self._opt_reply(option, Rep.INFO, proto.INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, self._max_request))
        await self._opt_reply(option, Rep.ACK)
        return export

    async def _opt_export_name(self, data: bytes) -> Export | None:
        name = data.decode(errors="replace")
        export = self._exports.get(name)
        if export is None:
            # The spec allows no error reply here: closing is the answer.
            log.warning("%s: NBD_OPT_EXPORT_NAME for unknown export %r, closing", self._label, name)
            return None
        padding = b"" if self._no_zeroes else bytes(proto.EXPORT_NAME_PADDING)
        await self._send(proto.EXPORT_NAME_REPLY.pack(export.size, self._flags(export)) + padding)
        return export

    # -- transmission ----------------------------------------------------------------------

    async def _transmission(self, export: Export) -> None:
        consumer = export.consumer
        assert consumer is not None
        header = self._header
        hview = memoryview(header)
        unpack = proto.REQUEST.unpack
        reply = proto.SIMPLE_REPLY.pack
        size = export.size
        replies: list[bytes] = []
        while True:
            await self._next_request(hview, replies)
            magic, flags, cmd, cookie, offset, length = unpack(header)
            if magic != proto.REQUEST_MAGIC:
                raise NbdProtocolError(f"request magic {magic:#x}", export.name)
            self.requests += 1
            if cmd == Cmd.WRITE:
                if length > self._max_request:
                    raise NbdProtocolError(
                        f"WRITE of {length} bytes exceeds the advertised maximum "
                        f"{self._max_request}", export.name)
                if len(self._buffer) < length:
                    self._buffer = bytearray(length)
                data = memoryview(self._buffer)[:length]
                await self._recv_into(data)
                if flags & ~_WRITE_FLAGS:
                    error = Errno.EINVAL
                elif offset + length > size:
                    error = Errno.ENOSPC
                else:
                    error = await self._call(consumer.write(offset, data), export.name, "WRITE")
                    if not error and flags & CmdFlag.FUA:
                        error = await self._call(consumer.flush(), export.name, "FLUSH")
            elif cmd == Cmd.WRITE_ZEROES:
                if flags & ~_ZERO_FLAGS:
                    error = Errno.EINVAL
                elif flags & CmdFlag.FAST_ZERO:
                    error = Errno.ENOTSUP
                elif offset + length > size:
                    error = Errno.ENOSPC
                else:
                    error = await self._call(
                        consumer.write_zeroes(offset, length), export.name, "WRITE_ZEROES")
                    if not error and flags & CmdFlag.FUA:
                        error = await self._call(consumer.flush(), export.name, "FLUSH")
            elif cmd == Cmd.TRIM:
                if offset + length > size:
                    error = Errno.EINVAL
                else:
                    error = await self._call(consumer.trim(offset, length), export.name, "TRIM")
                    if not error and flags & CmdFlag.FUA:
                        error = await self._call(consumer.flush(), export.name, "FLUSH")
            elif cmd == Cmd.FLUSH:
                error = await self._call(consumer.flush(), export.name, "FLUSH")
            elif cmd == Cmd.DISC:
                log.debug("%s: NBD_CMD_DISC after %d requests", self._label, self.requests)
                await self._send_replies(replies)
                return
            else:  # READ (write-only export), CACHE, BLOCK_STATUS, RESIZE, unknown
                log.debug("%s: refusing command %d with EINVAL", self._label, cmd)
                error = Errno.EINVAL
            replies.append(reply(proto.SIMPLE_REPLY_MAGIC, error, cookie))
            if len(replies) >= MAX_HELD_REPLIES:
                await self._send_replies(replies)

    async def _next_request(self, hview: memoryview, replies: list[bytes]) -> None:
        """Read the next request header, sending the held replies first if it has not arrived.

        Replies to requests that were already waiting in the socket go out together
        once the socket is drained: one send and one wake-up of the client instead of
        one per request. A client that waits for a reply never waits long, because
        nothing is held while we wait for it.
        """
        try:
            got = self._sock.recv_into(hview)
        except BlockingIOError:
            got = -1
        if got == len(hview):
            return
        if got == 0:
            raise _ClientGone(clean=True)
        await self._send_replies(replies)
        if got > 0:
            await self._recv_into(hview[got:])
        else:
            await self._recv_into(hview, boundary=True)

    async def _send_replies(self, replies: list[bytes]) -> None:
        if replies:
            data = b"".join(replies)
            replies.clear()
            await self._loop.sock_sendall(self._sock, data)

    async def _call(self, call: Awaitable[None], export: str, what: str) -> Errno:
        """Await one consumer coroutine; an exception becomes EIO plus a recorded failure."""
        try:
            await call
        except QmpBackupError as err:  # e.g. the assembler's PointInTimeError: report it as is
            self._fail(err)
            return Errno.EIO
        except Exception as err:  # a consumer bug must fail the backup, not the server
            failure = NbdConsumerError(f"{what} failed: {err!r}", export)
            failure.__cause__ = err
            self._fail(failure)
            return Errno.EIO
        return Errno.OK


def _opt_name(option: int) -> str:
    try:
        return Opt(option).name
    except ValueError:
        return str(option)


def _parse_info_request(data: bytes) -> tuple[str, list[int]] | None:
    """Split NBD_OPT_INFO/GO data into the export name and the info types asked for."""
    if len(data) < 6:
        return None
    (name_len,) = proto.U32.unpack_from(data, 0)
    if 4 + name_len + 2 > len(data):
        return None
    try:
        name = data[4:4 + name_len].decode()
    except UnicodeDecodeError:
        return None
    (count,) = proto.U16.unpack_from(data, 4 + name_len)
    rest = data[4 + name_len + 2:]
    if len(rest) != 2 * count:
        return None
    return name, [proto.U16.unpack_from(rest, 2 * i)[0] for i in range(count)]


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """Split NBD_OPT_LIST/SET_META_CONTEXT data into the export name and the queries."""
    try:
        pos = 0
        (name_len,) = proto.U32.unpack_from(data, pos)
        pos += 4
        if name_len > proto.MAX_EXPORT_NAME or pos + name_len > len(data):
            return None
        name = data[pos:pos + name_len].decode()
        pos += name_len
        (count,) = proto.U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (qlen,) = proto.U32.unpack_from(data, pos)
            pos += 4
            if qlen > proto.MAX_EXPORT_NAME or pos + qlen > len(data):
                return None
            queries.append(data[pos:pos + qlen].decode())
            pos += qlen
    except (UnicodeDecodeError, struct.error):
        return None
    return (name, queries) if pos == len(data) else None
