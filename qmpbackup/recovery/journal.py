"""The crash-safe list of everything a run creates, so that nothing is ever left behind.

Every resource (QEMU node, filter, export, bitmap, fleecing image, spawned QEMU,
freeze, pause) is *recorded* before it is created and *resolved* once it is gone.
Whatever is recorded but unresolved when a run ends — normally, by an
exception, a signal, or a SIGKILL followed by the next run — is undone in
reverse order by :func:`qmpbackup.recovery.replay.replay`. The on-disk form is described in
``docs/format.md`` ("The journal").

Format (version 1): one JSON object per line, appended and fsynced before the
caller goes on::

    {"v": 1, "op": "add", "id": 3, "kind": "blockdev", "data": {...}, "qemu": {...}}
    {"v": 1, "op": "done", "id": 3}

``data`` follows the kind's schema (:mod:`qmpbackup.recovery.kinds`): checked exactly when
written; when read, an entry that does not fit is kept and named by replay rather
than acted upon. ``qemu`` names the QEMU process the run talked to
(:class:`~qmpbackup.recovery.instance.QemuInstance`), once the journal is bound to one.

A torn last line (a crash mid-append) is ignored: its resource was never
created, because creation only starts after the append returned. An unknown
version is refused rather than guessed at.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmpbackup.errors import QmpBackupError
from qmpbackup.recovery.instance import QemuInstance
from qmpbackup.recovery.kinds import Kind, entry_problem

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1


class JournalError(QmpBackupError):
    """The journal cannot be read, written or locked."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One recorded resource. ``problem``: why the entry read does not fit its kind's schema."""

    id: int
    kind: str
    data: Mapping[str, Any] = field(default_factory=dict)
    qemu: QemuInstance | None = None
    problem: str | None = None

    def describe(self) -> str:
        """``kind what`` for log lines: the data key that names the resource."""
        for key in ("node", "job", "id", "path", "qdev", "socket", "qga", "qmp"):
            if key in self.data:
                return f"{self.kind} {self.data[key]}"
        return self.kind


class Journal:
    """An append-only, fsynced journal for one VM, held under an exclusive ``flock``.

    The lock keeps two runs for the same VM from undoing each other's resources.
    """

    def __init__(self, path: Path, fd: int, entries: dict[int, Entry], next_id: int) -> None:
        self.path = path
        self._fd = fd
        self._pending = entries
        self._next_id = next_id
        self._qemu: QemuInstance | None = None

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

    def bind(self, qemu: QemuInstance | None) -> None:
        """Entries recorded from now on belong to this QEMU process (None: to none)."""
        self._qemu = qemu

    def record(self, kind: Kind, **data: Any) -> Entry:
        """Write down a resource that is about to be created. Returns its entry.

        :raise ValueError: ``data`` does not fit the kind's schema (a bug, never input).
        """
        problem = entry_problem(kind.name, data, exact=True)
        if problem is not None:
            raise ValueError(f"journal entry {kind.name}: {problem}")
        entry = Entry(self._next_id, kind.name, dict(data), self._qemu)
        record: dict[str, Any] = {"v": JOURNAL_VERSION, "op": "add", "id": entry.id, "kind": kind.name,
                                  "data": entry.data}
        if self._qemu is not None:
            record["qemu"] = self._qemu.as_record()
        self._append(record)
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
                pending[entry_id] = _entry(entry_id, str(record["kind"]), record.get("data") or {},
                                           record.get("qemu"))
            elif record["op"] == "done":
                pending.pop(entry_id, None)
            else:
                raise KeyError(record["op"])
        except (KeyError, TypeError, ValueError) as exc:
            raise JournalError(f"journal {path}:{number}: malformed entry") from exc
        next_id = max(next_id, entry_id + 1)
    return pending, next_id


def _entry(entry_id: int, kind: str, data: Any, qemu: Any) -> Entry:
    if not isinstance(data, dict):
        return Entry(entry_id, kind, {}, None, "data is not an object")
    instance = QemuInstance.from_record(qemu) if qemu is not None else None
    problem = entry_problem(kind, data)
    if qemu is not None and instance is None:
        problem = problem or "unreadable 'qemu' field"
    return Entry(entry_id, kind, data, instance, problem)


Undo = Callable[[Entry], Awaitable[None]]


def bad_entry(journal: Journal, entry: Entry) -> str:
    """The failure line of an entry that does not fit its schema (it stays in the journal)."""
    return f"journal {journal.path}: entry {entry.id} ({entry.kind}) kept, not understood: {entry.problem}"
