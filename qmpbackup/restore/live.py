"""``qmpbackup restore --live``: the VM runs at once while its disks fill in the background.

Order of work:

1. plan as a normal restore (names, definition rewrite, refusals); every image is qcow2;
2. serve the archive's devices read-only over NBD on ``<run-dir>/live-restore/<vmid>/nbd.sock``
   (random access through the archive's index: a non-seekable archive is refused up front);
3. create each image **empty**, its backing the device's export (a ``json:`` NBD backing with
   ``reconnect-delay``), publish images and definition;
4. start the VM (the definition's ``start:`` command, else ``qmpbackup start``'s builder), and
   run one ``block-stream`` job per disk: it copies every cluster the guest has not written
   yet into the image; guest reads of what is not copied yet come from the archive;
5. when every job completed, the images have no backing; the export ends.

A stream job that fails (a damaged cluster reads as an I/O error) pauses the VM instead of
letting it run on half a disk: nothing is deleted, and the error names the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from qmpbackup.compress import open_decompressor
from qmpbackup.errors import QmpBackupError, UsageError
from qmpbackup.guest_config import GuestDefinition, check_vmid, guest_path
from qmpbackup.nbd import Export, NbdServer
from qmpbackup.qemu.session import QmpSession
from qmpbackup.qemu.vm_runner import start_vm
from qmpbackup.qemu_img import failure_detail, run_qemu_img
from qmpbackup.restore.errors import RestoreError
from qmpbackup.restore.guest import read_existing, start_guest
from qmpbackup.restore.placement import TEMP_SUFFIX, ImagePlan, work_name
from qmpbackup.restore.publish import publish, signals_held
from qmpbackup.restore.phases import (
    RestoreOptions, log_header, make_dirs, plan_restore, refuse_existing, remove_leftovers, remove_work_files,
    restore_lock, write_definition_temp,
)
from qmpbackup.vma.random_access import ArchiveDevices
from qmpbackup.vma.reader import VmaReader

log = logging.getLogger(__name__)

RECONNECT_DELAY_S = 60
PROGRESS_EVERY_S = 10.0
JOB_PREFIX = "live-restore-"


def _backing(socket: Path, export: str) -> str:
    spec = {"driver": "raw", "file": {"driver": "nbd", "export": export, "reconnect-delay": RECONNECT_DELAY_S,
                                      "server": {"type": "unix", "path": str(socket)}}}
    return "json:" + json.dumps(spec, separators=(",", ":"))


def _create_overlay(plan: ImagePlan, socket: Path, export: str) -> None:
    proc = run_qemu_img(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", _backing(socket, export),
                         str(plan.temp), str(plan.size)], timeout=60, what=f"creating {plan.temp}",
                        error=RestoreError)
    if proc.returncode != 0:
        raise RestoreError(f"creating {plan.temp}: {failure_detail(proc)}")


async def _devices_of(session: QmpSession, images: dict[str, ImagePlan]) -> dict[str, ImagePlan]:
    """QEMU's device (or node) name of each image, found by its file name."""
    found: dict[str, ImagePlan] = {}
    by_path = {str(p.final.resolve()): p for p in images.values()}
    for dev in await session.execute("query-block"):
        inserted = dev.get("inserted") or {}
        name = dev.get("device") or inserted.get("node-name")
        plan = by_path.get(str(Path(inserted.get("file", "")).resolve())) if inserted.get("file") else None
        if plan is None:
            image = inserted.get("image") or {}
            plan = by_path.get(str(Path(image.get("filename", "/")).resolve()))
        if plan is not None and name:
            found[name] = plan
    missing = [str(p.final) for p in images.values() if p not in found.values()]
    if missing:
        raise RestoreError(f"the started VM does not use {', '.join(missing)}: its start command must open "
                           "the images the restored definition names")
    return found


