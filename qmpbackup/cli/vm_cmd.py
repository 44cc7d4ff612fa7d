"""``qmpbackup start VMID`` and ``qmpbackup stop VMID``: run a VM from its guest definition."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qmpbackup.cli.common import Context, vmid_arg
from qmpbackup.errors import UsageError
from qmpbackup.guest_config import guest_path, load_guest
from qmpbackup.jobs.lock import DEFAULT_RUN_DIR
from qmpbackup.qemu.vm_runner import start_vm, stop_vm

EPILOG = """\
The QEMU command line is built from the definition (<config-dir>/guests/VMID.conf): memory,
sockets/cores, cpu, machine, disks on their buses, CD-ROMs, netN (bridge= as a bridge netdev,
else user-mode networking), boot order, agent and args. Its sockets are in
RUN_DIR/vms/VMID/ (qmp.sock, qga.sock); put them in the definition's [qmpbackup] section
(qmp:, qga:) for backups of the running VM.
"""


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    for name, helptext in (("start", "start a VM from its guest definition"),
                           ("stop", "power off a VM started by qmpbackup start")):
        p = subparsers.add_parser(name, parents=[common], help=helptext, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("vmid", type=vmid_arg, metavar="VMID")
        p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, metavar="DIR",
                       help=f"where the VM's sockets and pid live (default {DEFAULT_RUN_DIR})")
        if name == "start":
            p.add_argument("--accel", choices=("tcg", "kvm"),
                           help="override the definition's accel (default: its accel:, else tcg)")
            p.set_defaults(run=run_start)
        else:
            p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                           help="how long the guest may take to power off before QEMU is ended (default 60)")
            p.set_defaults(run=run_stop)


def run_start(args: argparse.Namespace, ctx: Context) -> int:
    if not guest_path(ctx.config_dir, args.vmid).exists():
        raise UsageError(f"VM {args.vmid} has no definition ({guest_path(ctx.config_dir, args.vmid)})")
    folder = start_vm(load_guest(ctx.config_dir, args.vmid), args.run_dir, args.accel)
    print(folder.path)
    return 0


async def run_stop(args: argparse.Namespace, ctx: Context) -> int:
    if not await stop_vm(args.vmid, args.run_dir, args.timeout):
        print(f"VM {args.vmid} is not running", file=sys.stderr)
    return 0
