"""``qmpbackup notes ARCHIVE [--set TEXT]``: show or change a backup's notes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qmpbackup.cli.common import Context
from qmpbackup.errors import UsageError
from qmpbackup.store.notes import read_notes, write_notes


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("notes", parents=[common], help="show or set a backup's notes")
    p.add_argument("archive", metavar="ARCHIVE", type=Path, help="the backup archive file")
    p.add_argument("--set", metavar="TEXT", dest="text", help="replace the notes ('' removes them)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    archive: Path = args.archive
    if not archive.is_file():
        raise UsageError(f"backup {archive} does not exist")
    if args.text is not None:
        write_notes(archive, args.text)
        return 0
    notes = read_notes(archive)
    if notes:
        sys.stdout.write(notes if notes.endswith("\n") else notes + "\n")
    return 0
