"""Records of the QEMU processes we spawned, so that none outlives us.

Each spawned QEMU gets a small JSON file in ``<state-dir>/spawned`` naming its pid and
start time and ours (docs/format.md, "Spawned-QEMU records"). Normally the spawner deletes
the record when it stops QEMU. If we were killed with SIGKILL, nothing ran: the next run
calls :func:`kill_orphans`, which kills every recorded QEMU whose owner is gone —
after checking that the pid still belongs to the same process (its create time), so a
recycled pid is never killed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from qmpbackup.atomic_file import replace_file
from qmpbackup.recovery.state import spawn_records_dir

log = logging.getLogger(__name__)

#: A pid's create time as psutil computes it is stable to the clock tick; allow a little.
CREATE_TIME_SLACK_S = 0.05


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One spawned QEMU: its identity and its owner's."""

    vmid: int
    pid: int
    create_time: float
    owner_pid: int
    owner_create_time: float
    rundir: str

    @property
    def file_name(self) -> str:
        return f"qemu-{self.vmid}-{self.pid}.json"

    def as_record(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in RECORD_KEYS}

    @classmethod
    def from_record(cls, data: Any) -> ProcessRecord:
        """The record in a file, checked key by key (docs/format.md); ValueError names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for key, typ in RECORD_KEYS.items():
            value = data.get(key)
            ok = isinstance(value, (int, float) if typ is float else typ) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"key {key!r} missing or not {typ.__name__}")
        return cls(vmid=data["vmid"], pid=data["pid"], create_time=float(data["create_time"]),
                   owner_pid=data["owner_pid"], owner_create_time=float(data["owner_create_time"]),
                   rundir=data["rundir"])


#: The keys of a record file and their types (docs/format.md, "Spawned-QEMU records").
RECORD_KEYS: dict[str, type] = {"vmid": int, "pid": int, "create_time": float, "owner_pid": int,
                                "owner_create_time": float, "rundir": str}


def process_create_time(pid: int) -> float | None:
    """The start time of ``pid``, or None if there is no such (live) process."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def same_process(pid: int, create_time: float) -> bool:
    now = process_create_time(pid)
    return now is not None and abs(now - create_time) <= CREATE_TIME_SLACK_S


def write_record(state_dir: Path, record: ProcessRecord) -> Path:
    """Store ``record`` atomically (write, fsync, rename) in a 0700 directory."""
    directory = spawn_records_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / record.file_name
    replace_file(path, json.dumps(record.as_record()))
    return path


def remove_record(state_dir: Path, record: ProcessRecord) -> None:
    try:
        (spawn_records_dir(state_dir) / record.file_name).unlink()
    except FileNotFoundError:
        pass


def read_records(state_dir: Path) -> list[ProcessRecord]:
    """Every readable record; unreadable ones are logged and deleted."""
    out: list[ProcessRecord] = []
    directory = spawn_records_dir(state_dir)
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("qemu-*.json")):
        try:
            out.append(ProcessRecord.from_record(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as e:
            log.warning("dropping unreadable spawn record %s: %s", path, e)
            path.unlink(missing_ok=True)
    return out


def kill_orphans(state_dir: Path, timeout_s: float = 10.0, *, vmid: int | None = None) -> list[ProcessRecord]:
    """Kill every recorded QEMU (``vmid``: of that VM) whose owner process is gone; return what was
    cleaned up.

    Records of live owners (another run of ours) are left alone. A record whose QEMU
    is already gone (or whose pid now belongs to another process) is only deleted.
    """
    cleaned: list[ProcessRecord] = []
    for rec in read_records(state_dir):
        if (vmid is not None and rec.vmid != vmid) or same_process(rec.owner_pid, rec.owner_create_time):
            continue
        if same_process(rec.pid, rec.create_time):
            log.warning("killing QEMU pid %d of VM %d left behind by run pid %d", rec.pid, rec.vmid, rec.owner_pid)
            if not kill_and_wait(rec.pid, timeout_s):
                log.error("QEMU pid %d of VM %d did not die within %g s", rec.pid, rec.vmid, timeout_s)
                continue
        remove_rundir(Path(rec.rundir))
        remove_record(state_dir, rec)
        cleaned.append(rec)
    return cleaned


def kill_and_wait(pid: int, timeout_s: float) -> bool:
    """SIGKILL ``pid`` (not our child) and wait until it is gone or a zombie."""
    try:
        proc = psutil.Process(pid)
        proc.kill()
    except psutil.NoSuchProcess:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False


async def stop_process(pid: int, create_time: float | None, timeout: float = 10.0) -> None:
    """SIGTERM ``pid`` (with ``create_time``: only while it is still that process), SIGKILL after
    ``timeout``, and return once it has ended (see :func:`_ended`)."""
    if create_time is not None and not same_process(pid, create_time):
        return
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
    except psutil.Error:
        return
    if await _ended(proc, timeout):
        return
    log.warning("process %d did not end within %g s of SIGTERM; killing it", pid, timeout)
    try:
        proc.kill()
    except psutil.Error:
        return
    await _ended(proc, timeout)


async def _ended(proc: psutil.Process, timeout: float) -> bool:
    """Gone, or a zombie that only we could reap (its parent reaps any other zombie soon)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE and proc.ppid() == os.getpid():
                return True
        except psutil.Error:
            return True
        await asyncio.sleep(0.05)
    return False


def remove_rundir(rundir: Path) -> None:
    """Delete one of our private runtime dirs (only if it looks like ours)."""
    if rundir.name.startswith("qmpbackup-") and rundir.is_dir():
        shutil.rmtree(rundir, ignore_errors=True)
