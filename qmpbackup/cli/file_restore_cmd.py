"""``qmpbackup file-restore``: list and extract files of an archive inside a throw-away helper VM."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import IO, Any

from qmpbackup.cli.common import Context, add_output_format, print_json
from qmpbackup.errors import UsageError
from qmpbackup.file_restore.client import (
    DaemonOptions, FileRestoreError, check_end, daemon_folder, ensure_daemon, request, stop_folder,
)
from qmpbackup.file_restore.helper_image import default_cache_dir, ensure_helper_image
from qmpbackup.jobs.lock import DEFAULT_RUN_DIR
from qmpbackup.render import render_bytes

DEFAULT_STATE_DIR = Path("/var/lib/qmpbackup")

EPILOG = """\
The archive's devices are attached read-only to a small helper VM (Debian kernel, our list and
extract service); the guest's file systems are parsed there, never by the host kernel, so a
hostile backup cannot reach the host. Works as an unprivileged user with access to the archive
and to QEMU. The helper stays up for follow-up calls on the same archive and ends after
--idle-timeout seconds (default 600) without a request, or with --stop.

PATH is DRIVE/VOLUME/path: drives as in the archive (drive-scsi0), volumes partN, disk (a file
system on the whole drive) or lv/VG-LV. Examples:

  qmpbackup file-restore vzdump-qemu-100-2026_12_04-10_00_00.vma.zst list /
  qmpbackup file-restore ARCHIVE list drive-scsi0/part1/etc
  qmpbackup file-restore ARCHIVE extract drive-scsi0/part1/etc/hostname /tmp/hostname
  qmpbackup file-restore ARCHIVE extract drive-scsi0/part1/home - --format tar | tar -tvf -
  qmpbackup file-restore --stop ARCHIVE
