"""Files of a run on the host, journaled before they exist: the partial archive and the run folder.

A run killed mid-transfer leaves ``….vma.dat`` in the dump dir and its run folder
(``$TMPDIR/qmpbackup-<vmid>-XXXX``, with our NBD socket and QEMU's reclaim socket) behind;
both are recorded first, so the next run or ``qmpbackup cleanup`` removes them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qmpbackup.atomic_file import OutputExistsError
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Journal

#: Run folders are ours only under this name (``$TMPDIR/qmpbackup-<vmid>-XXXX``).
RUN_FOLDER_PREFIX = "qmpbackup-"


def remove_output_file(path: Path) -> None:
    """A partial archive (``….dat``); never anything under another name."""
    if path.name.endswith(".dat"):
        path.unlink(missing_ok=True)


def remove_run_folder(path: Path) -> None:
    if path.name.startswith(RUN_FOLDER_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def journaled_output(journal: Journal, temp: Path) -> Iterator[None]:
    """Journal the partial archive ``temp`` around the block that creates, fills and publishes it.

    An ``OutputExistsError`` means the file is someone else's: its entry is dropped at once.
    After any other error the entry stays for the run's own cleanup (the file may be there).
    """
    entry = journal.record(kinds.OUTPUT_FILE, path=str(temp))
    try:
        yield
    except OutputExistsError:
        journal.resolve(entry)
        raise
    journal.resolve(entry)


@contextlib.contextmanager
def run_folder(journal: Journal, vmid: int) -> Iterator[Path]:
    """A private folder ``$TMPDIR/qmpbackup-<vmid>-XXXXXXXX`` (0700) for the run's sockets, journaled."""
    base = Path(tempfile.gettempdir())
    while True:
        path = base / f"{RUN_FOLDER_PREFIX}{vmid}-{secrets.token_hex(4)}"
        entry = journal.record(kinds.RUN_FOLDER, path=str(path))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            journal.resolve(entry)
            continue
        break
    try:
        yield path
    finally:
        remove_run_folder(path)
        journal.resolve(entry)
