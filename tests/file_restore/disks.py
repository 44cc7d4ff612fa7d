"""Disk images with partition tables and file systems for file-restore tests (root: loop mounts).

Partitions are made as separate files, filled through a loop mount of the file (loop devices
work here, partition nodes of a loop device do not appear without udev), and copied into the
disk image at the offsets sfdisk chose.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20


@dataclass(frozen=True)
class Part:
    size_mb: int
    fstype: str | None  # "ext4", "xfs", "btrfs", "vfat", None (left blank), "corrupt-ext4"
    files: dict[str, bytes] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def make_fs(path: Path, part: Part) -> None:
    with open(path, "wb") as f:
        f.truncate(part.size_mb * MiB)
    if part.fstype is None:
        return
    fstype = part.fstype.removeprefix("corrupt-")
    mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"],
            "btrfs": ["mkfs.btrfs", "-q", "-f"], "vfat": ["mkfs.vfat"]}[fstype]
    _run(*mkfs, str(path))
    if part.files or part.symlinks:
        with tempfile.TemporaryDirectory() as mnt:
            _run("mount", "-o", "loop", str(path), mnt)
            try:
                for name, data in part.files.items():
                    target = Path(mnt) / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    if name in part.modes:
                        target.chmod(part.modes[name])
                for name, dest in part.symlinks.items():
                    target = Path(mnt) / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(dest, target)
            finally:
                _run("umount", mnt)
    if part.fstype.startswith("corrupt-"):
        with open(path, "r+b") as f:  # wipe the superblock area and group descriptors
            f.seek(1024)
            f.write(os.urandom(64 << 10))


def make_disk(path: Path, parts: list[Part], label: str = "gpt") -> None:
    """A disk image with ``parts`` in a ``label`` (gpt or dos) table; sizes in MiB."""
    total = sum(p.size_mb for p in parts) + 2
    with open(path, "wb") as f:
        f.truncate(total * MiB)
    script = f"label: {label}\n" + "".join(f",{p.size_mb}M,L\n" for p in parts)
    subprocess.run(["sfdisk", "-q", str(path)], input=script.encode(), check=True, capture_output=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(path)], check=True, capture_output=True).stdout)
    sector = int(table["partitiontable"].get("sectorsize", 512))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (part, entry) in enumerate(zip(parts, table["partitiontable"]["partitions"], strict=True)):
            fs = Path(tmp) / f"p{i}"
            make_fs(fs, part)
            _run("dd", f"if={fs}", f"of={path}", "bs=1M", f"seek={entry['start'] * sector}",
                 "oflag=seek_bytes", "conv=notrunc,sparse")


_LV_SECTION = """
\tlogical_volumes {{
\t\t{lv} {{
\t\t\tid = "qmpbac-kupt-estl-vlvm-test-0000-000001"
\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]
\t\t\tflags = []
\t\t\tsegment_count = 1
\t\t\tsegment1 {{
\t\t\t\tstart_extent = 0
\t\t\t\textent_count = {extents}
\t\t\t\ttype = "striped"
\t\t\t\tstripe_count = 1
\t\t\t\tstripes = ["pv0", 0]
\t\t\t}}
\t\t}}
\t}}
"""


def make_lvm_disk(path: Path, vg: str, lv: Part) -> None:
    """A whole-disk LVM PV with one linear LV ``lv`` (named ``root``) holding ``lv``'s file system.

    This host has no device-mapper, so the LV is never activated here: its metadata is written
    with vgcfgrestore and its file system copied to where the LV's first extent lies.
    """
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    with open(path, "wb") as f:
        f.truncate((lv.size_mb + 8) * MiB)
    loop = subprocess.run(["losetup", "-f", "--show", str(path)], check=True, capture_output=True,
                          text=True).stdout.strip()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            meta = Path(tmp) / "meta"
            for cmd in (["pvcreate", "-q", loop], ["vgcreate", "-q", "-s", "4M", vg, loop],
                        ["vgcfgbackup", "-q", "-f", str(meta), vg]):
                subprocess.run(cmd, check=True, capture_output=True, env=env)
            text = meta.read_text()
            end = text.rindex("\n}")
            meta.write_text(text[:end] + _LV_SECTION.format(lv="root", extents=lv.size_mb // 4) + text[end:])
            subprocess.run(["vgcfgrestore", "-q", "-f", str(meta), vg], check=True, capture_output=True, env=env)
            pe_start = int(subprocess.run(["pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start",
                                           loop], check=True, capture_output=True, text=True, env=env).stdout)
            subprocess.run(["vgchange", "-an", vg], capture_output=True, env=env, check=False)
            fs = Path(tmp) / "lv"
            make_fs(fs, lv)
            _run("dd", f"if={fs}", f"of={path}", "bs=1M", f"seek={pe_start}", "oflag=seek_bytes",
                 "conv=notrunc,sparse")
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
