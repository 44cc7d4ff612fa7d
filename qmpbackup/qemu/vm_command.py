"""A running VM's QEMU command line, built from its guest definition (Proxmox syntax).

What is read: ``memory``, ``sockets``/``cores``, ``cpu``, ``machine`` (``q35`` or the default
i440fx ``pc``), the disks and CD-ROMs on their buses with their formats, ``netN`` (the model,
its MAC, ``bridge=`` as a QEMU bridge netdev, else user-mode networking), ``boot: order=…``,
``agent`` (the guest agent's socket) and ``args`` (extra QEMU arguments, as Proxmox passes
them). Sockets live in the VM's run folder. Everything else in the definition (hotplug, VGA
models, USB, PCI passthrough …) is not rebuilt: this is for running a restored VM without host
tooling, not a replacement for a VM manager.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from qmpbackup.guest_config import DriveConfig, GuestDefinition
from qmpbackup.qemu.errors import SpawnError

NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e", "vmxnet3": "vmxnet3",
              "rtl8139": "rtl8139"}
_NET_RE = re.compile(r"net(\d+)")
DEFAULT_MEMORY_MIB = 512


def _escape(value: str) -> str:
    """QEMU's option syntax doubles commas inside a value."""
    return value.replace(",", ",,")


def _items(value: str) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for part in value.split(","):
        key, sep, val = part.partition("=")
        out.append((key.strip(), val.strip()) if sep else (None, part.strip()))
    return out


def drive_path(defn: GuestDefinition, drive: DriveConfig) -> str:
    where = str(defn.path) if defn.path else f"guest {defn.vmid}"
    if drive.volume is None or not drive.volume.startswith("/"):
        raise SpawnError(
            f"{where}:{drive.line}: {drive.key}: QEMU needs an absolute image path, not {drive.volume!r}",
            str(defn.vmid),
        )
    return drive.volume


def disk_args(defn: GuestDefinition, drives: Sequence[DriveConfig], *, q35: bool = True,
              bootindex: dict[str, int] | None = None, paths: dict[str, str] | None = None) -> list[str]:
    """``-drive``/``-device`` pairs for ``drives``: ids ``drive-<key>`` and ``<key>``, as Proxmox names them.

    ``paths`` replaces the image of a drive key (a live restore's overlay); ``bootindex`` gives
    boot priorities by key.
    """
    argv: list[str] = []
    controllers: set[str] = set()
    for d in sorted(drives, key=lambda d: d.key):
        path = (paths or {}).get(d.key) or drive_path(defn, d)
        drive_opts = [f"file={_escape(path)}", f"format={d.format}", "if=none", f"id=drive-{d.key}"]
        if d.cdrom:
            drive_opts.append("media=cdrom")
        for opt in ("cache", "aio", "discard", "detect_zeroes"):
            value = d.option(opt)
            if value:
                drive_opts.append(f"{opt.replace('_', '-')}={_escape(value)}")
        if d.read_only or d.cdrom:
            drive_opts.append("readonly=on")
        argv += ["-drive", ",".join(drive_opts)]
        dev = f"drive=drive-{d.key},id={d.key}"
        if bootindex and d.key in bootindex:
            dev += f",bootindex={bootindex[d.key]}"
        if d.bus == "virtio":
            argv += ["-device", f"virtio-blk-pci,{dev}"]
        elif d.bus == "scsi":
            if "scsi" not in controllers:
                argv += ["-device", "virtio-scsi-pci,id=scsihw0"]
                controllers.add("scsi")
            kind = "scsi-cd" if d.cdrom else "scsi-hd"
            argv += ["-device", f"{kind},bus=scsihw0.0,scsi-id={d.index},lun=0,{dev}"]
        elif d.bus == "sata":
            if "sata" not in controllers:
                argv += ["-device", "ahci,id=ahci0"]
                controllers.add("sata")
            argv += ["-device", f"{'ide-cd' if d.cdrom else 'ide-hd'},bus=ahci0.{d.index},{dev}"]
        elif d.bus == "ide":  # q35: its own AHCI ports; i440fx: two IDE buses with two units each
            bus = f"ide.{d.index}" if q35 else f"ide.{d.index // 2},unit={d.index % 2}"
            argv += ["-device", f"{'ide-cd' if d.cdrom else 'ide-hd'},bus={bus},{dev}"]
    return argv


def _boot_order(defn: GuestDefinition) -> dict[str, int]:
    boot = defn.option("boot") or ""
    for key, value in _items(boot):
        if key == "order":
            return {name: 100 + i for i, name in enumerate(n for n in value.split(";") if n)}
    return {}


def _nic_args(defn: GuestDefinition, bootindex: dict[str, int]) -> list[str]:
    argv: list[str] = []
    for key, value in defn.options:
        m = _NET_RE.fullmatch(key)
        if m is None:
            continue
        model, mac, bridge = None, None, None
        for k, v in _items(value):
            if k in NIC_MODELS:
                model, mac = k, v or None
            elif k == "model" and v in NIC_MODELS:
                model = v
            elif k == "macaddr":
                mac = v
            elif k == "bridge":
                bridge = v
            elif k == "link_down" and v == "1":
                pass
        if model is None:
            raise SpawnError(f"VM {defn.vmid}: {key}: no NIC model I know ({', '.join(NIC_MODELS)})", str(defn.vmid))
        netdev = f"bridge,id={key},br={_escape(bridge)}" if bridge else f"user,id={key}"
        device = f"{NIC_MODELS[model]},netdev={key},id={key}"
        if mac:
            device += f",mac={mac}"
        if key in bootindex:
            device += f",bootindex={bootindex[key]}"
        argv += ["-netdev", netdev, "-device", device]
    return argv


def vm_command(defn: GuestDefinition, binary: str, rundir: Path, accel: str,
               paths: dict[str, str] | None = None) -> list[str]:
    """The command line that runs ``defn`` (pure: no checks on the system).

    ``paths`` replaces disk images by drive key (a live restore starts the VM on overlays).
    """
    machine = defn.option("machine") or "pc"
    q35 = "q35" in machine
    memory = int(defn.option("memory") or defn.memory_mib or DEFAULT_MEMORY_MIB)
    sockets = int(defn.option("sockets") or 1)
    cores = int(defn.option("cores") or 1)
    cpu = (defn.option("cpu") or "").split(",")[0] or ("host" if accel == "kvm" else "max")
    bootindex = _boot_order(defn)
    argv = [
        binary, "-nodefaults", "-no-user-config", "-name", defn.name or f"vm{defn.vmid}",
        "-machine", "q35" if machine == "q35" else machine, "-accel", accel, "-cpu", cpu,
        "-m", str(memory), "-smp", f"{sockets * cores},sockets={sockets},cores={cores}",
        "-display", "none", "-vga", "none",
        "-qmp", f"unix:{_escape(str(rundir / 'qmp.sock'))},server=on,wait=off",
        "-serial", f"file:{_escape(str(rundir / 'console.log'))}",
        "-pidfile", str(rundir / "pid"),
    ]
    if defn.agent.enabled:
        argv += ["-chardev", f"socket,id=qga0,path={_escape(str(rundir / 'qga.sock'))},server=on,wait=off",
                 "-device", "virtio-serial-pci,id=qga-serial",
                 "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
    drives = [d for d in defn.drives if d.volume is not None]
    argv += disk_args(defn, drives, q35=q35, bootindex=bootindex, paths=paths)
    argv += _nic_args(defn, bootindex)
    extra = defn.option("args")
    if extra:
        argv += shlex.split(extra)
    return argv
