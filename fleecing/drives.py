"""Fleecing for all drives of one backup, in the order a backup run calls it (:mod:`fleecing.feature`).

::

    fl = Fleecing(session, journal, caps, vmid, disks, plan, rundir=...)
    await fl.prepare()            # before the freeze: images, fleece nodes, filters
    fl.sources()                  # the block jobs read the snapshot nodes
    # our endpoint's export consumers: fl.consumer(key, assembler) (TRIM path on 7.2)
    # inside the freeze window, right before the block jobs' transaction:
    await fl.insert()             # the point in time (qom-set), snapshot nodes, 7.2's TRIM path
    fl.job_extra()                # block job arguments: discard-source where QEMU has it
    await fl.teardown()           # after the block jobs are gone (cancelled or dismissed)

The TRIM path must be up *before* the block jobs start: adding a node drains all I/O, and with
a job writing into a slow target that drain lasts until the target took every request in
flight (1.5 s measured at 10 MiB/s), stalling QMP and the guest's I/O meanwhile.

Everything is journaled; :mod:`qmpbackup.recovery.steps` replays it after a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fleecing.errors import FleecingError, SnapshotBrokenError
from fleecing.graph import DriveFleecing, check_capabilities
from fleecing.images import next_free_image
from fleecing.reclaim import QemuNbdServer, ReclaimingConsumer, TrimReclaimer, job_extra, needs_trim_path
from fleecing.runner import Runner, run_command
from fleecing.storage import FleecingPlan
from qmpbackup.nbd.errors import NbdError
from qmpbackup.recovery.journal import Journal
from qmpbackup.nbd.export import ExportConsumer
from qmpbackup.qemu.capabilities import Capabilities
from qmpbackup.qemu.discovery import Disk
from qmpbackup.qemu.errors import QmpCommandError
from qmpbackup.qemu.session import QmpSession

log = logging.getLogger(__name__)


class Fleecing:
    """The fleecing graphs of one backup (one per drive) and the 7.2 reclaim path."""

    def __init__(self, session: QmpSession, journal: Journal, caps: Capabilities, vmid: int,
                 disks: Sequence[Disk], plan: FleecingPlan, *, rundir: Path, runner: Runner = run_command,
                 qemu_img: str = "qemu-img", bitmaps: Mapping[str, Mapping[str, str]] | None = None,
                 reclaim: bool = True) -> None:
        check_capabilities(caps)
        self.session, self.journal, self.caps, self.vmid = session, journal, caps, vmid
        self.disks = list(disks)
        self.plan = plan
        self.rundir = rundir
        self.runner, self.qemu_img = runner, qemu_img
        self.bitmaps = dict(bitmaps or {})
        self.reclaim = reclaim
        self.drives: dict[str, DriveFleecing] = {}
        self.reclaimers: dict[str, TrimReclaimer] = {}
        self._server: QemuNbdServer | None = None
        self._trim_pending = reclaim and needs_trim_path(caps)
        #: Things the task log should say (the backup goes on).
        self.warnings: list[str] = list(plan.warnings)

    async def prepare(self) -> None:
        taken: set[str] = set()
        for disk in self.disks:
            image = await next_free_image(self.plan, self.vmid, disk.size, taken, self.runner)
            taken.add(image.name)
            drive = DriveFleecing(self.session, self.journal, self.caps, self.vmid, disk, image, self.plan,
                                  runner=self.runner, qemu_img=self.qemu_img, bitmap=self.bitmaps.get(disk.key))
            self.drives[disk.key] = drive
            await drive.prepare()

    async def insert(self, start_reclaim: bool = True) -> None:
        """The snapshot point for every drive (one after the other, inside the freeze window)."""
        for drive in self.drives.values():
            await drive.insert()
        if start_reclaim:
            await self.start_reclaim()

    async def start_reclaim(self) -> None:
        """On QEMU without ``discard-source``: the TRIM path. Only before the jobs start (see above)."""
        if not self._trim_pending:
            return
        try:
            await self._start_trim_path()
        finally:
            self._trim_pending = False

    async def _start_trim_path(self) -> None:
        server = QemuNbdServer(self.session, self.journal, self.rundir / "reclaim.sock")
        try:
            await server.start()
        except FleecingError as exc:  # e.g. the VM runs an NBD server of its own: back up without reclaim
            self._warn(f"fleecing space is not reclaimed during the backup: {exc}")
            return
        self._server = server
        for key, drive in self.drives.items():
            reclaimer = TrimReclaimer(drive, server)
            try:
                await reclaimer.start()
            except (FleecingError, NbdError, QmpCommandError) as exc:
                self._warn(f"drive {key}: fleecing space is not reclaimed during the backup: {exc}")
                await reclaimer.close()
                continue
            self.reclaimers[key] = reclaimer

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def sources(self) -> list[tuple[str, str, int]]:
        """``(key, node the block job reads, size)`` per drive."""
        return [(key, d.read_node, d.disk.size) for key, d in self.drives.items()]

    def job_extra(self) -> dict[str, dict[str, Any]]:
        """Per drive key: extra ``blockdev-backup`` arguments."""
        return {key: job_extra(self.caps, d.image.cluster_size) for key, d in self.drives.items()}

    def consumer(self, key: str, inner: ExportConsumer) -> ExportConsumer:
        """Wrap drive ``key``'s export consumer so that received ranges are trimmed (7.2)."""
        return ReclaimingConsumer(inner, lambda: self.reclaimers.get(key))

    def explain(self, key: str, job_error: str) -> str:
        """A user message for a failed job: a broken snapshot reads as EACCES."""
        if "Permission denied" in job_error:
            where = self.plan.storeid
            return (f"drive {key}: the fleecing image on storage '{where}' could not keep the old data"
                    " (storage full, or slower than cbw-timeout): snapshot broken, guest writes were not"
                    " affected")
        return f"drive {key}: {job_error}"

    def broken(self, key: str, job_error: str) -> SnapshotBrokenError:
        return SnapshotBrokenError(self.explain(key, job_error))

    async def teardown(self) -> None:
        """Reclaim path first, then each drive's graph in reverse; raises the first failure."""
        first: BaseException | None = None
        for reclaimer in reversed(list(self.reclaimers.values())):
            try:
                await reclaimer.close()
            except Exception as exc:
                log.warning("closing %r: %s", reclaimer, exc)
                first = first or exc
        if self._server is not None:
            try:
                await self._server.stop()
            except Exception as exc:
                first = first or exc
        for drive in reversed(list(self.drives.values())):
            try:
                await drive.teardown()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first
