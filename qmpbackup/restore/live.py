"""``qmpbackup restore --live``: the VM runs at once while its disks fill in the background.

Order of work:

1. plan as a normal restore (names, definition rewrite, refusals); every image is qcow2;
2. serve the archive's devices read-only over NBD on ``<run-dir>/live-restore/<vmid>/nbd.sock``
   (random access through the archive's index: a non-seekable archive is refused up front);
3. create each image **empty**, its backing the device's export (a ``json:`` NBD backing with
   ``reconnect-delay``), publish images and definition;
4. start the VM (the definition's ``start:`` command, else ``qmpbackup start``'s builder), and
   copy every disk while it runs (:mod:`qmpbackup.restore.live_copy`: one mirror job per disk);
   guest reads of what is not copied yet come from the archive;
5. when every job completed, the images have no backing; the export ends.

From the VM's start until the copy is done, ``<run-dir>/live-restore/<vmid>/state.json``
(:mod:`qmpbackup.restore.live_state`) says what ``--resume`` needs; a copy that fails pauses the
VM, deletes nothing and keeps that state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

from qmpbackup.compress import open_decompressor
from qmpbackup.errors import UsageError
from qmpbackup.guest_config import GuestDefinition, check_vmid, guest_path
from qmpbackup.nbd import Export, NbdServer
from qmpbackup.qemu.session import QmpSession
from qmpbackup.qemu.vm_runner import start_vm
from qmpbackup.restore.errors import RestoreError
from qmpbackup.restore.guest import read_existing, start_guest
from qmpbackup.restore.live_state import (
    PAUSED_FILE, STATE_FILE, LiveState, Target, interrupted_live_restore, live_folder, resume_command,
    write_state,
)
from qmpbackup.restore.live_copy import TARGET_SUFFIX, ReadFailures, copy_disks, inserted_by_device
from qmpbackup.restore.placement import TEMP_SUFFIX, ImagePlan, work_name
from qmpbackup.restore.qcow2 import create_qcow2
from qmpbackup.restore.publish import publish, signals_held
from qmpbackup.restore.phases import (
    RestoreOptions, log_header, make_dirs, plan_restore, refuse_existing, remove_leftovers, remove_work_files,
    restore_lock, write_definition_temp,
)
from qmpbackup.vma.random_access import ArchiveDevices
from qmpbackup.vma.reader import VmaReader

log = logging.getLogger(__name__)

RECONNECT_DELAY_S = 60


def _backing(socket: Path, export: str) -> str:
    spec = {"driver": "raw", "file": {"driver": "nbd", "export": export, "reconnect-delay": RECONNECT_DELAY_S,
                                      "server": {"type": "unix", "path": str(socket)}}}
    return "json:" + json.dumps(spec, separators=(",", ":"))


async def _devices_of(session: QmpSession, images: dict[str, ImagePlan]) -> dict[str, ImagePlan]:
    """QEMU's device (or node) name of each image, found by its file name."""
    found: dict[str, ImagePlan] = {}
    by_path = {str(p.final.resolve()): p for p in images.values()}
    for name, inserted in (await inserted_by_device(session)).items():
        plan = by_path.get(str(Path(inserted.get("file", "")).resolve())) if inserted.get("file") else None
        if plan is None:
            image = inserted.get("image") or {}
            plan = by_path.get(str(Path(image.get("filename", "/")).resolve()))
        if plan is not None:
            found[name] = plan
    missing = [str(p.final) for p in images.values() if p not in found.values()]
    if missing:
        raise RestoreError(f"the started VM does not use {', '.join(missing)}: its start command must open "
                           "the images the restored definition names")
    return found


@contextlib.asynccontextmanager
async def _served(archive: Path, socket: Path, failures: ReadFailures) -> AsyncIterator[dict[str, str]]:
    """The archive's devices as NBD exports; yields device name -> export name."""
    with ArchiveDevices.open(archive) as devices:
        exports = [Export(d.name, d.size, source=failures.watch(d)) for d in devices.devices]
        async with NbdServer(socket, exports, name="live-restore", keep_serving=True):
            yield {d.name: d.name for d in devices.devices}


async def live_restore(opts: RestoreOptions, run_dir: Path) -> GuestDefinition:
    """Restore ``opts.archive`` as VM ``opts.vmid`` with the VM running from the start."""
    opts = replace(opts, vmid=check_vmid(opts.vmid))
    if opts.archive == "-":
        raise UsageError("--live needs an archive file (it is read at random), not standard input")
    if opts.image_format == "raw":
        raise UsageError("--live writes qcow2 images (raw images cannot hold the archive as backing): "
                         "drop --format raw, or use a dir/nfs/cifs/btrfs storage")
    opts = replace(opts, image_format="qcow2")
    archive = Path(opts.archive)
    def_path = guest_path(opts.config_dir, opts.vmid)
    folder = live_folder(run_dir, opts.vmid)
    socket = folder / "nbd.sock"
    with restore_lock(opts.config_dir, opts.vmid):
        existing = read_existing(opts.config_dir, opts.vmid)
        log.info("live restore of vma archive: %s", opts.archive)
        with open(archive, "rb") as raw:
            stream = open_decompressor(raw)
            try:  # the header only: the rest is read at random through the index
                reader = VmaReader(stream)
                log_header(reader)
                plan = plan_restore(reader, opts, existing, def_path)
            finally:
                stream.abort()
        not_qcow2 = [str(p.final) for p in plan.images if p.format != "qcow2"]
        if not_qcow2:
            raise UsageError(f"--live needs qcow2 images, and this storage makes raw ones ({not_qcow2[0]}): "
                             "restore to a dir/nfs/cifs/btrfs storage or --target-dir")
        refuse_existing(opts, existing, plan.images)
        remove_leftovers(plan.images, def_path)
        for p in plan.images:  # an earlier live restore's unfinished copy
            work_name(p.final, TARGET_SUFFIX).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, mode=0o700)
        failures = ReadFailures()
        with _interrupted_kept(run_dir, opts.vmid):
            async with _served(archive, socket, failures) as exports:
                _publish_overlays(plan.images, plan.text, def_path, socket, exports, opts)
                await _run_vm_and_copy(plan.definition, plan.images, opts, run_dir, folder, failures)
    log.info("restored VM %d: %s", opts.vmid, def_path)
    return plan.definition


