"""One QMP connection to one VM, with a time limit on every wait and our own errors.

``qemu.qmp.QMPClient`` does the protocol; this wrapper adds what the agent needs:

* an explicit :class:`SessionState` (``repr`` and DEBUG lines show it),
* one :meth:`QmpSession.execute` that applies a per-command default timeout (as
  ``PVE::QMPClient`` does) and turns the library's exceptions into ours,
* a connect that tells a missing socket, a permission problem, a refused
  connection and a *busy* socket apart (QMP serves one client at a time: a second
  client's connect succeeds, but the greeting never comes),
* :meth:`QmpSession.events`, a listener that is registered *before* the command
  that causes the events, so none is missed.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
)
from qemu.qmp.message import Message

from qmpbackup.errors import StateError
from qmpbackup.qemu.errors import (
    QemuError,
    QmpCommandError,
    QmpConnectError,
    QmpDisconnectedError,
    QmpOutcomeUnknownError,
    QmpSocketBusyError,
    QmpTimeoutError,
)

log = logging.getLogger(__name__)

#: Seconds for any command not listed below (PVE::QMPClient's default).
DEFAULT_TIMEOUT_S = 5.0
#: Per-command defaults in seconds. Graph changes drain I/O and can take long on a busy
#: VM; deletes wait for in-flight requests (PVE allows 10 min); the schema is large.
COMMAND_TIMEOUTS_S: Mapping[str, float] = {
    "query-qmp-schema": 30.0,
    "blockdev-add": 60.0,
    "block-export-add": 60.0,
    "object-add": 60.0,
    "blockdev-del": 600.0,
    "block-export-del": 60.0,
    "transaction": 60.0,
    "blockdev-backup": 60.0,
    "qom-set": 60.0,
    "block-job-cancel": 60.0,
    "job-cancel": 60.0,
    "job-finalize": 60.0,
    "nbd-server-stop": 60.0,
    "human-monitor-command": 30.0,
    "stop": 30.0,
    "cont": 30.0,
    "quit": 10.0,
}
#: How long the greeting may take once the socket is connected. QEMU greets at once;
#: silence means another client holds the monitor.
GREETING_TIMEOUT_S = 5.0


def command_timeout(command: str) -> float:
    """The default limit in seconds for ``command``."""
    return COMMAND_TIMEOUTS_S.get(command, DEFAULT_TIMEOUT_S)


class SessionState(enum.Enum):
    """Life cycle of a :class:`QmpSession`; it is used once (no reconnect)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSING = "closing"
    CLOSED = "closed"


Event = Mapping[str, Any]
EventPredicate = Callable[[Event], bool]


class EventWaiter:
    """Events of some names, collected from the moment the ``events()`` block was entered."""

    def __init__(self, session: QmpSession, listener: EventListener) -> None:
        self._session = session
        self._listener = listener

    async def wait_for(self, predicate: EventPredicate, timeout: float) -> Event:
        """The first collected event for which ``predicate`` is true.

        Events that do not match are consumed and dropped. Waits at most ``timeout``
        seconds in total.

        :raise QmpTimeoutError: no matching event in time.
        :raise QmpDisconnectedError: the connection ended while waiting.
        """
        names = ",".join(self._listener.names or ()) or "event"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await self._session._next_event(self._listener)
                    if predicate(event):
                        return event
        except TimeoutError:
            raise QmpTimeoutError(f"waiting for {names}", timeout, self._session.vm) from None

    def drain(self) -> list[Event]:
        """All events collected and not yet consumed (does not wait)."""
        return [dict(m) for m in self._listener.clear()]


