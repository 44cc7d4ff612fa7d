"""The crash-safe list of everything a run creates, so that nothing is ever left behind.

Every resource (QEMU node, filter, export, bitmap, fleecing image, spawned QEMU,
freeze, pause) is *recorded* before it is created and *resolved* once it is gone.
Whatever is recorded but unresolved when a run ends — normally, by an
exception, a signal, or a SIGKILL followed by the next run — is undone in
reverse order by :func:`unwind`. The on-disk form is described in
``docs/format.md`` ("The journal").

Format (version 1): one JSON object per line, appended and fsynced before the
caller goes on::

    {"v": 1, "op": "add", "id": 3, "kind": "blockdev", "data": {...}}
    {"v": 1, "op": "done", "id": 3}

A torn last line (a crash mid-append) is ignored: its resource was never
created, because creation only starts after the append returned. An unknown
version is refused rather than guessed at.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmpbackup.errors import QmpBackupError

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1


class JournalError(QmpBackupError):
    """The journal cannot be read, written or locked."""


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    kind: str
    data: Mapping[str, Any] = field(default_factory=dict)


class Journal:
    """An append-only, fsynced journal for one VM, held under an exclusive ``flock``.

    The lock keeps two runs for the same VM from undoing each other's resources.
    """

    def __init__(self, path: Path, fd: int, entries: dict[int, Entry], next_id: int) -> None:
        self.path = path
        self._fd = fd
        self._pending = entries
        self._next_id = next_id

    @classmethod
    def open(cls, path: Path) -> Journal:
        """Open (or create) the journal at ``path`` and take its lock without waiting.

        :raise JournalError: another run holds it, or it cannot be read.
        """
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot open journal {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(f"journal {path} is in use by another qmpbackup run") from None
        try:
            pending, next_id = _parse(path, _read_all(fd))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, pending, next_id)

    def pending(self) -> list[Entry]:
        """Unresolved entries, oldest first."""
        return [self._pending[k] for k in sorted(self._pending)]

    def record(self, kind: str, **data: Any) -> Entry:
        """Write down a resource that is about to be created. Returns its entry."""
        entry = Entry(self._next_id, kind, dict(data))
        self._append({"v": JOURNAL_VERSION, "op": "add", "id": entry.id, "kind": kind, "data": entry.data})
        self._next_id += 1
        self._pending[entry.id] = entry
        return entry

    def resolve(self, entry: Entry) -> None:
        """Write down that the resource of ``entry`` no longer exists (or never came to be)."""
        if entry.id not in self._pending:
            return
        self._append({"v": JOURNAL_VERSION, "op": "done", "id": entry.id})
        del self._pending[entry.id]

    def close(self) -> None:
        """Release the lock; an empty journal is removed so that a clean VM has no file."""
        if self._fd < 0:
            return
        if not self._pending:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _append(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        try:
            os.write(self._fd, line)
            os.fsync(self._fd)
        except OSError as exc:
            raise JournalError(f"cannot write journal {self.path}: {exc.strerror}") from exc


def _read_all(fd: int) -> bytes:
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(path: Path, raw: bytes) -> tuple[dict[int, Entry], int]:
    pending: dict[int, Entry] = {}
    next_id = 1
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            version = record["v"]
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):  # torn last line without newline: never acted upon
                log.warning("journal %s: ignoring torn last line", path)
                break
            raise JournalError(f"journal {path}:{number}: unreadable entry") from exc
        if version != JOURNAL_VERSION:
            raise JournalError(f"journal {path}:{number}: unknown version {version!r}")
        try:
            entry_id = int(record["id"])
            if record["op"] == "add":
                pending[entry_id] = Entry(entry_id, str(record["kind"]), dict(record.get("data") or {}))
            elif record["op"] == "done":
                pending.pop(entry_id, None)
            else:
                raise KeyError(record["op"])
        except (KeyError, TypeError, ValueError) as exc:
            raise JournalError(f"journal {path}:{number}: malformed entry") from exc
        next_id = max(next_id, entry_id + 1)
    return pending, next_id


Undo = Callable[[Entry], Awaitable[None]]


async def unwind(journal: Journal, handlers: Mapping[str, Undo], step_timeout: float = 60.0) -> list[str]:
    """Undo every pending entry, newest first. Returns the failures, one line each.

    A step that fails or times out is logged and left pending (the next run tries
    again); the remaining steps still run, so one stuck resource does not keep the
    others alive. Handlers must be safe to run twice. Cancellation propagates.
    """
    failures: list[str] = []
    for entry in reversed(journal.pending()):
        handler = handlers.get(entry.kind)
        if handler is None:
            failures.append(f"no cleanup step for {entry.kind} {dict(entry.data)}")
            continue
        try:
            async with asyncio.timeout(step_timeout):
                await handler(entry)
        except Exception as exc:  # logged, kept pending, the first error stays the one reported
            message = f"cleanup of {entry.kind} {dict(entry.data)} failed: {exc or type(exc).__name__}"
            log.warning("%s", message)
            failures.append(message)
            continue
        journal.resolve(entry)
    return failures
