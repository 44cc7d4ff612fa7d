"""SIGKILL of ``qmpbackup backup`` at every named point of a run leaves nothing behind (issue #17, Checks).

The run is held at a point with the test-only ``QMPBACKUP_TEST_HOLD`` (qmpbackup/backup/kill_points.py)
and killed with its whole process group. Then either ``qmpbackup cleanup 100`` runs (without
``--qmp`` and without a guest definition: it must find QEMU through the journal) or just the next
backup does (alternating, swapped between the QEMU versions, so every point gets both), and
everything README promises is checked: no block jobs, exports or extra nodes, the devices on their
own nodes, QEMU listening on the sockets it had and no other, only the bitmaps of
the newest good archive, no fleecing image, no ``.dat``, no run folder, no journal, no process of
ours; the next backup verifies. One paused QEMU per version serves every point (the guest's
freeze does not matter here: tests/integration/test_freeze_guard.py kills inside the window on the
real guest). The table of points is printed (``-s``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from qmpbackup.backup.incremental import bitmap_for
from qmpbackup.vma import VmaReader
from tests.fleecing.conftest import MiB, VMID, random_disk
from tests.support.backup import BackupRun, HeldRun, Monitor, dir_fleecing_storage, monitor_args, next_second
from tests.support.qemu import DriveSpec, QemuBinaries, RunningQemu

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(900)]

#: Where a run can be killed, in the order a run passes them.
POINTS_FLEECING = ["journal", "prepared", "attached", "snapshot", "started", "running", "detached", "finished",
                   "published", "teardown"]
POINTS_PLAIN = ["journal", "attached", "started", "running", "detached", "finished", "published"]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """$TMPDIR of the runs, short enough for unix socket paths in run folders."""
    path = Path(tempfile.mkdtemp(prefix="qk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", *args], capture_output=True, text=True,
                          timeout=180, env=env, check=False)


def _listening(pid: int) -> set[str]:
    return {str(c.laddr) for c in psutil.Process(pid).net_connections(kind="unix") if c.laddr and not c.raddr}


def _state(mon: Monitor, vm: RunningQemu) -> dict[str, Any]:
    nodes = mon.cmd("query-named-block-nodes", flat=True)
    return {
        "jobs": mon.cmd("query-jobs"),
        "exports": mon.cmd("query-block-exports"),
        "nodes": sorted(n["node-name"] for n in nodes),
        "devices": sorted((b.get("qdev"), (b.get("inserted") or {}).get("node-name"))
                          for b in mon.cmd("query-block")),
        "bitmaps": sorted(b["name"] for n in nodes for b in n.get("dirty-bitmaps") or () if "name" in b),
        "listening": sorted(_listening(vm.pid)),
        "status": mon.cmd("query-status")["status"],
    }


def _our_processes(marker: str) -> list[str]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if marker in cmdline and "pytest" not in cmdline:
            out.append(f"{proc.pid}: {cmdline}")
    return out


def _newest_bitmaps(run: BackupRun, keys: list[str]) -> list[str]:
    newest = run.archives()[-1]
    with open(newest, "rb") as f:
        uuid = VmaReader(f).uuid
    return sorted(bitmap_for(VMID, key, uuid) for key in keys)


@pytest.mark.parametrize("fleecing", [True, False], ids=["fleecing", "plain"])
def test_sigkill_at_every_point_leaves_nothing(qemu: QemuBinaries, qemu_vm: Any, tmp_path: Path,
                                              isolated_config: Path, short_tmp: Path, fleecing: bool) -> None:
    store = dir_fleecing_storage(isolated_config, tmp_path / "fleece")
    drives = [DriveSpec(random_disk(tmp_path / "d0.raw", 4 * MiB), bus="scsi", dev_id="scsi0"),
              DriveSpec(random_disk(tmp_path / "d1.raw", 2 * MiB, seed=2), bus="virtio", style="blockdev",
                        dev_id="virtio1", node_name="disk1")]
    keys = ["scsi0", "virtio1"]
    mon_dir = short_tmp / "mon"
    mon_dir.mkdir()
    vm: RunningQemu = qemu_vm(drives, extra_args=monitor_args(mon_dir))
    mon = Monitor(mon_dir / "monitor.sock")
    run = BackupRun(tmp_path)
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    args = ["100", "--qmp", str(vm.qmp_path), "--compress", "0"]
    if fleecing:
        args += ["--fleecing", "enabled=1,storage=fast"]
    points = POINTS_FLEECING if fleecing else POINTS_PLAIN
    journal = tmp_path / "state" / "journal" / f"{VMID}.jsonl"
    table: list[str] = []
    try:
        first = run.run(*args, env=env)
        assert first.returncode == 0, first.stderr
        good = _state(mon, vm)
        assert good["bitmaps"] == _newest_bitmaps(run, keys)
        for i, point in enumerate(points):
            # Each point is recovered by cleanup on one QEMU version and by the next backup on the other.
            recovery = ("cleanup", "next backup")[(i + (qemu.version != "7.2")) % 2]
            next_second()
            held = HeldRun(run, f"{point}=120", *args, "--bwlimit", "1024", env=env)
            try:
                held.wait_point(point)
            finally:
                held.kill()
            if recovery == "cleanup":
                r = _cli("cleanup", str(VMID), "--state-dir", str(tmp_path / "state"), env=env)
                assert r.returncode == 0, f"{point}: cleanup failed\n{r.stdout}{r.stderr}"
            else:
                next_second()
                r = run.run(*args, env=env)
                assert r.returncode == 0, f"{point}: the next backup failed\n{r.stderr}"
                assert "WARN" not in r.stderr or "left behind" in r.stderr, r.stderr
                verify = _cli("verify", str(run.archives()[-1]), env=env)
                assert verify.returncode == 0, verify.stdout + verify.stderr
                good = {**good, "bitmaps": _newest_bitmaps(run, keys)}
            now = _state(mon, vm)
            # The bitmaps kept are those of the newest archive whose run committed them: the last good
            # run's, or the killed run's when it was killed after publishing and committing.
            kept = [good["bitmaps"], _newest_bitmaps(run, keys)]
            assert now["bitmaps"] in kept, f"{point} ({recovery}): bitmaps {now['bitmaps']}, kept {kept}"
            good = {**good, "bitmaps": now["bitmaps"]}
            assert now == good, f"{point} ({recovery}): QEMU differs\n{now}\n{good}"
            assert not run.leftovers(), f"{point}: {run.leftovers()}"
            assert not any(store.rglob("vm-*")), f"{point}: fleecing image left"
            assert not list(short_tmp.glob("qmpbackup-*")), f"{point}: run folder left"
            assert not journal.exists(), f"{point}: journal left: {journal.read_text()}"
            assert not _our_processes(str(tmp_path / "state")), f"{point}: {_our_processes(str(tmp_path))}"
            table.append(f"qemu {qemu.version:5} {'fleecing' if fleecing else 'plain':8} {point:10} "
                         f"{recovery:12} held")
        next_second()  # not the name of the last point's next backup
        last = run.run(*args, env=env)
        assert last.returncode == 0, last.stderr
        assert _cli("verify", str(run.archives()[-1]), env=env).returncode == 0
    finally:
        mon.close()
        print("\n" + "\n".join(table))