async def _stream(session: QmpSession, devices: dict[str, ImagePlan], speed: int, started: float) -> None:
    """One block-stream job per disk (a job still there from a killed run is resumed); progress lines;
    the VM paused when a job fails."""
    async with session.events(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"]) as events:
        running = {j["device"]: j for j in await session.execute("query-block-jobs")}
        backed = {dev.get("device") or (dev.get("inserted") or {}).get("node-name")
                  for dev in await session.execute("query-block")
                  if (dev.get("inserted") or {}).get("backing_file")}
        pending = set()
        for device in devices:
            job = JOB_PREFIX + device
            if job in running:
                if running[job].get("status") == "paused" or running[job].get("paused"):
                    await session.execute("block-job-resume", {"device": job})
                pending.add(job)
            elif device in backed:
                args: dict[str, object] = {"job-id": job, "device": device, "on-error": "stop"}
                if speed:
                    args["speed"] = speed
                await session.execute("block-stream", args)
                pending.add(job)
        total = sum(p.size for p in devices.values())
        last = time.monotonic()
        while pending:
            try:
                event = await events.wait_for(lambda e: e["data"].get("device") in pending, PROGRESS_EVERY_S)
            except (TimeoutError, QmpBackupError):
                event = None
            if event is not None:
                job = event["data"]["device"]
                if event["event"] == "BLOCK_JOB_ERROR" or event["data"].get("error"):
                    await _pause(session)
                    reason = event["data"].get("error") or event["data"].get("operation", "I/O") + " error"
                    raise RestoreError(f"live restore of {job.removeprefix(JOB_PREFIX)} failed: {reason}; "
                                       "the VM is paused, nothing was deleted")
                pending.discard(job)
            if time.monotonic() - last >= PROGRESS_EVERY_S or not pending:
                last = time.monotonic()
                jobs = {j["device"]: j for j in await session.execute("query-block-jobs")}
                done = sum(devices[d].size if JOB_PREFIX + d not in jobs else jobs[JOB_PREFIX + d]["offset"]
                           for d in devices)
                log.info("progress %d%% (copied %d of %d bytes, duration %d sec)", done * 100 // max(total, 1),
                         done, total, time.monotonic() - started)


async def _pause(session: QmpSession) -> None:
    with contextlib.suppress(QmpBackupError):
        await session.execute("stop")


@contextlib.asynccontextmanager
async def _served(archive: Path, socket: Path) -> AsyncIterator[dict[str, str]]:
    """The archive's devices as NBD exports; yields device name -> export name."""
    with ArchiveDevices.open(archive) as devices:
        exports = [Export(d.name, d.size, source=d) for d in devices.devices]
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
    folder = run_dir / "live-restore" / str(opts.vmid)
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
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, mode=0o700)
        try:
            async with _served(archive, socket) as exports:
                _publish_overlays(plan.images, plan.text, def_path, socket, exports, opts)
                await _run_vm_and_stream(plan.definition, plan.images, opts, run_dir, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
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
            _create_overlay(p, socket, exports[p.mapped.device.name])
        def_temp = write_definition_temp(def_path, text)
        publish([*((p.temp, p.final) for p in images), (def_temp, def_path)], replace=opts.force)
    except BaseException:
        with signals_held():
            remove_work_files(work, created)
        raise


async def _run_vm_and_stream(defn: GuestDefinition, images: list[ImagePlan], opts: RestoreOptions,
                             run_dir: Path, folder: Path) -> None:
    started = time.monotonic()
    if defn.reach.start:
        await asyncio.to_thread(start_guest, defn)  # QEMU opens its backing from our loop meanwhile
        qmp = defn.reach.qmp
        if qmp is None:
            raise RestoreError(f"VM {defn.vmid}: --live needs the VM's QMP socket ('qmp:' in [qmpbackup])")
    else:
        qmp = (await asyncio.to_thread(start_vm, defn, run_dir)).qmp
    log.info("VM %d started; copying its disks in the background", defn.vmid)
    async with QmpSession(defn.vmid, qmp) as session:
        devices = await _devices_of(session, {p.virtdev: p for p in images})
        speed = opts.bwlimit_kib * 1024 // max(len(devices), 1)
        _write_state(folder, Path(opts.archive).resolve(), qmp, devices, speed)
        await _stream(session, devices, speed, started)
    log.info("the VM was up %d seconds before the copy finished", time.monotonic() - started)


def _write_state(folder: Path, archive: Path, qmp: Path, devices: dict[str, ImagePlan], speed: int) -> None:
    """What ``--resume`` needs after this process died: the archive, the VM's QMP socket, the jobs."""
    state = {"archive": str(archive), "qmp": str(qmp), "speed": speed,
             "devices": {d: {"image": str(p.final), "size": p.size} for d, p in devices.items()}}
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / "state.json")


async def resume_live_restore(vmid: int, run_dir: Path) -> None:
    """Serve the archive again for a live restore whose qmpbackup died, and see its copy to the end.

    QEMU's NBD client waits ``RECONNECT_DELAY_S`` for the export: resumed within that, the guest
    sees a delay, not an I/O error.
    """
    vmid = check_vmid(vmid)
    folder = run_dir / "live-restore" / str(vmid)
    try:
        state = json.loads((folder / "state.json").read_text())
        archive, qmp, speed = Path(state["archive"]), Path(state["qmp"]), int(state["speed"])
        images = {d: (Path(v["image"]), int(v["size"])) for d, v in state["devices"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"no live restore of VM {vmid} to resume in {folder}") from exc
    (folder / "nbd.sock").unlink(missing_ok=True)
    started = time.monotonic()
    log.info("resuming the live restore of VM %d from %s", vmid, archive)
    try:
        async with _served(archive, folder / "nbd.sock"), QmpSession(vmid, qmp) as session:
            devices = {d: _ResumedImage(path, size) for d, (path, size) in images.items()}
            await _stream(session, devices, speed, started)  # type: ignore[arg-type]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    log.info("live restore of VM %d finished", vmid)


class _ResumedImage:
    """The two facts of an ImagePlan that the copy needs, read back from the state file."""

    def __init__(self, final: Path, size: int) -> None:
        self.final = final
        self.size = size
