"""``qmpbackup export ARCHIVE``: serve an archive's devices read-only over NBD.

One export per device, named as in the archive (``drive-scsi0``), on a unix socket. Runs in
the foreground until SIGINT/SIGTERM; ``--daemon`` returns once the socket listens and leaves
a pid file and a journal entry (``<state-dir>/host/``) so that ``qmpbackup cleanup`` can end it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qmpbackup.atomic_file import replace_file
from qmpbackup.recovery.state import DEFAULT_STATE_DIR
from qmpbackup.cli.common import Context
from qmpbackup.errors import EXIT_FAILED, UsageError
from qmpbackup.recovery.journal import Journal, JournalError
from qmpbackup.mount.export_service import describe, detach_stdio, serve_forever
from qmpbackup.mount.host_journal import KIND_EXPORT_DAEMON, export_journal_path
from qmpbackup.nbd import ExportSource
from qmpbackup.mount.host_journal import runtime_dir
from qmpbackup.recovery.spawned import process_create_time
from qmpbackup.vma.random_access import ArchiveDevices

log = logging.getLogger(__name__)

READY = b"ready\n"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "export", parents=[common], help="serve an archive's devices read-only over NBD",
        description="Serve every device of ARCHIVE as a read-only NBD export named as in the "
                    "archive (e.g. drive-scsi0) on a unix socket. Needs the archive's index "
                    "(qmpbackup index ARCHIVE builds one).")
    p.add_argument("archive", type=Path, metavar="ARCHIVE")
    p.add_argument("--socket", type=Path, metavar="PATH",
                   help="the unix socket (default: <runtime dir>/export/<archive name>.sock)")
    p.add_argument("--daemon", action="store_true",
                   help="run in the background once the socket listens; 'qmpbackup cleanup' ends it")
    p.add_argument("--pidfile", type=Path, metavar="PATH",
                   help="with --daemon: the pid file (default: the socket path + .pid)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"with --daemon: where its journal lives (default {DEFAULT_STATE_DIR})")
    # qmpbackup mount journals the daemon it starts itself.
    p.add_argument("--no-journal", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def default_socket(archive: Path) -> Path:
    return runtime_dir() / "export" / f"{archive.name}.sock"


@contextmanager
def open_archive(archive: Path) -> Iterator[list[tuple[str, ExportSource]]]:
    """The archive's devices as export sources, read through its index (frames cached there)."""
    if not archive.is_file():
        raise UsageError(f"{archive}: no such archive")
    with ArchiveDevices.open(archive) as devices:
        yield [(d.name, d) for d in devices.devices]


def run(args: argparse.Namespace, ctx: Context) -> int | Awaitable[int]:
    archive: Path = args.archive
    socket_path: Path = (args.socket or default_socket(archive)).absolute()
    if not args.daemon:
        return _serve(archive, socket_path, announce=True)
    pidfile: Path = (args.pidfile or socket_path.with_name(socket_path.name + ".pid")).absolute()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read()
        if answer != READY:
            os.waitpid(pid, 0)
            return EXIT_FAILED  # the daemon said why on our stderr
        return 0
    os.close(read_end)
    os.setsid()
    return _daemon(archive, socket_path, pidfile, write_end, None if args.no_journal else args.state_dir)


async def _serve(archive: Path, socket_path: Path, *, announce: bool,
                 ready_fd: int | None = None, pidfile: Path | None = None) -> int:
    def ready() -> None:
        if announce:
            for line in describe(sources, socket_path):
                sys.stdout.write(f"{line}\n")
            sys.stdout.flush()
        if pidfile is not None:
            _write_pidfile(pidfile)
        if ready_fd is not None:
            detach_stdio()
            os.write(ready_fd, READY)
            os.close(ready_fd)

    with open_archive(archive) as sources:
        await serve_forever(sources, socket_path, ready)
    return 0


async def _daemon(archive: Path, socket_path: Path, pidfile: Path, ready_fd: int,
                  state_dir: Path | None) -> int:
    journal_path = export_journal_path(state_dir, os.getpid()) if state_dir is not None else None
    if journal_path is not None:
        with Journal.open(journal_path) as journal:
            journal.record(KIND_EXPORT_DAEMON, pid=os.getpid(), create_time=process_create_time(os.getpid()),
                           socket=str(socket_path), pidfile=str(pidfile))
    try:
        return await _serve(archive, socket_path, announce=True, ready_fd=ready_fd, pidfile=pidfile)
    finally:
        pidfile.unlink(missing_ok=True)
        if journal_path is not None:
            _resolve_all(journal_path)


def _write_pidfile(path: Path) -> None:
    replace_file(path, f"{os.getpid()}\n")


def _resolve_all(path: Path) -> None:
    """Our own entry is done; when ``cleanup`` holds the journal (it is ending us), it resolves."""
    try:
        with Journal.open(path) as journal:
            for entry in journal.pending():
                journal.resolve(entry)
    except JournalError as exc:
        log.debug("leaving the journal to its holder: %s", exc)
