"""Fleecing images ``vm-<vmid>-fleece-<n>``: qcow2 files on file storages, raw volumes on block ones.

An image is *planned* first (name, path, size: pure), then recorded in the journal by
the caller, then *created*; :func:`free_image` removes it and is safe to run twice, so
the journal can replay it after a crash from the recorded fields alone.

Sizes: qcow2 gets the source's exact byte size. Block volumes are allocated rounded up
(LVM and ZFS work in KiB and blocks); the raw node on top gets an explicit ``size`` so
QEMU sees exactly the source's size.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleecing.errors import CommandFailed, FleecingError
from fleecing.runner import Runner, run_command
from fleecing.storage import FILE_TYPES, FleecingPlan, images_dir

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"vm-(\d+)-fleece-(\d+)(?:\.(qcow2|raw))?")
MAX_IMAGES_PER_VM = 1000


@dataclass(frozen=True, slots=True)
class FleecingImage:
    """One fleecing image. ``path`` is the file or the block device node QEMU opens."""

    storeid: str
    storage_type: str
    name: str
    path: str
    format: str
    size: int  # the source's exact size
    alloc_size: int  # what was allocated (>= size on block storages)
    cluster_size: int
    preallocation: str
    volume: str | None = None  # "vg/lv" or "pool/zvol" on block storages

    def as_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> FleecingImage:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @property
    def is_file(self) -> bool:
        return self.storage_type in FILE_TYPES


def image_name(vmid: int, n: int, fmt: str, file: bool = True) -> str:
    """Proxmox's names: files carry their format as extension, block volumes none."""
    return f"vm-{vmid}-fleece-{n}" + (f".{fmt}" if file else "")


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def plan_image(plan: FleecingPlan, vmid: int, n: int, size: int) -> FleecingImage:
    """Name, path and sizes of image ``n`` for a disk of ``size`` bytes (nothing is created)."""
    st = plan.storage
    name = image_name(vmid, n, plan.format, st.type in FILE_TYPES)
    if st.type in FILE_TYPES:
        return FleecingImage(st.storeid, st.type, name, str(images_dir(st, vmid) / name), plan.format, size, size,
                             plan.cluster_size, plan.preallocation)
    if st.type == "lvmthin":
        volume = f"{st.vgname}/{name}"
        return FleecingImage(st.storeid, st.type, name, f"/dev/{volume}", "raw", size, _round_up(size, 1 << 20),
                             plan.cluster_size, "off", volume)
    volume = f"{st.pool}/{name}"
    return FleecingImage(st.storeid, st.type, name, f"/dev/zvol/{volume}", "raw", size,
                         _round_up(size, max(plan.cluster_size, 1 << 20)), plan.cluster_size, "off", volume)


async def image_exists(image: FleecingImage, runner: Runner = run_command) -> bool:
    if image.is_file:
        return os.path.lexists(image.path)
    try:
        if image.storage_type == "lvmthin":
            await runner(["lvs", "--noheadings", "-o", "lv_name", str(image.volume)])
        else:
            await runner(["zfs", "list", "-H", "-o", "name", str(image.volume)])
    except CommandFailed:
        return False
    return True


async def next_free_image(plan: FleecingPlan, vmid: int, size: int, taken: set[str],
                          runner: Runner = run_command) -> FleecingImage:
    """The lowest ``n`` whose image neither exists nor is in ``taken`` (names planned by this run)."""
    for n in range(MAX_IMAGES_PER_VM):
        image = plan_image(plan, vmid, n, size)
        if image.name not in taken and not await image_exists(image, runner):
            return image
    raise FleecingError(f"VM {vmid}: no free fleecing image name on storage '{plan.storeid}'")


def create_commands(image: FleecingImage, plan_blocksize: str | None = None, qemu_img: str = "qemu-img",
                    thinpool: str | None = None, sparse: bool = True) -> list[str]:
    """The command that creates ``image``."""
    if image.is_file:
        opts = f"preallocation={image.preallocation}"
        if image.format == "qcow2":
            opts += f",cluster_size={image.cluster_size}"
        return [qemu_img, "create", "-q", "-f", image.format, "-o", opts, image.path, str(image.size)]
    kib = f"{image.alloc_size // 1024}k"
    if image.storage_type == "lvmthin":
        vg = str(image.volume).split("/", 1)[0]
        return ["lvcreate", "-aly", "-V", kib, "--name", image.name, "--thinpool", f"{vg}/{thinpool}"]
    argv = ["zfs", "create"]
    if sparse:
        argv.append("-s")
    if plan_blocksize:
        argv += ["-b", plan_blocksize]
    return [*argv, "-V", kib, str(image.volume)]


async def create_image(image: FleecingImage, plan: FleecingPlan, runner: Runner = run_command,
                       qemu_img: str = "qemu-img") -> None:
    """Create the planned image (record it in the journal first)."""
    st = plan.storage
    if image.is_file:
        Path(image.path).parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(image.path):
            raise FleecingError(f"fleecing image {image.path} already exists")
    argv = create_commands(image, st.blocksize, qemu_img, st.thinpool, st.sparse)
    try:
        await runner(argv)
    except CommandFailed as exc:
        raise FleecingError(f"cannot create fleecing image {image.name} on storage '{image.storeid}':"
                            f" {exc}") from exc
    log.info("created fleecing image %s (%s, %d bytes)", image.path, image.format, image.size)


def free_commands(image: FleecingImage) -> list[str]:
    if image.storage_type == "lvmthin":
        return ["lvremove", "-f", str(image.volume)]
    return ["zfs", "destroy", "-r", str(image.volume)]


async def free_image(image: FleecingImage, runner: Runner = run_command) -> None:
    """Remove the image; one that is already gone is fine."""
    if image.is_file:
        try:
            os.unlink(image.path)
            log.info("removed fleecing image %s", image.path)
        except FileNotFoundError:
            pass
        return
    if not await image_exists(image, runner):
        return
    await runner(free_commands(image))
    log.info("removed fleecing volume %s", image.volume)


def leftover_files(directory: Path, vmid: int) -> list[Path]:
    """Fleecing files of ``vmid`` in a file storage's ``images/<vmid>`` (for cleanup without a journal)."""
    if not directory.is_dir():
        return []
    out = []
    for p in sorted(directory.iterdir()):
        m = NAME_RE.fullmatch(p.name)
        if m and int(m.group(1)) == vmid:
            out.append(p)
    return out
