"""Fixtures for the fleecing tests: real QEMU (each version), loop-mounted filesystems, a world
of VM + QMP session + journal + dir storage."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleecing.drives import Fleecing
from fleecing.storage import FleecingPlan, fleecing_storage, plan_fleecing
from qmpbackup.jobs.storage_cfg import Storage, parse_storage_cfg
from qmpbackup.recovery.journal import Journal
from qmpbackup.qemu.capabilities import Capabilities, probe
from qmpbackup.qemu.discovery import Disk, discover_disks
from qmpbackup.qemu.session import QmpSession
from tests.support.loopfs import LoopFs, loopfs  # noqa: F401  (loop mounts, shared with tests/backup)
from tests.support.qemu import (  # noqa: F401
    DriveSpec,
    QemuBinaries,
    RunningQemu,
    pytest_runtest_makereport,
    qemu,
    qemu_vm,
)

MiB = 1 << 20
VMID = 100


def dir_storage(path: Path, storeid: str = "fleece", extra: str = "") -> Storage:
    text = f"dir: {storeid}\n\tpath {path}\n\tcontent images\n{extra}"
    return fleecing_storage(parse_storage_cfg(text, "<test storage.cfg>"), storeid)


def random_disk(path: Path, size: int, seed: int = 7) -> Path:
    with open(path, "wb") as f:
        f.write(os.urandom(size) if seed < 0 else _seeded(size, seed))
    return path


def _seeded(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


@dataclass
class World:
    vm: RunningQemu
    session: QmpSession
    caps: Capabilities
    disks: dict[str, Disk]
    journal: Journal
    qemu: QemuBinaries
    rundir: Path

    async def plan(self, storage: Storage, keys: list[str] | None = None) -> FleecingPlan:
        chosen = [self.disks[k] for k in keys or list(self.disks)]
        return await plan_fleecing(storage, [d.size for d in chosen])

    async def fleecing(self, store: Path, **options: Any) -> Fleecing:
        """Fleecing of every disk, its images on a new dir storage at ``store``: what most tests start with."""
        store.mkdir()
        plan = await self.plan(dir_storage(store))
        return Fleecing(self.session, self.journal, self.caps, VMID, list(self.disks.values()), plan,
                        rundir=self.rundir, qemu_img=str(self.qemu.img), **options)

    async def graph(self) -> dict[str, object]:
        """What a test compares: each device's node, and every node name."""
        blocks = await self.session.execute("query-block")
        nodes = await self.session.execute("query-named-block-nodes", {"flat": True})
        return {"devices": sorted((b.get("qdev"), (b.get("inserted") or {}).get("node-name")) for b in blocks),
                "nodes": sorted(n["node-name"] for n in nodes)}


WorldFactory = Callable[..., contextlib.AbstractAsyncContextManager[World]]


@pytest.fixture
def world(qemu: QemuBinaries, qemu_vm: Callable[..., RunningQemu], tmp_path: Path) -> WorldFactory:  # noqa: F811
    """``async with world([DriveSpec(...)]) as w:`` a paused VM, connected session, open journal."""

    @contextlib.asynccontextmanager
    async def factory(drives: list[DriveSpec]) -> AsyncIterator[World]:
        vm = qemu_vm(drives)
        session = QmpSession(str(VMID), vm.qmp_path)
        await session.connect()
        journal = Journal.open(tmp_path / "state" / "journal" / f"{VMID}.jsonl")
        try:
            caps = await probe(session)
            disks = {d.key: d for d in await discover_disks(session, str(VMID))}
            yield World(vm, session, caps, disks, journal, qemu, vm.rundir)
        finally:
            journal.close()
            await session.close()

    return factory


