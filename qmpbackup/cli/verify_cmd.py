"""``qmpbackup verify ARCHIVE``: read everything, check everything, optionally hash every disk."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from qmpbackup.cli.common import Context
from qmpbackup.render import display_name
from qmpbackup.restore.checksums import DeviceHasher
from qmpbackup.restore.malloc_tuning import keep_large_buffers
from qmpbackup.restore.source import open_archive_stream
from qmpbackup.vma.cluster_map import TooManyRuns
from qmpbackup.vma.errors import VmaError, VmaFormatError
from qmpbackup.vma.index import ArchiveIndex, ArchiveIndexError, IndexDevice, NoIndexError
from qmpbackup.vma.reader import VmaReader

log = logging.getLogger(__name__)


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "verify", parents=[common], help="check a whole archive: decompression, every format rule, no missing data",
        description="Read ARCHIVE to the end with every check of the format (missing clusters included) and of "
        "its compression. Exit 0 when sound, 1 with the first error otherwise.",
    )
    p.add_argument("archive", metavar="ARCHIVE", help="archive file (any compression), or - for stdin")
    p.add_argument("--checksums", action="store_true",
                   help="print the sha256 of each disk's full content, as sha256sum prints it")
    p.set_defaults(run=run)


def _open_index(archive: str) -> tuple[ArchiveIndex | None, str]:
    """The archive's index, or None and why (a damaged index is reported at once and not used)."""
    if archive == "-" or not Path(archive).is_file():
        return None, "structure only: standard input has no index"
    try:
        return ArchiveIndex.open(Path(archive)), ""
    except NoIndexError:
        return None, f"structure only: no index, qmpbackup index {archive} makes one"
    except ArchiveIndexError as exc:
        log.warning("ignoring the index: %s", exc)
        return None, "structure only: the index is damaged"


def run(args: argparse.Namespace, ctx: Context) -> int:
    keep_large_buffers()
    hashers: dict[int, DeviceHasher] = {}
    index, why = _open_index(args.archive)
    checked = 0
    try:
        with open_archive_stream(args.archive) as stream:
            reader = VmaReader(stream)
            by_id: dict[int, IndexDevice] = {}
            if index is not None:
                for d in reader.header.devices:
                    found = index.device(d.name)
                    if found is not None and found.size == d.size:
                        by_id[d.dev_id] = found
                    elif not d.is_vmstate:
                        log.warning("ignoring the index: it does not describe device %s", d.name)
                        why = "structure only: the index does not fit the archive"
                        by_id.clear()
                        break
            if args.checksums:
                hashers = {d.dev_id: DeviceHasher(d, budget=reader.run_budget)
                           for d in reader.header.devices if not d.is_vmstate}
            clusters = 0
            for cluster in reader.cluster_views(check_missing=True):
                clusters += 1
                dev = by_id.get(cluster.dev_id)
                if dev is not None and index is not None:
                    index.check_cluster(dev, cluster.cluster_num, cluster.mask, cluster.data)
                    checked += 1
                hasher = hashers.get(cluster.dev_id)
                if hasher is not None:
                    try:
                        hasher.add(cluster.cluster_num, cluster.data, cluster.mask)
                    except TooManyRuns as exc:
                        raise VmaFormatError(f"{exc} held back for the checksums", reader.offset) from None
                    except OSError as exc:
                        raise VmaError(f"cannot hold clusters for the checksums: {exc.strerror or exc}") from exc
            archive_bytes = reader.offset
        lines = [f"{h.hexdigest()}  {display_name(h.device.name)}\n" for h in hashers.values()]
    finally:
        for hasher in hashers.values():
            hasher.close()
        if index is not None:
            index.close()
    sys.stdout.write("".join(lines))
    sys.stdout.flush()
    log.info(
        "archive OK: %d devices, %d extents, %d clusters, %d bytes uncompressed%s",
        len(reader.devices), reader.extent_count, clusters, archive_bytes,
        f"; data of {checked} clusters matches the index" if checked else f" ({why or 'structure only'})",
    )
    return 0
