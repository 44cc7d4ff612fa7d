"""The job scheduler: runs due jobs from jobs.cfg one at a time, as pvescheduler does.

Every minute, a job is due when ``now >= next_event(schedule, last_run)``.
``last_run`` is the start time of the job's last run, kept in a state file
written atomically so the scheduler survives restarts. A job never run before
counts from when the scheduler first saw it. At start-up, jobs without
``repeat-missed`` forget runs missed while the scheduler was down; with it,
one missed run is caught up. If the clock went backwards, a ``last_run`` in the
future is pulled back to now so the job does not stall.

The decision (:func:`due_jobs`, :func:`startup_state`) is pure; the loop and the
state file are thin around it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import tzinfo
from pathlib import Path

from qmpbackup.atomic_file import replace_file
from qmpbackup.errors import ConfigError, QmpBackupError
from qmpbackup.jobs.calendar import next_event
from qmpbackup.jobs.jobs_cfg import BackupJob, load_jobs_cfg

log = logging.getLogger(__name__)

STATE_FILE = "scheduler-state.json"
STATE_VERSION = 1
TICK_S = 60
CLOCK_SLACK_S = 60


class SchedulerError(QmpBackupError):
    """The state file cannot be read or written."""


@dataclass(frozen=True, slots=True)
class JobState:
    """What the scheduler remembers about one job (Unix seconds)."""

    last_run: int  # start of the last run, or when the job was first seen
    last_end: int | None = None
    last_status: str | None = None  # "ok", "error" or "exit N"


State = Mapping[str, JobState]


def startup_state(jobs: Sequence[BackupJob], state: State, now: int) -> dict[str, JobState]:
    """The state to start with: new jobs start counting now; missed runs are dropped
    unless ``repeat-missed`` is set; a last run in the future (clock went back) becomes now."""
    result: dict[str, JobState] = {}
    for job in jobs:
        old = state.get(job.id)
        if old is None:
            result[job.id] = JobState(last_run=now)
        elif not job.repeat_missed or old.last_run > now + CLOCK_SLACK_S:
            result[job.id] = replace(old, last_run=now)
        else:
            result[job.id] = old
    return result


def next_run(job: BackupJob, state: State, tz: tzinfo | None = None) -> int | None:
    """When the job should run next, from its last run (None: never)."""
    last = state.get(job.id)
    if last is None or not job.enabled:
        return None
    return next_event(job.schedule, last.last_run, tz)


def due_jobs(
    jobs: Sequence[BackupJob], state: State, now: int, tz: tzinfo | None = None
) -> list[BackupJob]:
    """The enabled jobs whose next event is at or before ``now``, earliest first."""
    due: list[tuple[int, str, BackupJob]] = []
    for job in jobs:
        when = next_run(job, state, tz)
        if when is not None and when <= now:
            due.append((when, job.id, job))
    return [job for _, _, job in sorted(due, key=lambda item: (item[0], item[1]))]


def sync_state(jobs: Sequence[BackupJob], state: State, now: int) -> dict[str, JobState]:
    """Drop state of removed jobs, add jobs that appeared (they count from now), fix clock jumps."""
    result: dict[str, JobState] = {}
    for job in jobs:
        old = state.get(job.id)
        if old is None:
            result[job.id] = JobState(last_run=now)
        elif old.last_run > now + CLOCK_SLACK_S:
            log.warning("job %s: last run is in the future (clock went back); counting from now", job.id)
            result[job.id] = replace(old, last_run=now)
        else:
            result[job.id] = old
    return result


def for_this_node(job: BackupJob, node: str) -> bool:
    """A job with ``node`` set runs only on that node (as in a Proxmox cluster)."""
    wanted = job.settings.node
    return wanted is None or wanted == node


# -- state file ---------------------------------------------------------------------------------


def load_state(path: Path) -> dict[str, JobState]:
    """The saved state; a missing file is empty, a corrupt one is an error naming the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SchedulerError(f"cannot read scheduler state {path}: {exc}") from exc
    try:
        jobs = raw["jobs"]
        return {
            str(jid): JobState(int(v["last_run"]), v.get("last_end"), v.get("last_status"))
            for jid, v in jobs.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SchedulerError(f"scheduler state {path} is malformed: {exc!r}") from exc


def save_state(path: Path, state: State) -> None:
    """Write the state atomically: temp file, fsync, rename, fsync the directory."""
    data = {"version": STATE_VERSION, "jobs": {jid: asdict(s) for jid, s in sorted(state.items())}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, json.dumps(data, indent=1) + "\n")
    except OSError as exc:
        raise SchedulerError(f"cannot write scheduler state {path}: {exc.strerror}") from exc


# -- the loop -----------------------------------------------------------------------------------

JobRunner = Callable[[BackupJob], Awaitable[int]]


class Scheduler:
    """Runs due jobs one at a time; ``run_job`` returns the job's exit status."""

    def __init__(
        self,
        config_dir: Path,
        state_path: Path,
        run_job: JobRunner,
        *,
        clock: Callable[[], float] = time.time,
        tz: tzinfo | None = None,
        node: str | None = None,
    ) -> None:
        self.config_dir = config_dir
        self.state_path = state_path
        self.run_job = run_job
        self.clock = clock
        self.tz = tz
        self.node = node if node is not None else socket.gethostname().split(".")[0]
        self.jobs: list[BackupJob] = []
        self.state: dict[str, JobState] = {}

    def __repr__(self) -> str:
        return f"Scheduler({str(self.state_path)!r}, jobs={len(self.jobs)})"

    def _reload(self) -> None:
        try:
            jobs = load_jobs_cfg(self.config_dir)
        except ConfigError as exc:  # keep the previous jobs: a typo must not stop running jobs
            log.error("%s (keeping the previous job list)", exc)
            return
        self.jobs = [j for j in jobs if for_this_node(j, self.node)]

    def start(self) -> None:
        """Load jobs and state and apply the start-up rules (missed runs, clock)."""
        self._reload()
        now = int(self.clock())
        self.state = startup_state(self.jobs, load_state(self.state_path), now)
        save_state(self.state_path, self.state)
        for job in self.jobs:
            nxt = next_run(job, self.state, self.tz)
            log.info("job %s: next run %s", job.id, "never" if nxt is None else time.ctime(nxt))

    async def tick(self) -> list[str]:
        """One scheduling round: run every due job, one after the other. Returns their ids."""
        self._reload()
        now = int(self.clock())
        self.state = sync_state(self.jobs, self.state, now)
        ran = []
        for job in due_jobs(self.jobs, self.state, now, self.tz):
            started = int(self.clock())
            self.state[job.id] = JobState(last_run=started, last_status="running")
            save_state(self.state_path, self.state)
            log.info("starting job %s", job.id)
            try:
                status = await self.run_job(job)
            except QmpBackupError as exc:
                log.error("job %s failed: %s", job.id, exc)
                status = exc.exit_code
            text = "ok" if status == 0 else f"exit {status}"
            self.state[job.id] = JobState(last_run=started, last_end=int(self.clock()), last_status=text)
            save_state(self.state_path, self.state)
            log.info("job %s finished: %s", job.id, text)
            ran.append(job.id)
        return ran

    async def run_forever(self) -> None:
        """Tick at every minute boundary until cancelled."""
        self.start()
        while True:
            await self.tick()
            now = self.clock()
            await asyncio.sleep(min(TICK_S, max(1.0, TICK_S - now % TICK_S)))


JOB_TIMEOUT_S = 3 * 86400.0  # a run longer than this is hung: stop it
STOP_GRACE_S = 15.0  # as `vzdump --stop`: SIGTERM, then up to 15 s


def backup_command(job: BackupJob, config_dir: Path, state_dir: Path | None = None,
                   run_dir: Path | None = None) -> list[str]:
    """The command a job runs: ``qmpbackup backup --job-id ID`` (the backup reads the job's options)."""
    command = [sys.executable, "-m", "qmpbackup.cli.main", "--config-dir", str(config_dir), "backup",
               "--job-id", job.id]  # fmt: skip
    if state_dir is not None:
        command += ["--state-dir", str(state_dir)]
    if run_dir is not None:
        command += ["--run-dir", str(run_dir)]
    return command


async def spawn_job(command: Sequence[str], timeout_s: float = JOB_TIMEOUT_S) -> int:
    """Run one job as a child process and return its exit status.

    On cancellation or timeout the child gets SIGTERM (its cleanup runs), then SIGKILL after
    :data:`STOP_GRACE_S`.
    """
    proc = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(timeout_s):
            return await proc.wait()
    except TimeoutError:
        log.error("job command %s still running after %g s; stopping it", command[-1], timeout_s)
        await _stop(proc)
        return 1
    except BaseException:
        await _stop(proc)
        raise


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        async with asyncio.timeout(STOP_GRACE_S):
            await proc.wait()
            return
    except TimeoutError:
        pass
    proc.kill()
    try:
        async with asyncio.timeout(5):
            await proc.wait()
    except TimeoutError:
        log.warning("job process %d did not exit after SIGKILL", proc.pid)
