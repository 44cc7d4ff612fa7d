"""``qmpbackup list``: the backups in a dump directory."""

from __future__ import annotations

import argparse
import time
from typing import Any

from qmpbackup.cli.common import (
    Context,
    add_output_format,
    add_target_arguments,
    print_json,
    target_options,
    vmid_arg,
)
from qmpbackup.jobs.target import resolve_target
from qmpbackup.render import render_bytes
from qmpbackup.store.dumpdir import list_backups


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("list", parents=[common], help="list the backups in a dump directory")
    p.add_argument("--vmid", type=vmid_arg, help="only this VM's backups")
    add_target_arguments(p)
    add_output_format(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    target = resolve_target(ctx.config_dir, target_options(args))
    backups = list_backups(target.dump_dir, args.vmid)
    if args.output_format == "json":
        print_json(
            [
                {
                    "filename": b.path.name,
                    "path": str(b.path),
                    "vmid": b.name.vmid,
                    "ctime": b.ctime,
                    "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.ctime)),
                    "size": b.size,
                    "compression": b.compression,
                    "protected": b.protected,
                    "notes": b.notes,
                }
                for b in backups
            ]
        )
        return 0
    if not backups:
        print(f"no backups in {target.dump_dir}")
        return 0
    rows = [
        (
            b.path.name,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.ctime)),
            render_bytes(b.size),
            b.compression,
            "yes" if b.protected else "",
            b.notes,
        )
        for b in backups
    ]
    header = ("FILE", "TIME", "SIZE", "COMPRESSION", "PROTECTED", "NOTES")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
    return 0
