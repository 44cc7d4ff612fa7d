"""``qmpbackup verify ARCHIVE``: read everything, check everything, optionally hash every disk."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from qmpbackup.cli.common import Context
from qmpbackup.render import display_name
from qmpbackup.restore.checksums import DeviceHasher
from qmpbackup.restore.malloc_tuning import keep_large_buffers
from qmpbackup.restore.source import open_archive_stream
from qmpbackup.vma.cluster_map import TooManyRuns
from qmpbackup.vma.errors import VmaError, VmaFormatError
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


def run(args: argparse.Namespace, ctx: Context) -> int:
    keep_large_buffers()
    hashers: dict[int, DeviceHasher] = {}
    try:
        with open_archive_stream(args.archive) as stream:
            reader = VmaReader(stream)
            if args.checksums:
                hashers = {d.dev_id: DeviceHasher(d, budget=reader.run_budget)
                           for d in reader.header.devices if not d.is_vmstate}
            clusters = 0
            for cluster in reader.clusters(check_missing=True):
                clusters += 1
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
    sys.stdout.write("".join(lines))
    sys.stdout.flush()
    log.info(
        "archive OK: %d devices, %d extents, %d clusters, %d bytes uncompressed",
        len(reader.devices), reader.extent_count, clusters, archive_bytes,
    )
    return 0
