"""Asyncio client for qemu-ga over its unix socket (QEMU's virtio-serial chardev).

Why our own client: qemu.qmp cannot survive the 0xFF of ``guest-sync-delimited``,
and QGA replies carry nothing that ties them to a request, so a reply left over
from an earlier client (or from a command we gave up on) would be read as the
answer to the next command. The rule here: after every connect and after every
timeout, cancellation or garbage, the next call first sends 0xFF (resets the
agent's parser), then ``guest-sync-delimited`` with a fresh random id, skips to
the agent's 0xFF and reads replies until the one carrying that id. Everything
before it is stale and dropped.

Only one command is in flight at a time (the agent answers in order), and every
call, including the sync, is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from qmpbackup.errors import StateError
from qmpbackup.guest_agent.errors import (
    GuestAgentCommandError,
    GuestAgentError,
    GuestAgentNotConnectedError,
    GuestAgentProtocolError,
    GuestAgentTimeoutError,
    GuestAgentUnavailableError,
)
from qmpbackup.guest_agent.wire import (
    SENTINEL,
    ReplyReader,
    ReplyStreamClosed,
    ReplyTooLarge,
    encode_request,
    parse_line,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
# vzdump's client limits (PVE::QMPClient); everything else gets DEFAULT_TIMEOUT_S
COMMAND_TIMEOUTS_S: dict[str, float] = {
    "guest-fsfreeze-freeze": 600.0,
    "guest-fsfreeze-freeze-list": 600.0,
    "guest-fsfreeze-thaw": 180.0,
}
_CLOSE_TIMEOUT_S = 2.0


class AgentState(enum.Enum):
    """DISCONNECTED: no socket. NEEDS_SYNC: connected, stream position unknown. READY: in sync."""

    DISCONNECTED = "disconnected"
    NEEDS_SYNC = "needs-sync"
    READY = "ready"


class FreezeStatus(str, enum.Enum):
    """Answer of guest-fsfreeze-status."""

    THAWED = "thawed"
    FROZEN = "frozen"


class GuestAgentClient:
    """One connection to one VM's qemu-ga.

    ``name`` labels the VM in messages and logs (e.g. ``"VM 100"``); it defaults
    to the socket path. Use as ``async with GuestAgentClient(path) as agent:``
    or call :meth:`connect` / :meth:`close`.
    """

    def __init__(self, socket_path: str, *, name: str | None = None) -> None:
        self.socket_path = str(socket_path)
        self.name = name or self.socket_path
        self._state = AgentState.DISCONNECTED
        self._reader: ReplyReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._log = log.getChild(self.name.replace(".", "_").replace("/", "_").strip("_") or "agent")

    def __repr__(self) -> str:
        return f"<GuestAgentClient {self.name} {self._state.value}>"

    @property
    def state(self) -> AgentState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is not AgentState.DISCONNECTED

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _set_state(self, state: AgentState) -> None:
        if state is not self._state:
            self._log.debug("state %s -> %s", self._state.value, state.value)
            self._state = state

    @property
    def where(self) -> str:
        """How messages name this agent: ``guest agent of VM 100 (/path/100.qga)``."""
        if self.name == self.socket_path:
            return f"guest agent at {self.socket_path}"
        return f"guest agent of {self.name} ({self.socket_path})"

    def _error(self, cls: type[GuestAgentError], text: str, command: str | None) -> GuestAgentError:
        return cls(f"{self.where}: {text}", target=self.name, socket_path=self.socket_path,
                   command=command)

    # --- connection ----------------------------------------------------------------------------

    async def connect(self, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Open the socket and sync; ``timeout`` bounds both (use a long one to wait for a boot).

        Raises GuestAgentUnavailableError when the socket cannot be opened or
        nobody answers the sync in time (agent not running, VM paused, or
        another client holds the chardev), StateError when already connected.
        """
        if self._state is not AgentState.DISCONNECTED:
            raise StateError(f"connect {self.name}", self._state.value, AgentState.DISCONNECTED.value)
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                try:
                    reader, writer = await asyncio.open_unix_connection(self.socket_path)
                except OSError as exc:
                    raise self._error(GuestAgentUnavailableError,
                                      f"cannot connect: {exc.strerror or exc}", None) from exc
                self._reader, self._writer = ReplyReader(reader), writer
                self._set_state(AgentState.NEEDS_SYNC)
                async with self._lock:
                    await self._sync()
        except TimeoutError as exc:
            await self.close()
            raise self._error(
                GuestAgentUnavailableError,
                f"no answer to guest-sync-delimited within {timeout:g} s "
                "(agent not running in the guest, VM paused, or another client holds the socket)",
                "guest-sync-delimited") from exc
        except (ReplyStreamClosed, ReplyTooLarge, OSError) as exc:
            await self.close()
            raise self._error(GuestAgentUnavailableError,
                              f"connection lost during guest-sync-delimited ({exc})",
                              "guest-sync-delimited") from exc
        except BaseException:
            await self.close()
            raise
        self._log.debug("connected and in sync after %.3f s", time.monotonic() - started)

    async def close(self) -> None:
        """Close the connection (safe to call twice). Closing never thaws a frozen guest."""
        writer, self._writer, self._reader = self._writer, None, None
        self._set_state(AgentState.DISCONNECTED)
        if writer is None:
            return
        writer.close()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            self._log.debug("close: %s", exc)

    async def reconnect(self, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Close (if needed) and connect again, with a fresh sync."""
        await self.close()
        await self.connect(timeout=timeout)

    # --- protocol ------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def _sync(self) -> None:
        """Resynchronise the stream (caller holds the lock and applies the timeout)."""
        assert self._reader is not None
        sync_id = secrets.randbelow(2**31 - 1) + 1
        self._log.debug("sync id %d", sync_id)
        await self._send(SENTINEL + encode_request("guest-sync-delimited", {"id": sync_id}))
        dropped = await self._reader.skip_past_sentinel()
        if dropped:
            self._log.debug("sync: dropped %d stale bytes before the sentinel", dropped)
        while True:
            line = await self._reader.line()
            try:
                reply = parse_line(line)
            except ValueError:
                self._log.debug("sync: skipping unparsable line %r", line[:200])
                continue
            if reply is None:
                continue
            if reply.get("return") == sync_id:
                self._set_state(AgentState.READY)
                return
            # the answer to our own 0xFF ("JSON parse error, stray ...") or a stale reply
            self._log.debug("sync: skipping stale reply %.200r", reply)

    async def _read_reply(self, command: str) -> Any:
        assert self._reader is not None
        while True:
            line = await self._reader.line()
            try:
                reply = parse_line(line)
            except ValueError as exc:
                raise self._error(GuestAgentProtocolError,
                                  f"{command}: unparsable reply {line[:80]!r}", command) from exc
            if reply is not None:
                break
        if "return" in reply:
            return reply["return"]
        error = reply.get("error")
        if isinstance(error, dict):
            error_class = str(error.get("class", "GenericError"))
            desc = str(error.get("desc", "")).replace("\n", " ")
            raise GuestAgentCommandError(
                f"{self.where}: {command} failed: {desc} ({error_class})",
                target=self.name, socket_path=self.socket_path, command=command,
                error_class=error_class, desc=desc)
        raise self._error(GuestAgentProtocolError, f"{command}: unexpected reply {str(reply)[:80]}",
                          command)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any:
        """Run one agent command and return its ``return`` value.

        ``timeout`` (seconds) bounds the whole call including a pending resync;
        default from COMMAND_TIMEOUTS_S, else DEFAULT_TIMEOUT_S. Raises
        GuestAgentNotConnectedError, GuestAgentTimeoutError (the connection is
        resynced by the next call), GuestAgentCommandError (the agent said no),
        GuestAgentUnavailableError (connection lost; the client is then
        disconnected), GuestAgentProtocolError.
        """
        if timeout is None:
            timeout = COMMAND_TIMEOUTS_S.get(command, DEFAULT_TIMEOUT_S)
        if self._state is AgentState.DISCONNECTED:
            raise self._error(GuestAgentNotConnectedError, f"{command}: not connected", command)
        started = time.monotonic()
        self._log.debug("-> %s %s", command, arguments or "")
        try:
            async with asyncio.timeout(timeout):
                async with self._lock:
                    if not self.connected:  # closed while we waited for the lock
                        raise self._error(GuestAgentNotConnectedError, f"{command}: not connected",
                                          command)
                    if self._state is AgentState.NEEDS_SYNC:
                        await self._sync()
                    self._set_state(AgentState.NEEDS_SYNC)  # until the reply is read in full
                    await self._send(encode_request(command, arguments))
                    try:
                        result = await self._read_reply(command)
                    except GuestAgentCommandError:
                        self._set_state(AgentState.READY)
                        raise
                    self._set_state(AgentState.READY)
        except TimeoutError as exc:
            raise GuestAgentTimeoutError(
                f"{self.where}: {command} got no reply within {timeout:g} s",
                target=self.name, socket_path=self.socket_path, command=command,
                timeout_s=timeout) from exc
        except (ReplyStreamClosed, OSError) as exc:
            await self.close()
            raise self._error(GuestAgentUnavailableError, f"{command}: connection lost ({exc})",
                              command) from exc
        except ReplyTooLarge as exc:
            raise self._error(GuestAgentProtocolError, f"{command}: {exc}", command) from exc
        self._log.debug("<- %s after %.3f s: %.200r", command, time.monotonic() - started, result)
        return result

    # --- commands ------------------------------------------------------------------------------

    async def sync(self, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Force a resync now (e.g. to wait until the agent has finished a slow command)."""
        if self._state is AgentState.DISCONNECTED:
            raise self._error(GuestAgentNotConnectedError, "guest-sync-delimited: not connected",
                              "guest-sync-delimited")
        try:
            async with asyncio.timeout(timeout):
                async with self._lock:
                    self._set_state(AgentState.NEEDS_SYNC)
                    await self._sync()
        except TimeoutError as exc:
            raise GuestAgentTimeoutError(
                f"{self.where}: guest-sync-delimited got no reply within {timeout:g} s",
                target=self.name, socket_path=self.socket_path, command="guest-sync-delimited",
                timeout_s=timeout) from exc
        except (ReplyStreamClosed, OSError) as exc:
            await self.close()
            raise self._error(GuestAgentUnavailableError,
                              f"guest-sync-delimited: connection lost ({exc})",
                              "guest-sync-delimited") from exc

    async def ping(self, *, timeout: float | None = None) -> None:
        await self.execute("guest-ping", timeout=timeout)

    async def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """guest-info: ``version`` and ``supported_commands`` (name, enabled, success-response)."""
        result = await self.execute("guest-info", timeout=timeout)
        return cast(dict[str, Any], self._expect(result, dict, "guest-info"))

    async def fsfreeze_status(self, *, timeout: float | None = None) -> FreezeStatus:
        result = await self.execute("guest-fsfreeze-status", timeout=timeout)
        try:
            return FreezeStatus(result)
        except ValueError as exc:
            raise self._error(GuestAgentProtocolError,
                              f"guest-fsfreeze-status: unexpected answer {result!r}",
                              "guest-fsfreeze-status") from exc

    async def fsfreeze_freeze(self, mountpoints: list[str] | None = None, *,
                              timeout: float | None = None) -> int:
        """Freeze all (or the listed) filesystems; returns how many were frozen.

        Prefer :func:`qmpbackup.guest_agent.frozen_window`, which guarantees the thaw.
        """
        if mountpoints is None:
            result = await self.execute("guest-fsfreeze-freeze", timeout=timeout)
            return self._expect(result, int, "guest-fsfreeze-freeze")
        result = await self.execute("guest-fsfreeze-freeze-list", {"mountpoints": mountpoints},
                                    timeout=timeout)
        return self._expect(result, int, "guest-fsfreeze-freeze-list")

    async def fsfreeze_thaw(self, *, timeout: float | None = None) -> int:
        """Thaw; returns how many filesystems were thawed (0 if none was frozen)."""
        result = await self.execute("guest-fsfreeze-thaw", timeout=timeout)
        return self._expect(result, int, "guest-fsfreeze-thaw")

    async def get_fsinfo(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """guest-get-fsinfo: per mounted filesystem ``name``, ``mountpoint``, ``type``, ``disk``."""
        result = await self.execute("guest-get-fsinfo", timeout=timeout)
        return cast(list[dict[str, Any]], self._expect(result, list, "guest-get-fsinfo"))

    async def shutdown(self, mode: str = "powerdown", *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Send guest-shutdown (``powerdown``, ``halt`` or ``reboot``) without waiting for a reply.

        The agent answers only on failure, so success cannot be seen here:
        wait for QEMU to exit or for the QMP SHUTDOWN event. A late error reply
        is dropped by the next call's resync.
        """
        command = "guest-shutdown"
        if self._state is AgentState.DISCONNECTED:
            raise self._error(GuestAgentNotConnectedError, f"{command}: not connected", command)
        try:
            async with asyncio.timeout(timeout):
                async with self._lock:
                    if self._state is AgentState.NEEDS_SYNC:
                        await self._sync()
                    self._set_state(AgentState.NEEDS_SYNC)
                    await self._send(encode_request(command, {"mode": mode}))
        except TimeoutError as exc:
            raise GuestAgentTimeoutError(
                f"{self.where}: {command} could not be sent within {timeout:g} s", target=self.name,
                socket_path=self.socket_path, command=command, timeout_s=timeout) from exc
        except (ReplyStreamClosed, OSError) as exc:
            await self.close()
            raise self._error(GuestAgentUnavailableError, f"{command}: connection lost ({exc})",
                              command) from exc

    def _expect(self, value: Any, kind: type[_T], command: str) -> _T:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self._error(GuestAgentProtocolError,
                              f"{command}: expected {kind.__name__}, got {value!r:.80}", command)
        return value
