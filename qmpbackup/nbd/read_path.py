"""The transmission phase of a read-only export (``qmpbackup export``): READ and BLOCK_STATUS.

Kept apart from the write path (:meth:`qmpbackup.nbd.connection.Connection._transmission`),
which stays a strictly in-order loop tuned for a backup job's writes. Here requests run
concurrently: up to ``MAX_READS_IN_FLIGHT`` per connection, each in a worker thread (the
source's calls block: index look-ups, decompression, digest checks), and their replies go out
as they finish (the client matches them by cookie), each written whole under a lock.

* Structured replies when the client negotiated them: a READ of a range that reads as zeroes
  is one ``OFFSET_HOLE`` chunk (unless the client set DF), anything else one ``OFFSET_DATA``
  chunk; errors are ``ERROR`` chunks with a message. Otherwise simple replies.
* BLOCK_STATUS answers the ``base:allocation`` context: a range that reads as zeroes is
  ``HOLE | ZERO`` (an archive stores nothing for it), data is 0.
* WRITE, WRITE_ZEROES, TRIM and RESIZE get EPERM (a WRITE's payload is read and dropped);
  FLUSH and CACHE succeed (nothing to flush, nothing worth caching ahead).
* A failing read (e.g. a digest mismatch in the archive) fails that request with EIO and is
  logged; the connection goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Final

from qmpbackup.nbd import proto
from qmpbackup.nbd.errors import NbdProtocolError
from qmpbackup.nbd.export import Export, ExportSource, Piece
from qmpbackup.nbd.proto import Cmd, CmdFlag, Errno, ReplyType

log = logging.getLogger(__name__)

MAX_READS_IN_FLIGHT: Final = 8
SEND_BUFFER: Final = 4 << 20
"""Socket send buffer asked for (the kernel caps it at net.core.wmem_max): a 2 MiB READ reply then
leaves in one ``send`` instead of ~10, each of which gives the GIL to the worker threads and waits
to get it back (measured: 4 GiB through ``qemu-img convert`` 5.0-5.2 s instead of 5.7-6.8 s)."""
_IOV_MAX: Final = 1024  # buffers one sendmsg takes (Linux's UIO_MAXIOV)
_READ_FLAGS: Final = CmdFlag.DF | CmdFlag.FUA
_STATUS_FLAGS: Final = CmdFlag.REQ_ONE
_WRITE_COMMANDS: Final = frozenset((Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.RESIZE))

RecvInto = Callable[[memoryview, bool], Awaitable[None]]


class ReadTransmission:
    """Serves one connection's requests on a read-only export until DISC or EOF."""

    def __init__(self, sock: socket.socket, export: Export, recv_into: RecvInto, *, label: str,
                 structured: bool, meta_id: int | None, max_request: int) -> None:
        assert export.source is not None
        self._sock = sock
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._export = export
        self._source: ExportSource = export.source
        self._recv_into = recv_into
        self._label = label
        self._structured = structured
        self._meta_id = meta_id
        self._max_request = max_request
        self._loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_READS_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests = 0

    async def run(self) -> None:
        header = bytearray(proto.REQUEST.size)
        hview = memoryview(header)
        size = self._export.size
        try:
            while True:
                await self._recv_into(hview, True)
                magic, flags, cmd, cookie, offset, length = proto.REQUEST.unpack(header)
                if magic != proto.REQUEST_MAGIC:
                    raise NbdProtocolError(f"request magic {magic:#x}", self._export.name)
                self.requests += 1
                if cmd == Cmd.READ:
                    await self._start(self._read(flags, cookie, offset, length))
                elif cmd == Cmd.BLOCK_STATUS:
                    await self._start(self._block_status(flags, cookie, offset, length))
                elif cmd in _WRITE_COMMANDS:
                    if cmd == Cmd.WRITE:
                        await self._drop_payload(length)
                    await self._error(cookie, Errno.EPERM, "read-only export")
                elif cmd == Cmd.CACHE and offset + length > size:
                    await self._error(cookie, Errno.EINVAL, "range beyond the end of the export")
                elif cmd in (Cmd.FLUSH, Cmd.CACHE):
                    await self._send(proto.SIMPLE_REPLY.pack(proto.SIMPLE_REPLY_MAGIC, Errno.OK, cookie))
                elif cmd == Cmd.DISC:
                    log.debug("%s: NBD_CMD_DISC after %d requests", self._label, self.requests)
                    if self._tasks:
                        await asyncio.wait(list(self._tasks))
                    return
                else:
                    await self._error(cookie, Errno.EINVAL, f"unknown command {cmd}")
        finally:
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks))

    async def _start(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await self._slots.acquire()
        except BaseException:
            work.close()
            raise
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and (err := task.exception()) is not None:
            # A reply that could not be sent: the client went away; the request loop sees EOF.
            level = logging.DEBUG if isinstance(err, OSError) else logging.ERROR
            log.log(level, "%s: request task failed: %r", self._label, err)

    async def _drop_payload(self, length: int) -> None:
        if length > self._max_request:
            raise NbdProtocolError(f"WRITE of {length} bytes exceeds the advertised maximum "
                                   f"{self._max_request}", self._export.name)
        buf = bytearray(min(length, 1 << 20))
        while length:
            n = min(length, len(buf))
            await self._recv_into(memoryview(buf)[:n], False)
            length -= n

    # -- replies ---------------------------------------------------------------------------

    async def _send(self, *parts: Piece) -> None:
        """One reply, whole: its parts go out by scatter-gather ``sendmsg`` (a READ's data as the
        source's pieces, never joined into one buffer first)."""
        async with self._send_lock:
            views = [memoryview(part).cast("B") for part in parts if len(part)]
            while views:
                try:
                    sent = self._sock.sendmsg(views[:_IOV_MAX])
                except (BlockingIOError, InterruptedError):
                    await self._writable()
                    continue
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    else:
                        views[0] = views[0][sent:]
                        sent = 0

    async def _writable(self) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()
        fd = self._sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            self._loop.remove_writer(fd)

    def _chunk(self, cookie: int, rtype: ReplyType, length: int) -> bytes:
        return proto.STRUCTURED_REPLY.pack(proto.STRUCTURED_REPLY_MAGIC, proto.REPLY_FLAG_DONE,
                                           rtype, cookie, length)

    async def _error(self, cookie: int, error: Errno, message: str) -> None:
        if not self._structured:
            await self._send(proto.SIMPLE_REPLY.pack(proto.SIMPLE_REPLY_MAGIC, error, cookie))
            return
        text = message.encode()[:proto.MAX_EXPORT_NAME]
        payload = proto.ERROR_CHUNK.pack(error, len(text)) + text
        await self._send(self._chunk(cookie, ReplyType.ERROR, len(payload)) + payload)

    # -- READ ------------------------------------------------------------------------------

    async def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if flags & ~_READ_FLAGS:
            await self._error(cookie, Errno.EINVAL, f"unknown READ flags {flags:#x}")
            return
        if offset + length > self._export.size:
            await self._error(cookie, Errno.EINVAL, "read beyond the end of the export")
            return
        if length > self._max_request:
            await self._error(cookie, Errno.EOVERFLOW, "read larger than the advertised maximum")
            return
        holes = self._structured and not flags & CmdFlag.DF
        try:
            data = await asyncio.to_thread(self._fetch, offset, length, holes)
        except Exception as err:  # the source's failure: this request fails, the export goes on
            log.error("%s: export %r: read of %d bytes at %d failed: %s", self._label,
                      self._export.name, length, offset, err)
            await self._error(cookie, Errno.EIO, f"read failed: {err}")
            return
        if not self._structured:
            await self._send(proto.SIMPLE_REPLY.pack(proto.SIMPLE_REPLY_MAGIC, Errno.OK, cookie), *(data or ()))
        elif length == 0:
            await self._send(self._chunk(cookie, ReplyType.NONE, 0))
        elif data is None:
            payload = proto.OFFSET_HOLE.pack(offset, length)
            await self._send(self._chunk(cookie, ReplyType.OFFSET_HOLE, len(payload)) + payload)
        else:
            await self._send(self._chunk(cookie, ReplyType.OFFSET_DATA, 8 + length)
                             + proto.U64.pack(offset), *data)

    def _fetch(self, offset: int, length: int, holes: bool) -> Sequence[Piece] | None:
        """The data, or None when ``holes`` and the whole range reads as zeroes (worker thread)."""
        if length == 0:
            return ()
        if holes:
            runs = _clip(self._source.allocation(offset, length), offset, length)
            if sum(n for _, n, _ in runs) == length and all(zero for _, _, zero in runs):
                return None
        data = self._source.pieces(offset, length)
        if (got := sum(memoryview(piece).nbytes for piece in data)) != length:
            raise OSError(f"source returned {got} of {length} bytes")
        return data

    # -- BLOCK_STATUS ----------------------------------------------------------------------

    async def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if self._meta_id is None:
            await self._error(cookie, Errno.EINVAL, "no metadata context was negotiated")
            return
        if flags & ~_STATUS_FLAGS:
            await self._error(cookie, Errno.EINVAL, f"unknown BLOCK_STATUS flags {flags:#x}")
            return
        if length == 0 or offset + length > self._export.size:
            await self._error(cookie, Errno.EINVAL, "block status range empty or beyond the end")
            return
        try:
            # REQ_ONE: the client takes one extent, so the source need not look past it.
            runs = await asyncio.to_thread(self._source.allocation, offset, length,
                                           *((1,) if flags & CmdFlag.REQ_ONE else ()))
        except Exception as err:
            log.error("%s: export %r: block status at %d failed: %s", self._label,
                      self._export.name, offset, err)
            await self._error(cookie, Errno.EIO, f"block status failed: {err}")
            return
        extents = _extents(runs, offset, length)
        if not extents:
            await self._error(cookie, Errno.EIO, "no allocation information for the range")
            return
        if flags & CmdFlag.REQ_ONE:
            extents = extents[:1]
        payload = proto.U32.pack(self._meta_id) + b"".join(
            proto.EXTENT.pack(n, status) for n, status in extents[:proto.MAX_EXTENTS])
        await self._send(self._chunk(cookie, ReplyType.BLOCK_STATUS, len(payload)) + payload)


def _clip(runs: list[tuple[int, int, bool]], offset: int, length: int) -> list[tuple[int, int, bool]]:
    """The runs cut to ``[offset, offset + length)``; stops at the first gap (never guesses)."""
    end = offset + length
    out: list[tuple[int, int, bool]] = []
    pos = offset
    for start, n, zero in runs:
        if start + n <= pos:
            continue
        if start > pos or pos >= end:
            break
        stop = min(start + n, end)
        out.append((pos, stop - pos, zero))
        pos = stop
    return out


def _extents(runs: list[tuple[int, int, bool]], offset: int, length: int) -> list[tuple[int, int]]:
    """``base:allocation`` descriptors: (length, HOLE|ZERO or 0), neighbours with equal status merged."""
    out: list[tuple[int, int]] = []
    for _, n, zero in _clip(runs, offset, length):
        status = proto.STATE_HOLE | proto.STATE_ZERO if zero else 0
        if out and out[-1][1] == status:
            out[-1] = (out[-1][0] + n, status)
        else:
            out.append((n, status))
    return out
