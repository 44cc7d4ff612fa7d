"""``qmpbackup index ARCHIVE``: give an archive without an index (e.g. one Proxmox made) a sidecar index."""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any

from qmpbackup.cli.common import Context
from qmpbackup.errors import UsageError
from qmpbackup.vma.index import (
    ArchiveIndex,
    ArchiveIndexError,
    sidecar_path,
    write_sidecar,
)
from qmpbackup.vma.index_scan import scan_archive

log = logging.getLogger(__name__)


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "index", parents=[common], help="build the index of an archive that has none (written beside it)",
        description="Read ARCHIVE once and write its index (cluster places and data digests, for verify, "
        "incremental runs and random access) to ARCHIVE.index. The archive itself is not changed. An archive "
        "with a sound index is left as it is.",
    )
    p.add_argument("archive", metavar="ARCHIVE", type=Path, help="archive file (.vma, .vma.zst, .vma.gz, .vma.lzo)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    archive: Path = args.archive
    if not archive.is_file():
        raise UsageError(f"archive {archive} does not exist")
    try:
        with ArchiveIndex.open(archive) as index:
            log.info("%s already has a sound index (%s)", archive.name, index.source)
            return 0
    except ArchiveIndexError as exc:
        log.info("building the index: %s", str(exc).partition(" (run:")[0])
    scanned = scan_archive(archive)
    with scanned.builder as builder:
        with contextlib.suppress(FileNotFoundError):
            sidecar_path(archive).unlink()  # a damaged one
        write_sidecar(builder, archive, scanned.plain_size)
    log.info("wrote %s", sidecar_path(archive))
    if not scanned.random_access:
        log.info("digests recorded; random access (export, mount) needs framed zstd: "
                 "qmpbackup vma recompress %s", archive)
    return 0
