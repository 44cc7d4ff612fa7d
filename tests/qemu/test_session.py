"""QMP session against real QEMU: errors that say what happened, timeouts, events, HMP."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qmpbackup.errors import StateError
from qmpbackup.qemu.errors import (
    QmpCommandError,
    QmpConnectError,
    QmpDisconnectedError,
    QmpOutcomeUnknownError,
    QmpSocketBusyError,
    QmpTimeoutError,
)
from qmpbackup.qemu.session import QmpSession, SessionState
from tests.support.qemu import DriveSpec, RunningQemu

pytestmark = pytest.mark.qemu


async def test_states_and_command_error(qemu_vm: Callable[..., RunningQemu]) -> None:
    vm = qemu_vm()
    qmp = QmpSession("101", vm.qmp_path)
    assert qmp.state is SessionState.IDLE
    await qmp.connect()
    assert qmp.state.value == "connected" and "connected" in repr(qmp)
    status = await qmp.execute("query-status")
    assert status["status"] == "prelaunch"
    with pytest.raises(QmpCommandError) as e:
        await qmp.execute("blockdev-del", {"node-name": "nope"})
    assert e.value.command == "blockdev-del"
    assert e.value.arguments == {"node-name": "nope"}
    assert e.value.error_class == "GenericError"
    assert "nope" in e.value.desc and "VM 101" in str(e.value)
    with pytest.raises(QmpCommandError) as e:
        await qmp.execute("no-such-command")
    assert e.value.error_class == "CommandNotFound"
    with pytest.raises(StateError):
        await qmp.connect()
    await qmp.close()
    await qmp.close()  # twice is fine
    assert qmp.state.value == SessionState.CLOSED.value
    with pytest.raises(QmpDisconnectedError):
        await qmp.execute("query-status")


async def test_connect_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(QmpConnectError, match=r"does not exist \(is the VM running\?\)"):
        await QmpSession("102", tmp_path / "missing.sock").connect()
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, nobody listening
    with pytest.raises(QmpConnectError, match="refuses connections"):
        await QmpSession("102", stale).connect()
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(QmpConnectError, match="102"):
        await QmpSession("102", plain).connect()


async def test_permission_denied(qemu_vm: Callable[..., RunningQemu]) -> None:
    vm = qemu_vm()
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges in a child")
    # A child without permission on the socket's folder: run as nobody.
    os.chmod(vm.rundir, 0o700)
    pid = os.fork()
    if pid == 0:  # child: drop to nobody and try
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                asyncio.run(QmpSession("103", vm.qmp_path).connect())
            except QmpConnectError as e:
                os._exit(0 if "permission denied" in str(e) else 3)
            os._exit(2)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


async def test_busy_socket(qemu_vm: Callable[..., RunningQemu]) -> None:
    vm = qemu_vm()
    async with QmpSession("104", vm.qmp_path):
        second = QmpSession("104", vm.qmp_path)
        started = time.monotonic()
        with pytest.raises(QmpSocketBusyError, match=r"is busy \(another client is connected\?\)"):
            await second.connect(greeting_timeout=0.5)
        assert time.monotonic() - started < 3
        assert second.state is SessionState.CLOSED


async def test_timeout_names_command_and_vm(qemu_vm: Callable[..., RunningQemu]) -> None:
    vm = qemu_vm()
    async with QmpSession("105", vm.qmp_path) as qmp:
        os.kill(vm.pid, 19)  # SIGSTOP: QEMU stops answering
        try:
            with pytest.raises(QmpTimeoutError, match=r"query-status on VM 105 timed out after 0.3 s"):
                await qmp.execute("query-status", timeout=0.3)
        finally:
            os.kill(vm.pid, 18)  # SIGCONT
        # The late reply is dropped; the session still works.
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"


async def test_qemu_dies_mid_command(qemu_vm: Callable[..., RunningQemu]) -> None:
    vm = qemu_vm()
    async with QmpSession("106", vm.qmp_path) as qmp:
        os.kill(vm.pid, 19)
        task = asyncio.create_task(qmp.execute("query-status", timeout=10))
        await asyncio.sleep(0.1)
        vm.kill()
        with pytest.raises((QmpOutcomeUnknownError, QmpDisconnectedError)):
            await task


async def test_events_and_hmp_qemu_io(tmp_path: Path, qemu_vm: Callable[..., RunningQemu]) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    vm = qemu_vm([DriveSpec(disk, bus="scsi", dev_id="scsi0", drive_id="drive-scsi0")])
    async with QmpSession("107", vm.qmp_path) as qmp:
        async with qmp.events(["STOP", "RESUME"]) as ev:
            await qmp.execute("cont")
            resumed = await ev.wait_for(lambda e: e["event"] == "RESUME", timeout=5)
            assert resumed["event"] == "RESUME"
            with pytest.raises(QmpTimeoutError, match="STOP"):
                await ev.wait_for(lambda e: e["event"] == "STOP", timeout=0.2)
        await qmp.qemu_io("scsi0", "write -P 0xab 4096 4096")
        with pytest.raises(QmpCommandError, match="Error"):
            await qmp.qemu_io("nosuchdevice", "read 0 512")
        await qmp.execute("quit")
    assert disk.read_bytes()[4096:8192] == b"\xab" * 4096


async def test_commands_after_qemu_quit_say_disconnected(qemu_vm: Callable[..., RunningQemu]) -> None:
    vm = qemu_vm()
    async with QmpSession("108", vm.qmp_path) as qmp:
        async with qmp.events(["SHUTDOWN"]) as ev:
            await qmp.execute("quit")
            await ev.wait_for(lambda e: True, timeout=5)
            vm.proc.wait(10)
            with pytest.raises(QmpDisconnectedError):
                await ev.wait_for(lambda e: True, timeout=5)
        with pytest.raises(QmpDisconnectedError, match="108"):
            await qmp.execute("query-status")


async def test_fake_server_that_never_greets(tmp_path: Path) -> None:
    """The busy-socket case without QEMU: accepted, never greeted, bounded."""
    path = tmp_path / "silent.sock"
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_unix_server(hold, str(path))
    try:
        started = time.monotonic()
        with pytest.raises(QmpSocketBusyError) as e:
            await QmpSession("109", path).connect(greeting_timeout=0.3)
        assert e.value.path == str(path) and time.monotonic() - started < 2
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
