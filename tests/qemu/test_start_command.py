"""The one way to run a VM's start command and to tell whether a QEMU listens on its QMP socket.

Real processes and real Unix sockets; the "QEMU" is a listening socket of the test's own.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpbackup.qemu.start_command import QmpSocketUnclear, StartFailed, qmp_accepts, run_start_command


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen(0)
        yield path, srv


def test_a_listening_socket_accepts_and_a_stale_or_missing_one_does_not(
        tmp_path: Path, listener: tuple[Path, socket.socket]) -> None:
    path, srv = listener
    assert qmp_accepts(path)
    srv.close()  # the socket file a killed QEMU leaves behind
    assert path.exists() and not qmp_accepts(path)
    assert not qmp_accepts(tmp_path / "missing.sock")
    (tmp_path / "file").write_text("")
    assert not qmp_accepts(tmp_path / "file")
    assert not qmp_accepts(tmp_path / "file" / "below.sock")


def test_a_qemu_busy_with_other_clients_counts_as_running(listener: tuple[Path, socket.socket]) -> None:
    """The bug this replaced: a full backlog (EAGAIN) read as "not running", so stop mode and cleanup
    would have run the start command of a VM that runs."""
    path, _ = listener
    waiting: list[socket.socket] = []
    try:
        while True:  # fill the backlog, as QMP clients that QEMU has not accepted yet do
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            try:
                client.connect(str(path))
            except BlockingIOError:
                client.close()
                break
            waiting.append(client)
        assert qmp_accepts(path)
    finally:
        for client in waiting:
            client.close()


def test_what_cannot_be_told_is_an_error_not_a_guess(tmp_path: Path) -> None:
    with pytest.raises(QmpSocketUnclear, match="cannot tell whether a QEMU listens"):
        qmp_accepts(tmp_path / ("x" * 120))  # longer than a Unix socket address


async def test_the_start_command_runs_in_a_session_of_its_own_with_output_merged() -> None:
    out = await run_start_command(7, [sys.executable, "-c",
                                      "import os, sys; print(os.getsid(0)); print('err', file=sys.stderr)"])
    sid, err = out.split()
    assert int(sid) != os.getsid(0) and err == "err"


async def test_a_failing_start_command_is_one_line() -> None:
    with pytest.raises(StartFailed) as failed:
        await run_start_command(7, ["sh", "-c", "echo first; echo 'no such disk' >&2; exit 3"])
    assert str(failed.value) == "the start command of VM 7 failed with exit status 3: no such disk"
    with pytest.raises(StartFailed, match=r"^cannot run the start command of VM 7 \(/nonexistent/start\): "):
        await run_start_command(7, ["/nonexistent/start"])
    with pytest.raises(StartFailed, match="^the start command of VM 7 did not end within 0.2 s$"):
        await run_start_command(7, ["sleep", "60"], timeout=0.2)
