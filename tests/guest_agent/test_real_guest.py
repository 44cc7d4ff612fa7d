"""The client and the freeze window against real qemu-ga in the booted test guest (TCG).

Needs QEMU 7.2+ and the test guest image (scripts/build-test-guest; skipped
with the reason when it cannot be built). One guest boots per module; the
paused-QEMU test starts a second QEMU that never runs guest code.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
from typing import Any

import pytest

from qmpbackup.guest_agent import (
    FreezeStatus,
    FreezeTimeouts,
    GuestAgentUnavailableError,
    frozen_window,
)
from tests.support.guest import GuestFactory, GuestOptions, TestGuest, check_writer_image

pytestmark = [pytest.mark.guest, pytest.mark.qemu, pytest.mark.timeout(120)]

QUICK = FreezeTimeouts(ping_s=3, status_s=5, freeze_s=30, status_polls=2, status_poll_s=30,
                       thaw_s=30, reconnect_s=10)


async def test_info_and_fsinfo(guest: TestGuest) -> None:
    async with guest.agent() as agent:
        await agent.ping()
        info = await agent.info()
        enabled = {c["name"] for c in info["supported_commands"] if c["enabled"]}
        assert {"guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-get-fsinfo"} <= enabled
        fsinfo = await agent.get_fsinfo()
    data = [fs for fs in fsinfo if fs["mountpoint"] == "/mnt/data"]
    assert len(data) == 1, fsinfo
    assert data[0]["type"] == "ext4"
    assert [d["dev"] for d in data[0]["disk"]] == ["/dev/vda"]


async def test_freeze_blocks_the_writer_until_thaw(guest: TestGuest) -> None:
    """freeze → status frozen → the writer (seen on the serial console) stops → thaw → it runs."""
    before = await asyncio.to_thread(guest.wait_writer, guest.writer_seq() + 2)  # it is running
    async with guest.agent() as agent:
        async with frozen_window(agent, timeouts=QUICK) as outcome:
            assert outcome.frozen and outcome.filesystems == 1
            assert await agent.fsfreeze_status() is FreezeStatus.FROZEN
            await asyncio.sleep(0.3)  # an iteration in flight may still print its line
            seq_frozen = guest.writer_seq()
            await asyncio.sleep(1.5)
            assert guest.writer_seq() == seq_frozen, "the writer made progress while frozen"
        assert outcome.thawed
        assert await agent.fsfreeze_status() is FreezeStatus.THAWED
    assert seq_frozen >= before
    after = await asyncio.to_thread(guest.wait_writer, seq_frozen + 3, 20.0)
    assert after > seq_frozen + 3


async def test_plain_commands_and_frozen_state_rules(guest: TestGuest) -> None:
    async with guest.agent() as agent:
        assert await agent.fsfreeze_freeze() == 1
        try:
            assert await agent.fsfreeze_status() is FreezeStatus.FROZEN
            await agent.ping()  # allowed while frozen
        finally:
            assert await agent.fsfreeze_thaw() == 1
        assert await agent.fsfreeze_thaw() == 0  # idempotent
        assert await agent.fsfreeze_freeze(["/mnt/data"]) == 1
        assert await agent.fsfreeze_thaw() == 1


async def test_disconnect_while_frozen_is_not_a_thaw(guest: TestGuest) -> None:
    async with guest.agent() as agent:
        async with frozen_window(agent, timeouts=QUICK) as outcome:
            await agent.close()
            async with guest.agent() as other:  # a separate connection still sees "frozen"
                assert await other.fsfreeze_status() is FreezeStatus.FROZEN
        assert outcome.thawed
        assert await agent.fsfreeze_status() is FreezeStatus.THAWED


async def test_cancel_during_freeze_still_thaws(guest: TestGuest) -> None:
    async with guest.agent() as agent:
        freeze_sent = asyncio.Event()
        real_freeze = agent.fsfreeze_freeze

        async def freeze_and_tell(*args: Any, **kwargs: Any) -> int:
            freeze_sent.set()
            return await real_freeze(*args, **kwargs)

        agent.fsfreeze_freeze = freeze_and_tell  # type: ignore[method-assign]

        async def job() -> None:
            async with frozen_window(agent, timeouts=QUICK):
                await asyncio.sleep(60)

        task = asyncio.create_task(job())
        await freeze_sent.wait()
        await asyncio.sleep(0.01)  # the request is on its way; the agent needs ~50 ms to freeze
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await agent.fsfreeze_status() is FreezeStatus.THAWED
    seq = guest.writer_seq()
    await asyncio.to_thread(guest.wait_writer, seq + 2, 20.0)


async def test_stale_replies_from_a_vanished_client(guest: TestGuest,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A raw client sends requests and leaves without reading; our client must not see those replies."""
    caplog.set_level(logging.DEBUG, logger="qmpbackup.guest_agent")
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(guest.qga_path))
    raw.sendall(b'{"execute":"guest-info"}\n{"execute":"guest-get-fsinfo"}\n{"execute":"guest-ping"}\n'
                b'{"execute":"guest-sync-delimited","arguments":{"id":4242}}\n{"execute":"guest-pi')
    await asyncio.sleep(0.3)  # let the agent answer into the void
    raw.close()
    async with guest.agent() as agent:
        assert await agent.fsfreeze_status() is FreezeStatus.THAWED
        await agent.ping()
        assert "version" in await agent.info()
    skipped = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    # the replies to info, fsinfo, ping and sync 4242 came before the 0xFF of sync 4242 or after it
    assert any("4242" in m for m in skipped) or any("dropped" in m for m in skipped), skipped


