"""Building real disk images and archives (with ``qmpbackup vma create``) for the restore tests."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.cli.main import main
from tests.support.cli import run_main_text

MiB = 1 << 20


@dataclass(frozen=True)
class Disk:
    key: str  # drive key, e.g. scsi0
    path: Path
    size: int

    @property
    def devname(self) -> str:
        return f"drive-{self.key}"


def make_image(path: Path, size: int, seed: int) -> Path:
    """A sparse raw image: random runs, explicit zero runs and holes, in 4 KiB-aligned and odd places."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            length = min(size - pos, rng.choice((512, 4096, 8192, 65536, 200_000, 300_000)))
            kind = rng.random()
            if kind < 0.45:
                f.seek(pos)
                f.write(rng.randbytes(length))
            elif kind < 0.6:
                f.seek(pos)
                f.write(bytes(length))  # allocated zeros
            pos += length + rng.choice((0, 0, 512, 4096, 131072))
        f.seek(size - 512)  # data right at the end (the partial last cluster)
        f.write(b"\xee" * 512)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def config_text(disks: Sequence[Disk], extra: str = "", storeid: str = "", fmt: str = "raw") -> str:
    lines = ["# restored by the tests", "name: testvm", "memory: 512"]
    lines += [f"{d.key}: /old/place/{d.path.name},format=raw,size={d.size}" for d in disks]
    lines += [line for line in extra.splitlines() if line]
    lines += [f"#qmdump#map:{d.key}:{d.devname}:{storeid}:{fmt}:" for d in disks]
    return "\n".join(lines) + "\n"


def vma_create(archive: Path, disks: Sequence[Disk], conf: str, compress: str = "none") -> Path:
    """An archive made the way users make one: ``qmpbackup vma create`` (in-process)."""
    conf_path = archive.parent / "qemu-server.conf"
    conf_path.write_text(conf)
    args = ["vma", "create", str(archive), "-c", str(conf_path), "--compress", compress]
    for d in disks:
        args += ["-d", f"format=raw:{d.devname}={d.path}"]
    assert main(args) == 0
    conf_path.unlink()
    return archive


def cli(*args: str, input_path: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real command's main in this process (stdin, output, exit codes as users see them)."""
    return run_main_text(*args, stdin=input_path.read_bytes() if input_path else b"")


def qemu_img_compare(a: Path, b: Path, fmt_b: str) -> None:
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt_b, str(a), str(b)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def tree(path: Path) -> dict[str, tuple[int, int, int]]:
    """Every file below ``path`` with size, mtime_ns and inode: equal before and after = untouched."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root, name)
            st = p.lstat()
            if p.is_dir() and not p.is_symlink():
                out[str(p.relative_to(path))] = (0, 0, st.st_ino)  # a file added and removed changes its mtime
            else:
                out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out
