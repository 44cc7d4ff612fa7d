"""The scheduler: due-job decisions, start-up rules, state file, one-at-a-time runs, child processes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from qmpbackup.jobs.jobs_cfg import BackupJob, parse_jobs_cfg
from qmpbackup.jobs.scheduler import (
    JobState,
    Scheduler,
    SchedulerError,
    due_jobs,
    load_state,
    save_state,
    spawn_job,
    startup_state,
    sync_state,
)

UTC = timezone.utc
JOBS = """\
vzdump: nightly
\tschedule 21:00
\tall 1

vzdump: catchup
\tschedule 21:00
\tall 1
\trepeat-missed 1

vzdump: off
\tschedule *:*
\tall 1
\tenabled 0
"""


def at(day: int, hour: int, minute: int = 0) -> int:
    return int(datetime(2024, 5, day, hour, minute, tzinfo=UTC).timestamp())


def jobs() -> list[BackupJob]:
    return parse_jobs_cfg(JOBS, "jobs.cfg")


def ids(js: list[BackupJob]) -> list[str]:
    return [j.id for j in js]


def test_due_jobs() -> None:
    state = {j.id: JobState(at(1, 12)) for j in jobs()}
    assert due_jobs(jobs(), state, at(1, 20, 59), UTC) == []
    assert ids(due_jobs(jobs(), state, at(1, 21), UTC)) == ["catchup", "nightly"]  # never the disabled one
    state = {**state, "nightly": JobState(at(1, 21))}
    assert ids(due_jobs(jobs(), state, at(1, 21, 5), UTC)) == ["catchup"]


def test_startup_drops_missed_runs_unless_repeat_missed() -> None:
    old = {"nightly": JobState(at(1, 21)), "catchup": JobState(at(1, 21))}
    now = at(4, 10)  # three 21:00 events were missed while down
    state = startup_state(jobs(), old, now)
    assert state["nightly"].last_run == now and state["off"].last_run == now
    assert ids(due_jobs(jobs(), state, now, UTC)) == ["catchup"]  # caught up once, not three times


def test_clock_jumps() -> None:
    state = {"nightly": JobState(at(10, 21)), "catchup": JobState(at(10, 21))}
    now = at(5, 12)  # the clock went back five days
    assert startup_state(jobs(), state, now)["catchup"].last_run == now
    synced = sync_state(jobs(), state, now)
    assert synced["nightly"].last_run == now and "off" in synced
    assert ids(due_jobs(jobs(), synced, at(5, 21), UTC)) == ["catchup", "nightly"]


def test_state_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state" / "scheduler-state.json"
    assert load_state(path) == {}
    state = {"a": JobState(5, 9, "ok"), "b": JobState(7)}
    save_state(path, state)
    assert load_state(path) == state
    assert json.loads(path.read_text())["version"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["scheduler-state.json"]
    path.write_text("{not json")
    with pytest.raises(SchedulerError, match="scheduler-state.json"):
        load_state(path)


class FakeClock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


async def test_scheduler_runs_one_at_a_time_and_survives_restart(tmp_path: Path, isolated_config: Path) -> None:
    (isolated_config / "jobs.cfg").write_text(JOBS)
    state_path = tmp_path / "state.json"
    clock = FakeClock(at(1, 20))
    running: list[str] = []
    finished: list[str] = []

    async def run_job(job: BackupJob) -> int:
        assert not running, "two jobs at once"
        running.append(job.id)
        clock.now += 600  # the job takes ten minutes
        await asyncio.sleep(0)
        running.pop()
        finished.append(job.id)
        return 0 if job.id == "nightly" else 1

    s = Scheduler(isolated_config, state_path, run_job, clock=clock, tz=UTC)
    s.start()
    assert await s.tick() == []
    clock.now = at(1, 21)
    assert await s.tick() == ["catchup", "nightly"]
    assert finished == ["catchup", "nightly"]
    saved = load_state(state_path)
    assert saved["catchup"] == JobState(at(1, 21), at(1, 21, 10), "exit 1")
    assert saved["nightly"] == JobState(at(1, 21, 10), at(1, 21, 20), "ok")
    assert await s.tick() == []
    # restart after missing two days: only the repeat-missed job catches up (once)
    clock.now = at(3, 22)
    s2 = Scheduler(isolated_config, state_path, run_job, clock=clock, tz=UTC)
    s2.start()
    assert await s2.tick() == ["catchup"]
    # a broken jobs.cfg keeps the previous job list
    (isolated_config / "jobs.cfg").write_text("vzdump: x\n\tschedule nonsense\n\tall 1\n")
    clock.now = at(4, 21)
    assert await s2.tick() == ["catchup", "nightly"]


async def test_spawn_job_status_and_cancel(tmp_path: Path) -> None:
    assert await spawn_job([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    marker = tmp_path / "terminated"
    code = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text('x'), sys.exit(0)))\n"
        "print('up', flush=True)\n"
        "time.sleep(30)\n"
    )
    task = asyncio.create_task(spawn_job([sys.executable, "-c", code]))
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert marker.exists()  # the job got SIGTERM and its cleanup ran
    assert await spawn_job([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5) == 1


def test_scheduler_command_stops_on_sigterm(tmp_path: Path, isolated_config: Path) -> None:
    (isolated_config / "jobs.cfg").write_text(JOBS)
    state_dir = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpbackup.cli.main", "scheduler", "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (state_dir / "scheduler-state.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (state_dir / "scheduler-state.json").exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err
        assert set(load_state(state_dir / "scheduler-state.json")) == {"nightly", "catchup", "off"}
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_jobs_for_other_nodes_are_skipped(tmp_path: Path, isolated_config: Path) -> None:
    (isolated_config / "jobs.cfg").write_text(
        "vzdump: here\n\tschedule 21:00\n\tall 1\n\tnode pve1\n\n"
        "vzdump: there\n\tschedule 21:00\n\tall 1\n\tnode pve2\n")
    clock = FakeClock(at(1, 20))

    async def run_job(job: BackupJob) -> int:
        return 0

    s = Scheduler(isolated_config, tmp_path / "state.json", run_job, clock=clock, tz=UTC, node="pve1")
    s.start()
    clock.now = at(1, 21)
    assert await s.tick() == ["here"]


def test_service_unit_treats_sigterm_as_success_and_runs_the_installed_command() -> None:
    """The unit's ExecStart is where README's install step puts qmpbackup; a stop (143) is not a failure."""
    root = Path(__file__).resolve().parents[2]
    unit = (root / "contrib" / "qmpbackup-scheduler.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert "143" in settings["SuccessExitStatus"].split()
    program = settings["ExecStart"].split()[0]
    readme = (root / "README.md").read_text()
    assert f'ln -sf "$PWD/.venv/bin/qmpbackup" {program}' in readme
