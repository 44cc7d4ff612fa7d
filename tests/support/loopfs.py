"""Loop-mounted file systems for tests that need a real xfs, btrfs or ext4 (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MiB = 1 << 20


@dataclass
class LoopFs:
    fstype: str
    image: Path
    device: str
    mountpoint: Path


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "-K"],
}
MIN_SIZE = {"ext4": 4 * MiB, "xfs": 300 * MiB, "btrfs": 120 * MiB}


@pytest.fixture
def loopfs(tmp_path: Path) -> Iterator[Callable[[str, int], LoopFs]]:
    """Factory: a loop-mounted filesystem of type ``fstype`` and ``size`` bytes (sparse image).
    Skips where we are not root or mkfs is missing; always unmounts and detaches."""
    made: list[LoopFs] = []

    def make(fstype: str, size: int) -> LoopFs:
        if os.geteuid() != 0:
            pytest.skip("loop mounts need root")
        tool = MKFS[fstype][0]
        if shutil.which(tool) is None or shutil.which("losetup") is None:
            pytest.skip(f"{tool} is not installed")
        size = max(size, MIN_SIZE[fstype])
        image = tmp_path / f"{fstype}-{len(made)}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        device = _run("losetup", "--find", "--show", str(image)).strip()
        mnt = tmp_path / f"mnt-{fstype}-{len(made)}"
        mnt.mkdir()
        fs = LoopFs(fstype, image, device, mnt)
        try:
            _run(*MKFS[fstype], device)
            _run("mount", device, str(mnt))
        except subprocess.CalledProcessError as exc:
            subprocess.run(["losetup", "-d", device], check=False)
            pytest.skip(f"cannot make a {fstype} loop mount: {exc.stderr.strip()}")
        made.append(fs)
        return fs

    try:
        yield make
    finally:
        for fs in reversed(made):
            subprocess.run(["umount", "-l", str(fs.mountpoint)], check=False, capture_output=True)
            subprocess.run(["losetup", "-d", fs.device], check=False, capture_output=True)
