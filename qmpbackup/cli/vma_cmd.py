"""``qmpbackup vma ...``: the Proxmox ``vma`` tool's commands and output lines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qmpbackup.cli.common import ArgumentParser, Context, option_arg
from qmpbackup.errors import UsageError
from qmpbackup.vma.archive_io import open_archive
from qmpbackup.vma.create import create_archive_file, parse_disk_spec
from qmpbackup.vma.extract import extract, extract_mapped
from qmpbackup.vma.listing import DEFAULT_CONFIG, config_data, list_lines, verify
from qmpbackup.vma.progress import CreateProgress, ExtractProgress
from qmpbackup.vma.reader import VmaReader
from qmpbackup.vma.recompress import recompress_archive
from qmpbackup.vma.restore_map import parse_map, read_map_lines


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "vma", parents=[common], help="read and write Proxmox VMA archives (like Proxmox's vma tool)"
    )
    sub = parser.add_subparsers(dest="vma_command", metavar="SUBCOMMAND", parser_class=ArgumentParser)
    sub.required = True

    p = sub.add_parser("list", parents=[common], help="list config files, devices and creation time")
    p.add_argument("archive", metavar="F", help="archive file (any compression) or - for stdin")
    p.set_defaults(run=run_list)

    p = sub.add_parser("config", parents=[common], help="print one config file of the archive")
    p.add_argument("archive", metavar="F", help="archive file (any compression) or - for stdin")
    p.add_argument("-c", dest="config_name", metavar="NAME", default=DEFAULT_CONFIG,
                   help=f"config file name (default {DEFAULT_CONFIG})")
    p.set_defaults(run=run_config)

    p = sub.add_parser("create", parents=[common], help="create an archive from disk images and config files")
    p.add_argument("archive", metavar="F", help="new archive file (must not exist) or - for stdout")
    p.add_argument("-c", dest="configs", metavar="FILE", action="append", default=[],
                   help="config file to store under its base name (repeatable)")
    p.add_argument("-d", dest="disks", metavar="format=FMT:NAME=PATH", action="append", default=[],
                   help="disk image to store as device NAME, FMT raw, qcow2, ... (repeatable)")
    p.add_argument("--compress", default="none", metavar="zstd|gzip|lzo",
                   help="compress the archive (default none)")
    p.add_argument("--zstd-threads", type=option_arg("zstd"), default=1, metavar="N",
                   help="zstd worker threads, 0 = half the cores (default 1, as vzdump)")
    p.add_argument("-v", dest="verbose", action="store_true", help="print progress and per-image statistics to stderr")
    p.set_defaults(run=run_create)

    p = sub.add_parser(
        "extract", parents=[common],
        help="extract configs and raw disk images into a new folder (with -r: disks into existing images)",
    )
    p.add_argument("archive", metavar="F", help="archive file (any compression) or - for stdin")
    p.add_argument("target", metavar="DIR", help="target folder (must not exist)")
    p.add_argument("-d", dest="devices", metavar="NAME[,NAME...]", help="extract only these devices")
    p.add_argument("-r", dest="readmap", metavar="FIFO",
                   help="print the list lines, then read device mapping lines from FIFO until 'done' "
                        "(qmrestore's protocol) and restore into the mapped images")
    p.add_argument("-v", dest="verbose", action="store_true", help="print progress and sparse statistics")
    p.set_defaults(run=run_extract)

    p = sub.add_parser(
        "recompress", parents=[common],
        help="write an archive again as framed zstd with an index (random access for export and mount)",
        description="Read F (any compression, or - for stdin) once, with every check, and write the same "
        "archive (same uuid, configs, devices and clusters) to DEST as qmpbackup's framed zstd with its index. "
        "F is left as it is.",
    )
    p.add_argument("archive", metavar="F", help="archive file (any compression) or - for stdin")
    p.add_argument("dest", metavar="DEST", type=Path, help="new .vma.zst file (must not exist)")
    p.add_argument("--zstd-threads", type=int, default=1, metavar="N",
                   help="zstd worker threads, 0 = half the cores (default 1, as vzdump)")
    p.set_defaults(run=run_recompress)

    p = sub.add_parser("verify", parents=[common], help="read the whole archive and check every rule")
    p.add_argument("archive", metavar="F", help="archive file (any compression) or - for stdin")
    p.add_argument("-v", dest="verbose", action="store_true",
                   help="also print the list output, progress and sparse statistics (as Proxmox's vma)")
    p.set_defaults(run=run_verify)


def _print_lines(lines: list[str]) -> None:
    """Names are archive bytes: print them back as the same bytes, like Proxmox's tool."""
    sys.stdout.flush()
    sys.stdout.buffer.write("".join(f"{line}\n" for line in lines).encode("utf-8", errors="surrogateescape"))
    sys.stdout.buffer.flush()


def run_list(args: argparse.Namespace, ctx: Context) -> int:
    with open_archive(args.archive, read_to_end=False) as source:
        reader = VmaReader(source)
    _print_lines(list_lines(reader))
    return 0


def run_config(args: argparse.Namespace, ctx: Context) -> int:
    with open_archive(args.archive, read_to_end=False) as source:
        reader = VmaReader(source)
    data = config_data(reader, args.config_name)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def _print_stderr(line: str) -> None:
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def _print_line(line: str) -> None:
    _print_lines([line])


def run_create(args: argparse.Namespace, ctx: Context) -> int:
    disks = [parse_disk_spec(text) for text in args.disks]
    create_archive_file(
        args.archive, [Path(c) for c in args.configs], disks, args.compress, args.zstd_threads,
        CreateProgress(_print_stderr) if args.verbose else None,
    )
    return 0


def run_recompress(args: argparse.Namespace, ctx: Context) -> int:
    if args.zstd_threads < 0:
        raise UsageError("--zstd-threads must be 0 or more")
    if not args.dest.name.endswith(".zst"):
        raise UsageError(f"{args.dest}: the new archive is zstd, its name must end in .zst")
    recompress_archive(args.archive, args.dest, args.zstd_threads)
    return 0


def run_extract(args: argparse.Namespace, ctx: Context) -> int:
    wanted = None
    if args.devices is not None:
        wanted = [name for name in args.devices.split(",") if name]
        if not wanted:
            raise UsageError("-d needs at least one device name")

    def on_device(path: Path, size: int) -> None:
        _print_lines([f"DEVINFO {path} {size}"])

    with open_archive(args.archive) as source:
        reader = VmaReader(source)
        progress = ExtractProgress(reader.header.devices, _print_line) if args.verbose else None
        if args.readmap is None:
            extract(reader, Path(args.target), devices=wanted, on_device=on_device, progress=progress)
        else:
            readmap = Path(args.readmap)
            extract_mapped(
                reader, Path(args.target), lambda: parse_map(read_map_lines(readmap)), devices=wanted,
                on_configs=lambda: _print_lines(list_lines(reader)), progress=progress,
            )
    return 0


def run_verify(args: argparse.Namespace, ctx: Context) -> int:
    with open_archive(args.archive) as source:
        reader = VmaReader(source)
        if args.verbose:
            _print_lines(list_lines(reader))
        verify(reader, ExtractProgress(reader.header.devices, _print_line) if args.verbose else None)
    return 0
