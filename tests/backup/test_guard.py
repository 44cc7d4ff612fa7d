"""The freeze guard process and ``guarded`` against the fake agent (fast); QMP against a real QEMU.

The real guest, killed backups and both QEMU versions are in tests/integration/test_freeze_guard.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qmpbackup.backup.guard import GUARD_PROGRAM, Guard, guarded
from qmpbackup.recovery.journal import Entry, Journal
from qmpbackup.recovery.kinds import FREEZE
from qmpbackup.recovery.steps import undo_steps
from qmpbackup.qemu.session import QmpSession
from tests.guest_agent.fake_agent import FakeAgent
from tests.support.qemu import QemuBinaries, RunningQemu, qemu, qemu_vm  # noqa: F401

pytestmark = pytest.mark.timeout(60)


async def _exit_of(guard: Guard, timeout: float = 10.0) -> int:
    return await asyncio.to_thread(guard.proc.wait, timeout)


async def test_done_leaves_everything_alone(fake_agent: FakeAgent) -> None:
    fake_agent.frozen = True
    guard = await Guard.start("VM 1", qga=fake_agent.path)
    assert os.getsid(guard.proc.pid) == guard.proc.pid, "the guard runs in its own session"
    await guard.release(done=True)
    assert guard.proc.returncode == 0
    assert fake_agent.connections == 0 and fake_agent.frozen


async def test_end_of_file_thaws(fake_agent: FakeAgent) -> None:
    fake_agent.frozen = True
    fake_agent.queue_stale(b'{"return": "frozen"}\n')  # a reply the dead run never read
    guard = await Guard.start("VM 2", qga=fake_agent.path)
    await guard.release(done=False)
    assert await _exit_of(guard) == 0
    assert not fake_agent.frozen
    assert fake_agent.received[-3:] == ["guest-fsfreeze-status", "guest-fsfreeze-thaw", "guest-fsfreeze-status"]


async def test_a_run_killed_while_its_freeze_command_runs_is_thawed(fake_agent: FakeAgent) -> None:
    """The agent finishes the freeze after the run is gone: the guard's sync waits for it, then thaws."""
    fake_agent.delays["guest-fsfreeze-freeze"] = 0.5
    guard = await Guard.start("VM 2b", qga=fake_agent.path)
    reader, writer = await asyncio.open_unix_connection(fake_agent.path)
    writer.write(b'{"execute":"guest-fsfreeze-freeze"}\n')
    await writer.drain()
    while "guest-fsfreeze-freeze" not in fake_agent.received:
        await asyncio.sleep(0.01)
    writer.close()  # the run dies with the freeze in flight
    await guard.release(done=False)
    assert await _exit_of(guard) == 0
    assert not fake_agent.frozen
    assert fake_agent.received[-2:] == ["guest-fsfreeze-thaw", "guest-fsfreeze-status"]


async def test_end_of_file_with_a_thawed_guest_does_nothing(fake_agent: FakeAgent) -> None:
    guard = await Guard.start("VM 3", qga=fake_agent.path)
    await guard.release(done=False)
    assert await _exit_of(guard) == 0
    assert "guest-fsfreeze-thaw" not in fake_agent.received


async def test_gives_up_within_its_bound_and_says_so(fake_agent: FakeAgent) -> None:
    fake_agent.silent = True
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", str(GUARD_PROGRAM), "--label", "VM 4", "--qga", fake_agent.path,
        "--act-for", "1.5", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = time.monotonic()
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 1 and time.monotonic() - started < 5
    assert b"the guest could not be thawed" in err and b"tried for 1.5 s" in err and b"by hand" in err


def test_socket_of_a_gone_qemu_ends_the_guard_at_once(short_dir: Path) -> None:
    run = subprocess.run([sys.executable, "-I", "-S", str(GUARD_PROGRAM), "--label", "VM 5",
                          "--qga", str(short_dir / "gone.sock")], stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=10, check=False)
    assert run.returncode == 0 and b"no QEMU behind it" in run.stderr


