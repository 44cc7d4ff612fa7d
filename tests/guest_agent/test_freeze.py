"""frozen_window against the fake agent: a thaw follows every freeze attempt, whatever failed."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from qmpbackup.guest_agent import (
    FreezeTimeouts,
    GuestAgentClient,
    GuestAgentUnavailableError,
    GuestFreezeError,
    GuestThawError,
    frozen_window,
)
from qmpbackup.guest_agent.freeze import thaw_left_frozen
from qmpbackup.recovery.kinds import FREEZE
from qmpbackup.recovery.steps import undo_steps
from qmpbackup.recovery.journal import Entry
from tests.guest_agent.fake_agent import FakeAgent

pytestmark = pytest.mark.timeout(30)

FAST = FreezeTimeouts(ping_s=0.5, status_s=0.5, freeze_s=0.2, status_polls=3, status_poll_s=0.3,
                      thaw_s=0.5, thaw_attempts=2, reconnect_s=0.5, retry_pause_s=0.05)


async def test_window_freezes_and_thaws(fake_agent: FakeAgent) -> None:
    async with GuestAgentClient(fake_agent.path, name="VM 1") as agent:
        async with frozen_window(agent, timeouts=FAST) as outcome:
            assert outcome.frozen and fake_agent.frozen
            assert outcome.filesystems == 1
        assert not fake_agent.frozen
        assert outcome.thawed and not outcome.frozen
        assert outcome.freeze_s is not None and outcome.thaw_s is not None
        assert outcome.frozen_for_s is not None


async def test_window_connects_an_unconnected_client(fake_agent: FakeAgent) -> None:
    agent = GuestAgentClient(fake_agent.path)
    try:
        async with frozen_window(agent, timeouts=FAST) as outcome:
            assert outcome.frozen
        assert not fake_agent.frozen
    finally:
        await agent.close()


async def test_thaw_when_the_block_raises(fake_agent: FakeAgent) -> None:
    async with GuestAgentClient(fake_agent.path) as agent:
        with pytest.raises(RuntimeError, match="job failed"):
            async with frozen_window(agent, timeouts=FAST):
                raise RuntimeError("job failed")
        assert not fake_agent.frozen


async def test_thaw_when_cancelled_inside_the_block(fake_agent: FakeAgent) -> None:
    fake_agent.delays["guest-fsfreeze-thaw"] = 0.2  # the cancel arrives mid-thaw too
    async with GuestAgentClient(fake_agent.path) as agent:
        entered = asyncio.Event()

        async def job() -> None:
            async with frozen_window(agent, timeouts=FAST):
                entered.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(job())
        await entered.wait()
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # a second cancel while thawing
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not fake_agent.frozen


async def test_thaw_when_cancelled_during_the_freeze(fake_agent: FakeAgent) -> None:
    fake_agent.delays["guest-fsfreeze-freeze"] = 0.3
    async with GuestAgentClient(fake_agent.path) as agent:
        async def job() -> None:
            async with frozen_window(agent, timeouts=FreezeTimeouts(ping_s=1, thaw_s=2)):
                raise AssertionError("the block must not run")

        task = asyncio.create_task(job())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the agent finished freezing after our cancel; the thaw came after it
        assert not fake_agent.frozen
        assert fake_agent.received.index("guest-fsfreeze-thaw") > fake_agent.received.index(
            "guest-fsfreeze-freeze")


async def test_freeze_timeout_then_status_polling_sees_frozen(fake_agent: FakeAgent) -> None:
    fake_agent.delays["guest-fsfreeze-freeze"] = 0.35  # > freeze_s 0.2: the first status poll waits
    async with GuestAgentClient(fake_agent.path) as agent:
        async with frozen_window(agent, timeouts=FAST) as outcome:
            assert outcome.frozen and fake_agent.frozen
        assert not fake_agent.frozen
        assert "guest-fsfreeze-status" in fake_agent.received[fake_agent.received.index(
            "guest-fsfreeze-freeze"):]


async def test_freeze_never_completes_gives_up_within_the_bound(fake_agent: FakeAgent) -> None:
    fake_agent.delays["guest-fsfreeze-freeze"] = 1.5  # > freeze_s + polls * poll_s = 1.1
    async with GuestAgentClient(fake_agent.path) as agent:
        started = time.monotonic()
        with pytest.raises(GuestFreezeError, match="gave up on guest-fsfreeze-freeze after 1.1 s"):
            async with frozen_window(agent, timeouts=FAST, strict=True):
                raise AssertionError("the block must not run")
        assert time.monotonic() - started < 3
        # the thaw after giving up waited for the freeze to finish in the agent, then thawed
        assert not fake_agent.frozen


async def test_freeze_error_yields_unfrozen_window_and_thaws(fake_agent: FakeAgent) -> None:
    fake_agent.errors["guest-fsfreeze-freeze"] = ("GenericError", "failed to freeze /x")
    async with GuestAgentClient(fake_agent.path) as agent:
        async with frozen_window(agent, timeouts=FAST) as outcome:
            assert not outcome.frozen and outcome.attempted
            assert outcome.error is not None and "failed to freeze /x" in outcome.error
        assert "guest-fsfreeze-thaw" in fake_agent.received
        with pytest.raises(GuestFreezeError, match="freeze failed .guest thawed again.: "):
            async with frozen_window(agent, timeouts=FAST, strict=True):
                raise AssertionError("the block must not run")


async def test_disconnect_is_not_a_thaw(fake_agent: FakeAgent) -> None:
    async with GuestAgentClient(fake_agent.path) as agent:
        async with frozen_window(agent, timeouts=FAST) as outcome:
            fake_agent.kick()  # connection lost while frozen
            await asyncio.sleep(0.05)
            assert fake_agent.frozen
        assert outcome.thawed and not fake_agent.frozen
        assert fake_agent.connections == 2


async def test_thaw_impossible_is_loud(fake_agent: FakeAgent) -> None:
    async with GuestAgentClient(fake_agent.path, name="VM 5") as agent:
        with pytest.raises(GuestThawError) as info:
            async with frozen_window(agent, timeouts=FAST):
                fake_agent.silent = True  # the agent dies with the guest frozen
                fake_agent.kick()
                raise RuntimeError("job failed")
        message = str(info.value)
        assert message.startswith("guest agent of VM 5 (") and "may still be frozen" in message
        assert isinstance(info.value.__context__, RuntimeError)


async def test_thaw_impossible_when_socket_gone(fake_agent: FakeAgent) -> None:
    async with GuestAgentClient(fake_agent.path) as agent:
        with pytest.raises(GuestThawError, match="cannot connect"):
            async with frozen_window(agent, timeouts=FAST):
                await fake_agent.stop()
                os.unlink(fake_agent.path)


async def test_already_frozen_is_thawed_first_then_frozen(fake_agent: FakeAgent) -> None:
    """A frozen guest at the start is what a killed run left: thaw, then freeze as usual."""
    fake_agent.frozen = True
    async with GuestAgentClient(fake_agent.path) as agent:
        async with frozen_window(agent, timeouts=FAST) as outcome:
            assert outcome.thawed_first and outcome.frozen and fake_agent.frozen
        assert not fake_agent.frozen and outcome.thawed
    commands = [c for c in fake_agent.received if c.startswith("guest-fsfreeze-") and c != "guest-fsfreeze-status"]
    assert commands == ["guest-fsfreeze-thaw", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


async def test_already_frozen_that_cannot_be_thawed_fails_loudly(fake_agent: FakeAgent) -> None:
    fake_agent.frozen = True
    fake_agent.errors["guest-fsfreeze-thaw"] = ("GenericError", "thaw refused")
    async with GuestAgentClient(fake_agent.path) as agent:
        with pytest.raises(GuestThawError, match="may still be frozen"):
            async with frozen_window(agent, timeouts=FAST):
                pytest.fail("the block must not run")


async def test_undo_step_thaws_only_a_frozen_guest(fake_agent: FakeAgent) -> None:
    said: list[str] = []
    undo = undo_steps(None, say=said.append)[FREEZE.name]
    entry = Entry(1, FREEZE.name, {"qga": fake_agent.path, "vm": "VM 3"})
    await undo(entry)
    assert said == [] and "guest-fsfreeze-thaw" not in fake_agent.received
    fake_agent.frozen = True
    await undo(entry)
    assert not fake_agent.frozen and len(said) == 1 and "thawed" in said[0]


async def test_undo_step_when_qemu_is_gone(short_dir: Path) -> None:
    """No socket, or a socket file nobody listens on: the freeze went with its QEMU."""
    assert await thaw_left_frozen(str(short_dir / "missing.sock"), "VM 4") == 0
    stale = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    assert await thaw_left_frozen(str(stale), "VM 4") == 0


async def test_undo_step_keeps_the_record_when_the_agent_is_silent(fake_agent: FakeAgent) -> None:
    fake_agent.silent = True  # a paused VM: the guest may still be frozen
    with pytest.raises(GuestAgentUnavailableError):
        await thaw_left_frozen(fake_agent.path, "VM 5", timeouts=FAST)


async def test_no_agent_skips_or_raises(fake_agent: FakeAgent) -> None:
    fake_agent.silent = True
    agent = GuestAgentClient(fake_agent.path, name="VM 8")
    started = time.monotonic()
    async with frozen_window(agent, timeouts=FAST) as outcome:
        assert not outcome.frozen
        assert outcome.skipped is not None
        assert outcome.skipped.startswith("agent configured but not running?")
    with pytest.raises(GuestFreezeError, match="VM 8 .*: cannot freeze: agent configured"):
        async with frozen_window(agent, timeouts=FAST, strict=True):
            pass
    assert time.monotonic() - started < 2.5


async def test_cancel_during_freeze_with_a_failing_thaw_stays_a_cancel(
        fake_agent: FakeAgent, caplog: pytest.LogCaptureFixture) -> None:
    fake_agent.delays["guest-fsfreeze-freeze"] = 0.3
    fake_agent.errors["guest-fsfreeze-thaw"] = ("GenericError", "thaw broke")
    async with GuestAgentClient(fake_agent.path) as agent:
        async def job() -> None:
            async with frozen_window(agent, timeouts=FAST):
                raise AssertionError("the block must not run")

        task = asyncio.create_task(job())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert any(r.levelname == "CRITICAL" and "may still be frozen" in r.getMessage()
               for r in caplog.records)