class QmpSession:
    """A QMP connection to the VM ``vm`` (its id, used in messages and log lines).

    Use as ``async with QmpSession(vm, path) as qmp:`` or call :meth:`connect` and
    :meth:`close` yourself.
    """

    def __init__(self, vm: str | int, socket_path: str | os.PathLike[str]) -> None:
        self.vm = str(vm)
        self.socket_path = os.fspath(socket_path)
        self._client = QMPClient(f"vm{self.vm}")
        self._state = SessionState.IDLE
        self.log = log.getChild(f"vm{self.vm}")

    def __repr__(self) -> str:
        return f"<QmpSession vm={self.vm} {self.socket_path} {self._state.value}>"

    @property
    def state(self) -> SessionState:
        return self._state

    def _set_state(self, state: SessionState) -> None:
        self.log.debug("QMP session %s -> %s", self._state.value, state.value)
        self._state = state

    def _require(self, what: str, *states: SessionState) -> None:
        if self._state not in states:
            if self._state in (SessionState.CLOSING, SessionState.CLOSED) or (
                self._state is SessionState.IDLE and SessionState.CONNECTED in states
            ):
                raise QmpDisconnectedError(
                    f"{what} on VM {self.vm}: QMP session is {self._state.value}", self.vm
                )
            raise StateError(what, self._state.value, "/".join(s.value for s in states))

    async def __aenter__(self) -> QmpSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def qemu_version(self) -> tuple[int, int, int] | None:
        """The version from the greeting (for log lines only; ask capabilities instead)."""
        greeting = self._client.greeting
        if greeting is None:
            return None
        v = cast(Mapping[str, Any], cast(Mapping[str, Any], greeting.QMP.version).get("qemu", {}))
        return (int(v.get("major", 0)), int(v.get("minor", 0)), int(v.get("micro", 0)))

    def peer_pid(self) -> int | None:
        """The pid of the QEMU at the other end of the socket (``SO_PEERCRED``), while connected."""
        writer = getattr(self._client, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None:
            return None
        try:
            pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        except OSError:
            return None
        return int(pid) or None

    async def connect(self, greeting_timeout: float = GREETING_TIMEOUT_S) -> None:
        """Connect, read the greeting and negotiate capabilities.

        A unix socket connect never blocks: either it fails at once (missing socket,
        permission, nobody listening) or the kernel queues us. So running out of time
        means QEMU accepted nobody, i.e. the monitor is held by another client.

        :raise QmpConnectError: the socket is missing, not accessible or refuses connections.
        :raise QmpSocketBusyError: no greeting within ``greeting_timeout`` seconds.
        """
        self._require("connect", SessionState.IDLE)
        self._set_state(SessionState.CONNECTING)
        try:
            await self._connect_client(self.socket_path, greeting_timeout)
        except BaseException:
            self._set_state(SessionState.CLOSED)
            raise
        self._set_state(SessionState.CONNECTED)
        self.log.debug("connected to %s, QEMU %s", self.socket_path, self.qemu_version)

    def _connect_message(self, path: str, e: OSError) -> str:
        if e.errno == errno.ENOENT:
            why = "does not exist (is the VM running?)"
        elif e.errno in (errno.EACCES, errno.EPERM):
            why = "permission denied"
        elif e.errno == errno.ECONNREFUSED:
            why = "refuses connections (QEMU is gone or the socket is stale)"
        elif e.errno == errno.ENOTSOCK:
            why = "is not a socket"
        else:
            why = e.strerror or str(e)
        return f"QMP socket {path} of VM {self.vm}: {why}"

    async def _connect_client(self, path: str, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._client.connect(path)
        except TimeoutError:
            raise QmpSocketBusyError(
                f"QMP socket {path} of VM {self.vm} is busy (another client is connected?):"
                f" no greeting within {timeout:g} s",
                path,
                self.vm,
            ) from None
        except ConnectError as e:
            cause = e.exc
            if isinstance(cause, OSError):
                raise QmpConnectError(self._connect_message(path, cause), path, self.vm) from e
            raise QmpConnectError(
                f"QMP socket {path} of VM {self.vm}: handshake failed: {e}", path, self.vm
            ) from e

    async def close(self, timeout: float = 5.0) -> None:
        """Disconnect; safe to call in any state and twice. Never raises an ``Exception``."""
        if self._state in (SessionState.CLOSED, SessionState.CLOSING):
            return
        if self._state is SessionState.IDLE:
            self._set_state(SessionState.CLOSED)
            return
        self._set_state(SessionState.CLOSING)
        try:
            async with asyncio.timeout(timeout):
                await self._client.disconnect()
        except Exception as e:  # the reader's death cause is re-raised here; it is not news
            self.log.debug("disconnect: %s: %s", type(e).__name__, e)
        finally:
            self._set_state(SessionState.CLOSED)

    async def execute(
        self,
        command: str,
        args: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``command`` and return its reply, waiting at most ``timeout`` seconds
        (default: :func:`command_timeout`).

        :raise QmpTimeoutError: no reply in time (the command may still run in QEMU).
        :raise QmpCommandError: QEMU answered with an error.
        :raise QmpOutcomeUnknownError: the connection died before the reply.
        :raise QmpDisconnectedError: the session is not connected.
        """
        self._require(command, SessionState.CONNECTED)
        if self._client.runstate.name != "RUNNING":
            raise QmpDisconnectedError(f"{command} on VM {self.vm}: the QMP connection was lost", self.vm)
        limit = command_timeout(command) if timeout is None else timeout
        self.log.debug("-> %s %s (limit %g s)", command, dict(args) if args else "", limit)
        try:
            async with asyncio.timeout(limit):
                reply = await self._client.execute(command, dict(args) if args else None)
        except TimeoutError:
            raise QmpTimeoutError(command, limit, self.vm) from None
        except ExecuteError as e:
            raise QmpCommandError(command, args, e.error_class, str(e), self.vm) from e
        except ExecInterruptedError as e:
            raise QmpOutcomeUnknownError(command, self.vm) from e
        except Exception as e:
            if self._client.runstate.name != "RUNNING":
                raise QmpOutcomeUnknownError(command, self.vm) from e
            raise QemuError(f"{command} on VM {self.vm}: {type(e).__name__}: {e}", self.vm) from e
        self.log.debug("<- %s %.200r", command, reply)
        return reply

    async def hmp(self, command_line: str, timeout: float | None = None) -> str:
        """Run a human monitor command through ``human-monitor-command`` and return its text.

        HMP reports lookup and syntax problems as text starting with ``Error:``; those
        become a :class:`QmpCommandError`. (qemu-io prints I/O results to QEMU's stdout,
        not here: an empty reply does not prove the I/O worked.)
        """
        out = await self.execute(
            "human-monitor-command", {"command-line": command_line}, timeout=timeout
        )
        text = str(out)
        if text.startswith("Error:") or "\nError:" in text:
            raise QmpCommandError(
                "human-monitor-command", {"command-line": command_line}, "HMPError", text.strip(), self.vm
            )
        return text

    async def qemu_io(self, qdev: str, io_command: str, timeout: float | None = None) -> str:
        """``qemu-io`` through HMP on the BlockBackend of device ``qdev`` (the ``qdev``
        path from ``query-block``), so the I/O passes any filter a backup put there."""
        quoted = io_command.replace("\\", "\\\\").replace('"', '\\"')
        return await self.hmp(f'qemu-io -d {qdev} "{quoted}"', timeout=timeout)

    @asynccontextmanager
    async def events(self, names: Iterable[str]) -> AsyncIterator[EventWaiter]:
        """Collect the events ``names`` while the block runs.

        Enter it *before* sending the command that causes them::

            async with session.events(["BLOCK_JOB_COMPLETED"]) as ev:
                await session.execute("blockdev-backup", {...})
                done = await ev.wait_for(lambda e: e["data"]["device"] == job, 30)
        """
        self._require("events", SessionState.CONNECTED)
        listener = EventListener(tuple(names))
        self._client.register_listener(listener)
        try:
            yield EventWaiter(self, listener)
        finally:
            self._client.remove_listener(listener)

    async def _next_event(self, listener: EventListener) -> Event:
        """The next queued event, or :class:`QmpDisconnectedError` once the link is down."""
        if not listener.empty():
            return dict(await listener.get())
        get = asyncio.ensure_future(listener.get())
        gone = asyncio.ensure_future(self._wait_disconnected())
        try:
            done, _ = await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (get, gone):
                if not fut.done():
                    fut.cancel()
            await asyncio.gather(get, gone, return_exceptions=True)
        if get in done and not get.cancelled() and get.exception() is None:
            msg: Message = get.result()
            return dict(msg)
        raise QmpDisconnectedError(f"VM {self.vm}: QMP connection lost while waiting for events", self.vm)

    async def _wait_disconnected(self) -> None:
        while self._client.runstate.name == "RUNNING":
            await self._client.runstate_changed()