async def test_survives_a_kill_of_the_starting_process_group(fake_agent: FakeAgent, short_dir: Path) -> None:
    """The run and its process group die by SIGKILL; the guard (own session) thaws, then exits."""
    script = short_dir / "run.py"
    script.write_text(
        "import asyncio, time\n"
        "from qmpbackup.backup.guard import Guard\n"
        f"guard = asyncio.run(Guard.start('VM 6', qga={fake_agent.path!r}))\n"
        "print(guard.proc.pid, flush=True)\n"
        "time.sleep(60)\n")
    fake_agent.frozen = True
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=subprocess.PIPE,
                                                start_new_session=True)
    assert proc.stdout is not None
    guard_pid = int(await asyncio.wait_for(proc.stdout.readline(), 20))
    os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
    killed = time.monotonic()
    while fake_agent.frozen:
        assert time.monotonic() - killed < 5, "the guard did not thaw"
        await asyncio.sleep(0.01)
    while _alive(guard_pid):
        assert time.monotonic() - killed < 5, "the guard did not exit"
        await asyncio.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_guarded_resolves_and_releases_on_success(fake_agent: FakeAgent, short_dir: Path) -> None:
    journal = Journal.open(short_dir / "j.jsonl")
    undo = undo_steps(None)[FREEZE.name]
    async with guarded(journal, FREEZE, {"qga": fake_agent.path, "vm": "VM 7"}, undo, label="VM 7",
                       warn=pytest.fail, qga=fake_agent.path) as entry:
        assert [e.kind for e in journal.pending()] == [FREEZE.name]
        assert entry.data["qga"] == fake_agent.path
    assert journal.pending() == []
    journal.close()
    assert fake_agent.connections == 0


async def test_guarded_undoes_on_error_before_releasing(fake_agent: FakeAgent, short_dir: Path) -> None:
    journal = Journal.open(short_dir / "j.jsonl")
    calls: list[Entry] = []

    async def undo(entry: Entry) -> None:
        calls.append(entry)

    with pytest.raises(RuntimeError):
        async with guarded(journal, FREEZE, {"qga": fake_agent.path, "vm": "VM"}, undo, label="VM 8",
                           warn=pytest.fail, qga=fake_agent.path):
            raise RuntimeError("job start failed")
    assert len(calls) == 1 and journal.pending() == []
    journal.close()


async def test_guarded_keeps_the_record_when_the_undo_fails(fake_agent: FakeAgent, short_dir: Path) -> None:
    journal = Journal.open(short_dir / "j.jsonl")
    fake_agent.frozen = True

    async def undo(entry: Entry) -> None:
        raise OSError("agent gone")

    with pytest.raises(asyncio.CancelledError):
        async with guarded(journal, FREEZE, {"qga": fake_agent.path, "vm": "VM"}, undo, label="VM 9",
                           warn=pytest.fail, qga=fake_agent.path):
            raise asyncio.CancelledError()
    assert [e.kind for e in journal.pending()] == [FREEZE.name]
    journal.close()
    deadline = time.monotonic() + 10
    while fake_agent.frozen:  # the guard was let loose: it thaws
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_guard_resumes_a_vm_we_paused(qemu_vm: Callable[..., RunningQemu]) -> None:  # noqa: F811
    """Real QEMU (no guest, so no disks): stopped, then the guard sends cont."""
    vm = qemu_vm()
    async with QmpSession("10", vm.qmp_path) as session:
        await session.execute("cont")
        await session.execute("stop")
        guard = await Guard.start("VM 10", qmp=str(vm.qmp_path))
    await guard.release(done=False)  # our session is closed: QEMU accepts the guard
    assert await _exit_of(guard) == 0
    async with QmpSession("10", vm.qmp_path) as session:
        assert (await session.execute("query-status"))["status"] == "running"


async def test_a_signal_during_the_undo_lets_it_finish_then_ends_the_run(fake_agent: FakeAgent,
                                                                         short_dir: Path) -> None:
    journal = Journal.open(short_dir / "j.jsonl")
    undoing, undone = asyncio.Event(), asyncio.Event()

    async def undo(entry: Entry) -> None:
        undoing.set()
        await asyncio.sleep(0.3)
        undone.set()

    async def window() -> None:
        async with guarded(journal, FREEZE, {"qga": fake_agent.path, "vm": "VM"}, undo, label="VM 11",
                           warn=pytest.fail, qga=fake_agent.path):
            raise RuntimeError("job start failed")

    task = asyncio.create_task(window())
    await asyncio.wait_for(undoing.wait(), 10)
    while not task.done() and not undone.is_set():
        task.cancel()
        await asyncio.sleep(0.05)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone.is_set() and journal.pending() == []
    journal.close()


async def test_a_signal_while_the_guard_starts_leaves_no_guard(fake_agent: FakeAgent, short_dir: Path) -> None:
    journal = Journal.open(short_dir / "j.jsonl")
    undone: list[Entry] = []

    async def undo(entry: Entry) -> None:
        undone.append(entry)

    async def window() -> None:
        async with guarded(journal, FREEZE, {"qga": fake_agent.path, "vm": "VM"}, undo, label="VM 12",
                           warn=pytest.fail, qga=fake_agent.path):
            pytest.fail("the block must not run")

    task = asyncio.create_task(window())
    await asyncio.sleep(0)  # inside Guard.start
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(undone) == 1 and journal.pending() == []
    journal.close()
    await asyncio.sleep(0.2)
    assert fake_agent.connections == 0, "the guard was told done, not let loose"