def _publish_overlays(images: list[ImagePlan], text: str, def_path: Path, socket: Path, exports: dict[str, str],
                      opts: RestoreOptions) -> None:
    work = [p.temp for p in images] + [work_name(def_path, TEMP_SUFFIX)]
    created: list[Path] = []
    try:
        created = make_dirs(images, opts)
        for p in images:
            log.info("map '%s' to '%s' (qcow2 over the archive's %s)", p.virtdev, p.final, p.mapped.device.name)
            create_qcow2(p.temp, p.size, backing=_backing(socket, exports[p.mapped.device.name]))
        def_temp = write_definition_temp(def_path, text)
        publish([*((p.temp, p.final) for p in images), (def_temp, def_path)], replace=opts.force)
    except BaseException:
        with signals_held():
            remove_work_files(work, created)
        raise


async def _run_vm_and_copy(defn: GuestDefinition, images: list[ImagePlan], opts: RestoreOptions,
                           run_dir: Path, folder: Path, failures: ReadFailures) -> None:
    started = time.monotonic()
    if defn.reach.start:
        await start_guest(defn)  # QEMU opens its backing from our loop meanwhile
        qmp = defn.reach.qmp
        if qmp is None:
            raise RestoreError(f"VM {defn.vmid}: --live needs the VM's QMP socket ('qmp:' in [qmpbackup])")
    else:
        qmp = (await asyncio.to_thread(start_vm, defn, run_dir)).qmp
    log.info("VM %d started; copying its disks in the background", defn.vmid)
    async with QmpSession(defn.vmid, qmp) as session:
        found = await _devices_of(session, {p.virtdev: p for p in images})
        drives = {d.key: d for d in defn.disks}
        devices = {d: Target(p.final, p.size, p.mapped.device.name,
                             p.virtdev in drives and drives[p.virtdev].option("discard") == "on")
                   for d, p in found.items()}
        speed = opts.bwlimit_kib * 1024 // max(len(devices), 1)
        write_state(folder, LiveState(Path(opts.archive).resolve(), qmp, speed, devices))
        await copy_disks(session, devices, speed, started, failures, folder / PAUSED_FILE)
    log.info("the VM was up %d seconds before the copy finished", time.monotonic() - started)


@contextlib.contextmanager
def _interrupted_kept(run_dir: Path, vmid: int) -> Iterator[None]:
    """Removes the run folder when the restore finished, or failed before its VM ran; keeps the
    state of one whose VM runs (paused after a failed copy) for ``--resume``."""
    folder = live_folder(run_dir, vmid)
    try:
        yield
    except BaseException:
        (folder / "nbd.sock").unlink(missing_ok=True)
        if not (folder / STATE_FILE).exists():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            paused = " and the VM is paused" if (folder / PAUSED_FILE).exists() else ""
            log.warning("the live restore of VM %d is interrupted%s; finish it with: %s", vmid, paused,
                        resume_command(vmid, run_dir))
        raise
    shutil.rmtree(folder, ignore_errors=True)


async def resume_live_restore(vmid: int, config_dir: Path, run_dir: Path) -> None:
    """Serve the archive again for a live restore whose qmpbackup died (or whose copy failed), and
    see its copy to the end.

    QEMU's NBD client waits ``RECONNECT_DELAY_S`` for the export: resumed within that, the guest
    sees a delay, not an I/O error.
    """
    vmid = check_vmid(vmid)
    folder = live_folder(run_dir, vmid)
    with restore_lock(config_dir, vmid):
        state = interrupted_live_restore(vmid, run_dir)
        if state is None:
            raise UsageError(f"no live restore of VM {vmid} to resume in {folder}")
        (folder / "nbd.sock").unlink(missing_ok=True)
        started = time.monotonic()
        log.info("resuming the live restore of VM %d from %s", vmid, state.archive)
        failures = ReadFailures()
        with _interrupted_kept(run_dir, vmid):
            async with (_served(state.archive, folder / "nbd.sock", failures),
                        QmpSession(vmid, state.qmp) as session):
                # a VM we paused (failed copy, or a pivot) runs again once copy_disks has given each
                # finished copy the image's name: not before, or a guest write could reach a copy
                # whose name is still the overlay's
                await copy_disks(session, state.devices, state.speed, started, failures, folder / PAUSED_FILE)
    log.info("live restore of VM %d finished", vmid)
