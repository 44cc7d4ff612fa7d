"""GuestAgentClient against a fake qemu-ga on a real unix socket: sync, stale replies, bounds, errors."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from qmpbackup.errors import QmpBackupError, StateError
from qmpbackup.guest_agent import (
    AgentState,
    FreezeStatus,
    GuestAgentClient,
    GuestAgentCommandError,
    GuestAgentNotConnectedError,
    GuestAgentProtocolError,
    GuestAgentTimeoutError,
    GuestAgentUnavailableError,
)
from qmpbackup.guest_agent.wire import encode_request, parse_line
from tests.guest_agent.fake_agent import FakeAgent

pytestmark = pytest.mark.timeout(30)


def state(agent: GuestAgentClient) -> AgentState:
    """Read the state through a call, so mypy does not keep an earlier narrowing."""
    return agent.state


def test_wire_helpers() -> None:
    assert encode_request("guest-ping") == b'{"execute":"guest-ping"}\n'
    assert json.loads(encode_request("guest-sync", {"id": 5})) == {"execute": "guest-sync",
                                                                   "arguments": {"id": 5}}
    assert parse_line(b"\xff\xff{\"return\": 7} ") == {"return": 7}
    assert parse_line(b"  ") is None
    with pytest.raises(ValueError):
        parse_line(b"[1]")
    with pytest.raises(ValueError):
        parse_line(b"{nope")


async def test_connect_and_commands(fake_agent: FakeAgent) -> None:
    async with GuestAgentClient(fake_agent.path, name="VM 100") as agent:
        assert state(agent) is AgentState.READY
        await agent.ping()
        assert (await agent.info())["version"] == "7.2.99-fake"
        assert await agent.fsfreeze_status() is FreezeStatus.THAWED
        assert await agent.fsfreeze_freeze() == 1
        assert await agent.fsfreeze_status() is FreezeStatus.FROZEN
        assert await agent.fsfreeze_thaw() == 1
        assert await agent.fsfreeze_thaw() == 0
        assert [fs["mountpoint"] for fs in await agent.get_fsinfo()] == ["/mnt/data"]
        assert "VM 100" in repr(agent) or "ready" in repr(agent)
    assert state(agent) is AgentState.DISCONNECTED
    # the client sent 0xFF first: the agent's parse error reply was skipped like a stale one
    assert fake_agent.received[:2] == ["__parse_error__", "guest-sync-delimited"]


async def test_stale_replies_from_an_earlier_client_are_skipped(fake_agent: FakeAgent) -> None:
    fake_agent.queue_stale(b'{"return": {}}\n\xff{"return": 12345}\n{"return": "thawed"}\n'
                           b'{"error": {"class": "GenericError", "desc": "old"}}\n'
                           b'half a line from a dead clie')
    async with GuestAgentClient(fake_agent.path) as agent:
        assert await agent.fsfreeze_status() is FreezeStatus.THAWED
        await agent.ping()
        assert isinstance(await agent.info(), dict)


async def test_timeout_then_resync_drops_the_late_reply(fake_agent: FakeAgent) -> None:
    fake_agent.delays["guest-info"] = 0.4
    async with GuestAgentClient(fake_agent.path, name="VM 7") as agent:
        started = time.monotonic()
        with pytest.raises(GuestAgentTimeoutError) as info:
            await agent.info(timeout=0.1)
        assert time.monotonic() - started < 0.3
        assert info.value.command == "guest-info" and info.value.timeout_s == 0.1
        assert str(info.value) == (f"guest agent of VM 7 ({fake_agent.path}): guest-info got no "
                                   "reply within 0.1 s")
        assert state(agent) is AgentState.NEEDS_SYNC
        # the late guest-info reply must not be taken for the status reply
        assert await agent.fsfreeze_status(timeout=2) is FreezeStatus.THAWED
        assert state(agent) is AgentState.READY


async def test_cancelled_call_resyncs(fake_agent: FakeAgent) -> None:
    fake_agent.delays["guest-ping"] = 0.3
    async with GuestAgentClient(fake_agent.path) as agent:
        task = asyncio.create_task(agent.ping())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert state(agent) is AgentState.NEEDS_SYNC
        assert await agent.fsfreeze_status() is FreezeStatus.THAWED


async def test_command_error(fake_agent: FakeAgent) -> None:
    fake_agent.errors["guest-fsfreeze-freeze"] = ("GenericError", "failed to freeze /mnt/data: x")
    async with GuestAgentClient(fake_agent.path, name="VM 9") as agent:
        with pytest.raises(GuestAgentCommandError) as info:
            await agent.fsfreeze_freeze()
        err = info.value
        assert (err.error_class, err.command, err.target) == ("GenericError", "guest-fsfreeze-freeze",
                                                              "VM 9")
        assert str(err) == (f"guest agent of VM 9 ({fake_agent.path}): guest-fsfreeze-freeze failed: "
                            "failed to freeze /mnt/data: x (GenericError)")
        assert isinstance(err, QmpBackupError) and err.exit_code == 1
        await agent.ping()  # still in sync


async def test_no_agent_behind_the_socket(fake_agent: FakeAgent) -> None:
    fake_agent.silent = True
    agent = GuestAgentClient(fake_agent.path, name="VM 3")
    started = time.monotonic()
    with pytest.raises(GuestAgentUnavailableError) as info:
        await agent.connect(timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 1.5
    assert "no answer to guest-sync-delimited within 0.5 s" in str(info.value)
    assert "\n" not in str(info.value)
    assert state(agent) is AgentState.DISCONNECTED


async def test_missing_socket(short_dir: Path) -> None:
    agent = GuestAgentClient(str(short_dir / "nope.sock"))
    with pytest.raises(GuestAgentUnavailableError, match=r"nope.sock: cannot connect: No such file"):
        await agent.connect()
    with pytest.raises(GuestAgentNotConnectedError, match="guest-ping: not connected"):
        await agent.ping()


async def test_connection_lost(fake_agent: FakeAgent) -> None:
    fake_agent.kick_on.add("guest-info")
    async with GuestAgentClient(fake_agent.path) as agent:
        with pytest.raises(GuestAgentUnavailableError, match="guest-info: connection lost"):
            await agent.info()
        assert state(agent) is AgentState.DISCONNECTED
        with pytest.raises(GuestAgentNotConnectedError):
            await agent.ping()
        fake_agent.kick_on.clear()
        await agent.reconnect()
        # the guest-info reply produced after the kick reaches the new client and is dropped
        assert await agent.fsfreeze_status() is FreezeStatus.THAWED


async def test_garbage_reply_is_a_protocol_error_then_resync(fake_agent: FakeAgent) -> None:
    async with GuestAgentClient(fake_agent.path) as agent:
        fake_agent._emit(b"this is not json\n")
        await asyncio.sleep(0.05)
        with pytest.raises(GuestAgentProtocolError, match="guest-ping: unparsable reply"):
            await agent.ping()
        await agent.ping()


async def test_connect_twice_is_a_state_error(fake_agent: FakeAgent) -> None:
    async with GuestAgentClient(fake_agent.path) as agent:
        with pytest.raises(StateError):
            await agent.connect()


async def test_shutdown_expects_no_reply(fake_agent: FakeAgent) -> None:
    async with GuestAgentClient(fake_agent.path) as agent:
        await agent.shutdown("halt")
        assert state(agent) is AgentState.NEEDS_SYNC
        await asyncio.sleep(0.05)
        assert fake_agent.shutdowns == ["halt"]
        await agent.ping()  # resyncs first
