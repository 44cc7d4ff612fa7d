"""vzdump's task log: ``INFO:``/``WARN:``/``ERROR:`` lines, on stderr and in the guest's ``.log``.

This is product output, not debug logging: people and tools read it as they
read vzdump's. Lines go to the ``qmpbackup.task`` logger (the CLI prints them
on stderr) and, while a guest is being backed up, into that guest's log file
as ``YYYY-MM-DD HH:MM:SS INFO: <msg>``, the form vzdump copies beside the archive.
Warnings are collected as records for the result; they never decide an exit code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TextIO

task_logger = logging.getLogger("qmpbackup.task")

_PREFIX = {logging.INFO: "INFO", logging.WARNING: "WARN", logging.ERROR: "ERROR"}


class TaskLog:
    """The log of one guest's backup; ``path`` is the per-guest log file (or None)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.warnings: list[str] = []
        self._file: TextIO | None = None
        if path is not None:
            self._file = path.open("w", encoding="utf-8")

    def info(self, message: str) -> None:
        self._emit(logging.INFO, message)

    def file_only(self, message: str) -> None:
        """An INFO line for the guest's log file alone (vzdump's ``Backup started at``, ``Failed at``)."""
        if self._file is not None:
            self._write(logging.INFO, message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self._emit(logging.WARNING, message)

    def error(self, message: str) -> None:
        self._emit(logging.ERROR, message)

    def lines(self, level: int, text: str) -> None:
        """Log each line of a program's output (hook scripts) as its own record."""
        for line in text.splitlines():
            self._emit(level, line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TaskLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _emit(self, level: int, message: str) -> None:
        task_logger.log(level, "%s", message)
        if self._file is not None:
            self._write(level, message)

    def _write(self, level: int, message: str) -> None:
        assert self._file is not None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._file.write(f"{stamp} {_PREFIX.get(level, 'INFO')}: {message}\n")
        self._file.flush()