async def test_socket_without_agent_fails_within_the_bound(guest_factory: GuestFactory,
                                                          qemu_programs: tuple[str, str]) -> None:
    """QEMU started with -S: the QGA chardev listens but no guest runs (also covers -drive + raw)."""
    paused = guest_factory.start(GuestOptions(qemu=qemu_programs[0], qemu_img=qemu_programs[1],
                                              paused=True, style="drive", data_format="raw",
                                              label="paused-vm", writer=False))
    agent = paused.agent("VM 999")
    started = time.monotonic()
    with pytest.raises(GuestAgentUnavailableError) as info:
        await agent.connect(timeout=2)
    assert time.monotonic() - started < 3
    assert str(info.value).startswith(f"guest agent of VM 999 ({paused.qga_path}): no answer to "
                                      "guest-sync-delimited within 2 s")
    async with frozen_window(agent, timeouts=FreezeTimeouts(ping_s=1)) as outcome:
        assert not outcome.frozen and outcome.skipped is not None
    assert time.monotonic() - started < 5
    assert paused.alive()


async def test_copy_taken_while_frozen_is_consistent(guest: TestGuest,
                                                     guest_factory: GuestFactory) -> None:
    """A copy made inside the window holds every iteration finished before the freeze, intact.

    The host check (fsck + blob hashes) and a boot of the copy with guest.verify=1 must agree.
    """
    await asyncio.to_thread(guest.wait_writer, guest.writer_seq() + 2)
    target = guest.workdir / "frozen-copy.qcow2"
    async with guest.agent() as agent:
        async with frozen_window(agent, timeouts=QUICK) as outcome:
            assert outcome.frozen
            await asyncio.sleep(0.3)
            seq_console = guest.writer_seq()
            await asyncio.to_thread(
                subprocess.run, ["qemu-img", "convert", "-U", "-O", "qcow2", str(guest.data_disk.path),
                                 str(target)], check=True, capture_output=True, timeout=60)
    check = await asyncio.to_thread(check_writer_image, target)
    assert check.ok, check
    assert check.seq in (seq_console, seq_console + 1)
    # the freeze may land between an iteration's new blob and its removal of the oldest one
    assert check.good in (min(check.seq, 32), min(check.seq + 1, 33))
    booted = await asyncio.to_thread(guest_factory.start, GuestOptions(
        qemu=guest.options.qemu, data_disk=target, writer=False, verify=True, label="verify-copy"))
    console = booted.console().decode()
    assert f"VERIFY OK n={check.good} seq={check.seq}" in console, console[-500:]
    async with booted.agent() as agent:
        await agent.shutdown()
    assert booted.proc is not None
    assert await asyncio.to_thread(booted.proc.wait, 20) == 0  # guest-shutdown powers QEMU off
