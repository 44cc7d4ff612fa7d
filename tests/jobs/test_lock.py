"""The host lock with real processes: exclusion, waiting, timeout, pid file, --stop."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpbackup.jobs.lock import HostLock, LockTimeoutError, read_pid, stop_running_job

HOLDER = """
import signal, sys, time
from pathlib import Path
from qmpbackup.jobs.lock import HostLock
lock = HostLock(Path(sys.argv[1]))
lock.acquire(5)
def stop(signum, frame):
    (Path(sys.argv[1]) / "cleanup-ran").write_text("yes")
    lock.release()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield run_dir, proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_timeout_then_wait_succeeds(holder: tuple[Path, subprocess.Popen[str]],
                                    caplog: pytest.LogCaptureFixture) -> None:
    run_dir, proc = holder
    caplog.set_level(logging.INFO)
    assert read_pid(run_dir / "backup.pid") == proc.pid
    lock = HostLock(run_dir)
    with pytest.raises(LockTimeoutError, match="got timeout"):
        lock.acquire(0.2)
    assert not lock.held
    start = time.monotonic()
    lock.acquire(10)  # the holder lets go after 1.5 s
    with lock:
        assert time.monotonic() - start < 9
        assert read_pid(run_dir / "backup.pid") == os.getpid()
        assert "waiting" in caplog.text
    assert not (run_dir / "backup.pid").exists()
    lock.release()  # twice is fine


async def test_async_wait_is_cancellable(holder: tuple[Path, subprocess.Popen[str]]) -> None:
    run_dir, _ = holder
    lock = HostLock(run_dir)
    task = asyncio.create_task(lock.acquire_async(60))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not lock.held


def test_stop_running_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        assert stop_running_job(run_dir, wait_s=10) == proc.pid
        assert proc.wait(timeout=10) == 0
        assert (run_dir / "cleanup-ran").read_text() == "yes"
        assert stop_running_job(run_dir) is None
        lock = HostLock(run_dir)
        lock.acquire(0)
        lock.release()
    finally:
        proc.kill()
        proc.wait(timeout=10)
