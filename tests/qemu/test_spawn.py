"""A paused QEMU spawned from a guest definition: discovery sees the same keys, it is
always stopped, and after SIGKILL of its owner the next run finds and kills it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from qmpbackup.guest_config import parse_guest
from qmpbackup.qemu.discovery import discover_disks
from qmpbackup.qemu.errors import SpawnError
from qmpbackup.recovery.spawned import kill_orphans, read_records
from qmpbackup.qemu.session import QmpSession
from qmpbackup.qemu.spawn import SpawnedQemu, SpawnState
from tests.support.qemu import QemuBinaries

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def make_definition(qemu: QemuBinaries, tmp_path: Path) -> str:
    for name, fmt, size in (("root.qcow2", "qcow2", 8 * MiB), ("data.raw", "raw", 3 * MiB), ("old.raw", "raw", MiB)):
        subprocess.run([str(qemu.img), "create", "-q", "-f", fmt, str(tmp_path / name), str(size)], check=True)
    return textwrap.dedent(f"""\
        name: spawned
        agent: 1
        scsi0: {tmp_path}/root.qcow2,format=qcow2,size=8M
        virtio1: {tmp_path}/data.raw,format=raw
        sata0: {tmp_path}/old.raw,backup=0
        ide2: none,media=cdrom

        [qmpbackup]
        qemu: {qemu.system}
        """)


def qemu_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_spawn_discover_stop(qemu: QemuBinaries, tmp_path: Path) -> None:
    defn = parse_guest(make_definition(qemu, tmp_path), 300, tmp_path / "300.conf")
    state = tmp_path / "state"
    spawned = SpawnedQemu(defn, state_dir=state)
    async with spawned:
        assert spawned.state is SpawnState.RUNNING
        assert spawned.rundir is not None and (spawned.rundir.stat().st_mode & 0o777) == 0o700
        assert len(read_records(state)) == 1
        async with QmpSession("300", spawned.qmp_path) as qmp:
            assert (await qmp.execute("query-status"))["status"] == "prelaunch"
            disks = await discover_disks(qmp, "300")
        assert [(d.key, d.format, d.size, d.drive_id) for d in disks] == [
            ("scsi0", "qcow2", 8 * MiB, "drive-scsi0"),
            ("virtio1", "raw", 3 * MiB, "drive-virtio1"),
        ]
        pid = spawned.pid
        assert pid is not None and qemu_alive(pid)
    assert spawned.state.value == SpawnState.STOPPED.value
    assert not qemu_alive(pid)
    assert read_records(state) == [] and not spawned.rundir.exists()


async def test_cancelled_owner_stops_qemu(qemu: QemuBinaries, tmp_path: Path) -> None:
    """SIGINT/SIGTERM cancel the main task; leaving the block by cancellation stops QEMU."""
    defn = parse_guest(make_definition(qemu, tmp_path), 301)
    spawned = SpawnedQemu(defn, state_dir=tmp_path / "state")
    started = asyncio.Event()

    async def job() -> None:
        async with spawned:
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(job())
    await asyncio.wait_for(started.wait(), 20)
    pid = spawned.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not qemu_alive(pid)


async def test_bad_image_is_reported(qemu: QemuBinaries, tmp_path: Path) -> None:
    text = f"scsi0: {tmp_path}/missing.qcow2,format=qcow2\n[qmpbackup]\nqemu: {qemu.system}\n"
    spawned = SpawnedQemu(parse_guest(text, 302), state_dir=tmp_path / "state")
    with pytest.raises(SpawnError, match=r"VM 302: QEMU exited with 1: .*missing.qcow2"):
        await spawned.start()
    assert spawned.state is SpawnState.STOPPED
    assert read_records(tmp_path / "state") == []


async def test_relative_volume_is_refused(qemu: QemuBinaries, tmp_path: Path) -> None:
    conf = tmp_path / "303.conf"
    spawned = SpawnedQemu(parse_guest("name: x\nscsi0: local:vm-303-disk-0\n", 303, conf), state_dir=tmp_path / "s")
    with pytest.raises(SpawnError, match=rf"{conf}:2: scsi0: QEMU needs an absolute image path"):
        await spawned.start()


SPAWNER = """
import asyncio, sys
from pathlib import Path
from qmpbackup.guest_config import parse_guest
from qmpbackup.qemu.spawn import SpawnedQemu

async def main():
    tmp = Path(sys.argv[1])
    defn = parse_guest(Path(sys.argv[2]).read_text(), 310)
    async with SpawnedQemu(defn, state_dir=tmp / "state") as q:
        print(q.pid, flush=True)
        await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_sigkilled_owner_leaves_orphan_that_next_run_kills(qemu: QemuBinaries, tmp_path: Path) -> None:
    conf = tmp_path / "310.conf"
    conf.write_text(make_definition(qemu, tmp_path))
    owner = subprocess.Popen(
        [sys.executable, "-c", SPAWNER, str(tmp_path), str(conf)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    qemu_pid = 0
    try:
        assert owner.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(owner.stdout.readline), 30)
        qemu_pid = int(line)
        assert qemu_alive(qemu_pid)
        [rec] = read_records(tmp_path / "state")
        assert rec.owner_pid == owner.pid
        # While the owner lives, a second run leaves its QEMU alone.
        assert kill_orphans(tmp_path / "state") == [] and qemu_alive(qemu_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        await asyncio.sleep(0.2)
        assert qemu_alive(qemu_pid), "the orphan should survive its owner's SIGKILL"
        # The next run (here: a new spawner for another VM) finds and kills it first.
        (tmp_path / "o").mkdir()
        other = parse_guest(make_definition(qemu, tmp_path / "o"), 311)
        async with SpawnedQemu(other, state_dir=tmp_path / "state") as nxt:
            assert not qemu_alive(qemu_pid)
            assert [r.vmid for r in read_records(tmp_path / "state")] == [311]
            assert nxt.pid != qemu_pid
        assert not Path(rec.rundir).exists()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if qemu_pid and qemu_alive(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)
