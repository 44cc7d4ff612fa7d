"""The NBD server QEMU's backup jobs write into: a private unix socket, one export per drive.

Usage::

    async with NbdServer(run_dir / "nbd.sock", [Export("drive-scsi0", size, assembler)]) as srv:
        ...  # blockdev-add driver=nbd server={type:unix,path:...} export=drive-scsi0, backup
        srv.check()                   # raises the recorded failure, if any
        await srv.wait_disconnected("drive-scsi0", timeout=10)   # after blockdev-del

A protocol violation or a consumer error is recorded once (first one wins) as
:attr:`NbdServer.failure`; :meth:`NbdServer.wait_failure` lets the job race it against its
block job. After a failure, new connections are closed at once: QEMU reconnects a dropped NBD
connection once by itself, so refusing is what makes its job fail instead of resending.

A server of read-only exports (``qmpbackup export``) is made with ``keep_serving=True``: a
misbehaving client is logged and loses its connection, and the server goes on serving others.
It may have its socket in any folder (``private_dir=False``): its exports cannot be written,
and the socket's mode 0600 keeps other users out.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import stat
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Final

from qmpbackup.errors import QmpBackupError, StateError
from qmpbackup.nbd.connection import MAX_REQUEST, Connection
from qmpbackup.nbd.errors import NbdError
from qmpbackup.nbd.export import Export

log = logging.getLogger(__name__)

_LISTEN_BACKLOG: Final = 8
_CLOSE_TIMEOUT: Final = 5.0


class ServerState(enum.Enum):
    IDLE = "idle"
    SERVING = "serving"
    CLOSING = "closing"
    CLOSED = "closed"


class NbdServer:
    """Serves exports on a unix socket (mode 0600) inside a private (0700) directory."""

    def __init__(
        self,
        path: Path,
        exports: Iterable[Export] = (),
        *,
        name: str = "nbd",
        max_request: int = MAX_REQUEST,
        handshake_timeout: float = 30.0,
        keep_serving: bool = False,
        private_dir: bool = True,
    ) -> None:
        self.path = Path(path)
        self._keep_serving = keep_serving
        self._private_dir = private_dir
        self.name = name
        self._max_request = max_request
        self._handshake_timeout = handshake_timeout
        self._exports: dict[str, Export] = {}
        for export in exports:
            self.add_export(export)
        self._state = ServerState.IDLE
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: dict[asyncio.Task[None], Connection] = {}
        self._failure: QmpBackupError | None = None
        self._failed = asyncio.Event()
        self._conn_changed = asyncio.Event()
        self._accepted = 0

    def __repr__(self) -> str:
        return f"<NbdServer {self.name} {self._state.value} {str(self.path)!r}>"

    @property
    def state(self) -> ServerState:
        return self._state

    def _set_state(self, state: ServerState) -> None:
        log.debug("%s: %s -> %s", self.name, self._state.value, state.value)
        self._state = state

    # -- exports and failure ---------------------------------------------------------------

    def add_export(self, export: Export) -> None:
        """Adds an export; allowed until the server is closing."""
        if export.name in self._exports:
            raise ValueError(f"NBD export {export.name!r} exists already")
        self._exports[export.name] = export

    @property
    def exports(self) -> dict[str, Export]:
        return dict(self._exports)

    @property
    def failure(self) -> QmpBackupError | None:
        """The first protocol violation or consumer error, or None."""
        return self._failure

    def check(self) -> None:
        """Raises the recorded failure, if any."""
        if self._failure is not None:
            raise self._failure

    async def wait_failure(self) -> QmpBackupError:
        """Returns the failure once one is recorded (meant to race against the block job)."""
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    def _record_failure(self, err: QmpBackupError) -> None:
        if self._keep_serving:
            return  # the connection logged it; other clients are not concerned
        if self._failure is None:
            self._failure = err
            self._failed.set()
            log.debug("%s: failure recorded; refusing new connections", self.name)

    def connection_count(self, export: str | None = None) -> int:
        """Open connections (of one export's transmission phase, if named)."""
        if export is None:
            return len(self._connections)
        return sum(1 for c in self._connections.values()
                   if c.export is not None and c.export.name == export)

    async def wait_disconnected(self, export: str, timeout: float) -> None:
        """Waits until no connection uses ``export`` (after blockdev-del sent FLUSH + DISC)."""
        async with asyncio.timeout(timeout):
            while self.connection_count(export):
                self._conn_changed.clear()
                await self._conn_changed.wait()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._state is not ServerState.IDLE:
            raise StateError(repr(self), self._state.value, ServerState.IDLE.value)
        parent = self.path.parent
        try:
            info = parent.stat()
        except OSError as err:
            raise NbdError(f"NBD socket directory {parent}: {err.strerror}") from err
        if self._private_dir and (stat.S_IMODE(info.st_mode) & 0o077 or info.st_uid != os.getuid()):
            raise NbdError(f"NBD socket directory {parent} must be ours with mode 0700")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(_LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError as err:
            listener.close()
            raise NbdError(f"cannot listen on NBD socket {self.path}: {err.strerror}") from err
        self._listener = listener
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"{self.name}-accept")
        self._accept_task.add_done_callback(self._task_done)
        self._set_state(ServerState.SERVING)

    async def close(self) -> None:
        """Stops accepting, ends open connections, removes the socket file. Safe to call twice."""
        if self._state in (ServerState.CLOSING, ServerState.CLOSED):
            return
        if self._state is ServerState.IDLE:
            self._set_state(ServerState.CLOSED)
            return
        self._set_state(ServerState.CLOSING)
        tasks: list[asyncio.Task[None]] = list(self._connections)
        if self._accept_task is not None:
            tasks.append(self._accept_task)
        if self._connections:
            log.debug("%s: closing %d open connection(s)", self.name, len(self._connections))
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                _done, pending = await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT)
                if pending:
                    log.warning("%s: %d task(s) did not end within %s s", self.name, len(pending),
                                _CLOSE_TIMEOUT)
        finally:
            if self._listener is not None:
                self._listener.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("%s: cannot remove %s: %s", self.name, self.path, err.strerror)
            self._set_state(ServerState.CLOSED)

    async def __aenter__(self) -> NbdServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- connections -----------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                sock, _addr = await loop.sock_accept(self._listener)
            except OSError as err:
                # Out of file descriptors and the like: that breaks the backup too.
                self._record_failure(NbdError(f"accept on {self.path} failed: {err}"))
                return
            self._accepted += 1
            label = f"{self.name}#{self._accepted}"
            if self._failure is not None or self._state is not ServerState.SERVING:
                log.warning("%s: refusing connection after a failure", label)
                sock.close()
                continue
            sock.setblocking(False)
            log.debug("%s: connection accepted", label)
            conn = Connection(sock, self._exports, self._record_failure, label=label,
                              max_request=self._max_request,
                              handshake_timeout=self._handshake_timeout)
            task = asyncio.create_task(conn.run(), name=label)
            self._connections[task] = conn
            task.add_done_callback(self._connection_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """Records a crash of an accept or connection task: a bug must not vanish in a log."""
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            log.error("%s: task %s crashed: %r", self.name, task.get_name(), err)
            failure = NbdError(f"NBD server task {task.get_name()} crashed: {err!r}")
            failure.__cause__ = err
            self._record_failure(failure)

    def _connection_done(self, task: asyncio.Task[None]) -> None:
        conn = self._connections.pop(task, None)
        self._task_done(task)  # Connection.run reports its own errors; this is for bugs
        log.debug("%s: %r ended", self.name, conn)
        self._conn_changed.set()
