"""Source images for the tests: raw files with data, holes and allocated zero regions."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

MiB = 1024 * 1024


def make_raw(path: Path, size: int, kind: str, seed: int = 1) -> Path:
    """kind: sparse | random | zero-regions | tail (size need not be a multiple of 64 KiB)."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        if kind == "sparse":
            for off in (0, 3 * MiB + 4096, size - 8192, 7 * MiB + 512):
                if off < size:
                    f.seek(off)
                    f.write(rnd.randbytes(min(4096, size - off)))
        elif kind == "random":
            f.write(rnd.randbytes(size))
        elif kind in ("zero-regions", "tail"):
            f.write(rnd.randbytes(size))
            # allocated zeroes, then punch a hole, leave the tail random
            f.seek(2 * MiB)
            f.write(bytes(2 * MiB))
            f.seek(5 * MiB + 12 * 1024)
            f.write(bytes(100 * 1024))
        else:
            raise ValueError(kind)
    if kind in ("zero-regions", "tail"):
        subprocess.run(["fallocate", "--punch-hole", "--offset", str(8 * MiB), "--length",
                        str(2 * MiB), str(path)], check=True)
    return path


def to_qcow2(qemu_img: str, raw: Path, out: Path) -> Path:
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                   check=True, capture_output=True)
    return out


def file_size(path: Path) -> int:
    return os.stat(path).st_size