"""


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("file-restore", parents=[common], help="list and extract files inside a helper VM",
                              description="List and extract files of a VMA archive inside a throw-away helper VM.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", metavar="ARCHIVE", type=Path, nargs="?", help="the backup archive (needs an index)")
    p.add_argument("action", metavar="list|extract", nargs="?", choices=("list", "extract"))
    p.add_argument("path", metavar="PATH", nargs="?", help="DRIVE/VOLUME/path ('/' or nothing: the drives)")
    p.add_argument("dest", metavar="DEST", nargs="?", help="extract: file to write, '-' for stdout")
    p.add_argument("--format", choices=("tar", "zip", "plain"),
                   help="extract: plain (a file), tar or zip; default plain for files, tar for directories")
    p.add_argument("--build-image", action="store_true", help="build the helper VM image now and exit")
    p.add_argument("--stop", action="store_true", help="end the helper VM of ARCHIVE")
    p.add_argument("--run-dir", type=Path, default=None, metavar="DIR",
                   help=f"sockets and pid files (default {DEFAULT_RUN_DIR}, or $XDG_RUNTIME_DIR/qmpbackup "
                        "when that is not writable)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"the helper image is cached in DIR/file-restore-image (default {DEFAULT_STATE_DIR}; "
                        "~/.cache/qmpbackup when not writable)")
    p.add_argument("--accel", choices=("tcg", "kvm"), default="tcg",
                   help="how the helper VM runs (default tcg; kvm where /dev/kvm can run it)")
    p.add_argument("--idle-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="the helper VM ends after this long without a request (default 600)")
    add_output_format(p)
    p.set_defaults(run=run)


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir is not None:
        return Path(args.run_dir)
    base = DEFAULT_RUN_DIR
    if os.access(base if base.exists() else base.parent, os.W_OK):
        return base
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "qmpbackup" if runtime else Path(f"/tmp/qmpbackup-{os.getuid()}")


async def run(args: argparse.Namespace, ctx: Context) -> int:
    cache = default_cache_dir(args.state_dir)
    if args.build_image:
        print(ensure_helper_image(cache, force=True))
        return 0
    archive: Path | None = args.archive
    if archive is None:
        raise UsageError("file-restore: give ARCHIVE (see qmpbackup file-restore --help)")
    if not archive.is_file():
        raise UsageError(f"file-restore: {archive}: no such archive")
    run_dir = _run_dir(args)
    if args.stop:
        if not await stop_folder(daemon_folder(run_dir, archive)):
            print(f"no file-restore helper runs for {archive}", file=sys.stderr)
        return 0
    if args.action is None:
        raise UsageError("file-restore: give list or extract (see qmpbackup file-restore --help)")
    if args.action == "extract" and (not args.path or not args.dest):
        raise UsageError("file-restore extract: give PATH and DEST ('-' for stdout)")
    if args.action == "list" and args.dest is not None:
        raise UsageError("file-restore list: takes one PATH")
    if args.format is not None and args.action != "extract":
        raise UsageError("file-restore: --format is for extract")
    image = ensure_helper_image(cache)
    opts = DaemonOptions(image=image, accel=args.accel, idle_timeout=args.idle_timeout)
    sock = await ensure_daemon(archive, run_dir, opts)
    path = (args.path or "").strip("/")
    if args.action == "list":
        return await _list(sock, path, args.output_format)
    return await _extract(sock, path, args.dest, args.format or "auto")


async def _list(sock: Path, path: str, output_format: str) -> int:
    entries: list[dict[str, Any]] = []
    async with contextlib.aclosing(request(sock, {"op": "list", "path": path})) as frames:
        async for kind, payload in frames:
            if kind == b"H":
                entries = json.loads(payload)["entries"]
            elif kind == b"E":
                check_end(payload)
    for entry in entries:
        if "error" in entry:  # a volume without a usable file system: one line each, the rest lists
            print(f"{_join(path, entry['name'])}: {entry['error']}", file=sys.stderr)
    if output_format == "json":
        print_json(entries)
    else:
        for entry in entries:
            print(_line(entry))
    return 0


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _line(entry: dict[str, Any]) -> str:
    kind = entry["type"]
    name = json.dumps(entry["name"])[1:-1]  # escapes newlines and control characters
    if kind == "drive":
        return f"{name}\tdrive\t{render_bytes(int(entry['size']))}"
    if kind == "volume":
        return f"{name}\t{entry.get('fstype') or '-'}\t{render_bytes(int(entry['size']))}"
    if "mode" not in entry:
        return f"{name}/"
    type_char = {"dir": "d", "symlink": "l", "file": "-"}.get(kind, "?")
    mode = type_char + stat.filemode(int(entry["mode"]))[1:]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(int(entry["mtime"])))
    text = f"{mode} {entry['uid']:>5} {entry['gid']:>5} {entry['size']:>12} {when} {name}"
    if kind == "symlink":
        text += " -> " + json.dumps(entry["target"])[1:-1]
    return text


async def _extract(sock: Path, path: str, dest: str, fmt: str) -> int:
    target = None if dest == "-" else Path(dest)
    if target is not None and (target.exists() or target.is_symlink()):
        raise UsageError(f"file-restore extract: {target} exists")
    tmp = None if target is None else target.with_name(f".{target.name}.part")
    out: IO[bytes] = sys.stdout.buffer if tmp is None else open(tmp, "xb")
    ok = False
    try:
        async with contextlib.aclosing(request(sock, {"op": "extract", "path": path, "format": fmt})) as frames:
            async for kind, payload in frames:
                if kind == b"D":
                    out.write(payload)
                elif kind == b"E":
                    check_end(payload)
        out.flush()
        if tmp is not None and target is not None:
            os.fsync(out.fileno())
            out.close()
            os.rename(tmp, target)
        ok = True
    finally:
        if tmp is not None:
            out.close()
            if not ok:
                tmp.unlink(missing_ok=True)
    return 0


__all__ = ["register", "FileRestoreError"]
