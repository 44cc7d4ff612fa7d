"""Find or start the daemon of an archive, and talk to it.

The daemon's folder is keyed by the archive's path, inode, size and modification time, so a
rewritten archive (same name, new backup) never gets the old helper's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from qmpbackup.errors import QmpBackupError, UsageError
from qmpbackup.file_restore.channel import end_status, read_frame
from qmpbackup.file_restore.wire import END, request_line
from qmpbackup.recovery.spawned import stop_process

START_TIMEOUT_S = 300.0
FOLDER = "file-restore"


class FileRestoreError(QmpBackupError):
    """A file-restore request failed; the message names the path."""


@dataclass(frozen=True)
class DaemonOptions:
    image: Path
    accel: str = "tcg"
    memory_mb: int = 256
    idle_timeout: float = 600.0
    qemu: str = "qemu-system-x86_64"


def daemon_folder(run_dir: Path, archive: Path) -> Path:
    try:
        st = archive.stat()
    except OSError as exc:
        raise UsageError(f"{archive}: {exc.strerror}") from None
    ident = f"{archive.resolve()}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return run_dir / FOLDER / hashlib.sha256(ident.encode()).hexdigest()[:16]


def _alive(folder: Path) -> int | None:
    try:
        pid = int((folder / "pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


async def ensure_daemon(archive: Path, run_dir: Path, opts: DaemonOptions) -> Path:
    """The control socket of a running daemon for ``archive``, started when there is none."""
    folder = daemon_folder(run_dir, archive)
    (run_dir / FOLDER).mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(run_dir / FOLDER / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _alive(folder) is not None and await _status(folder / "control.sock") is not None:
            return folder / "control.sock"
        if folder.exists():
            await stop_folder(folder)
        folder.mkdir(mode=0o700)
        log = open(folder / "daemon.log", "wb")
        cmd = [sys.executable, "-m", "qmpbackup.file_restore.daemon", "--archive", str(archive.resolve()),
               "--folder", str(folder), "--image", str(opts.image), "--accel", opts.accel,
               "--memory-mb", str(opts.memory_mb), "--idle-timeout", str(opts.idle_timeout), "--qemu", opts.qemu]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FileRestoreError(f"the file-restore helper did not start: {_last_line(folder, proc)}")
            if await _status(folder / "control.sock") is not None:
                return folder / "control.sock"
            await asyncio.sleep(0.1)
        await stop_folder(folder)
        raise FileRestoreError(f"the file-restore helper did not start within {START_TIMEOUT_S:.0f} s")


def _last_line(folder: Path, proc: subprocess.Popen[bytes]) -> str:
    try:
        lines = (folder / "daemon.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    lines = [line.removeprefix("ERROR: ") for line in lines if line.strip()]
    shutil.rmtree(folder, ignore_errors=True)
    return lines[-1] if lines else f"exit status {proc.returncode}"


async def _status(sock: Path) -> dict[str, Any] | None:
    try:
        async with contextlib.aclosing(request(sock, {"op": "status"}, timeout=5)) as frames:
            async for kind, payload in frames:
                if kind == END:
                    return end_status(payload)
    except (OSError, FileRestoreError):
        return None
    return None


async def request(sock: Path, req: dict[str, Any], timeout: float = 600.0) -> AsyncGenerator[tuple[bytes, bytes], None]:
    """Frames of the daemon's answer, ``E`` last."""
    reader, writer = await asyncio.open_unix_connection(str(sock), limit=1 << 23)
    try:
        writer.write(request_line(req))
        await writer.drain()
        while True:
            kind, payload = await read_frame(reader, timeout, FileRestoreError, "the file-restore helper")
            yield kind, payload
            if kind == END:
                return
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def stop_folder(folder: Path) -> bool:
    """End the daemon of ``folder`` (and its QEMU, should the daemon be gone); True if one ran."""
    ran = False
    for name in ("pid", "qemu.pid"):
        try:
            pid = int((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if psutil.pid_exists(pid):
            ran = True
            await stop_process(pid, None, timeout=5.0)
    shutil.rmtree(folder, ignore_errors=True)
    return ran


async def stop_all(run_dir: Path) -> list[str]:
    """End every file-restore daemon under ``run_dir`` (``qmpbackup cleanup``); their folders' names."""
    base = run_dir / FOLDER
    stopped = []
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        if folder.is_dir():
            await stop_folder(folder)
            stopped.append(folder.name)
    return stopped


def check_end(payload: bytes) -> dict[str, Any]:
    """The end frame's status; its error as a FileRestoreError."""
    status = end_status(payload)
    if "error" in status:
        raise FileRestoreError(str(status["error"]))
    return status

