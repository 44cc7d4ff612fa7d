"""Crash safety: SIGKILL a process that built the fleecing graph, then ``qmpbackup cleanup``
restores the original graph and removes the fleecing files (from the journal, or by name
when the journal is gone, or files only when QEMU is gone too)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest

from qmpbackup.qemu.session import QmpSession
from tests.fleecing.conftest import MiB, VMID, random_disk
from tests.support.qemu import ROOT, DriveSpec, QemuBinaries, RunningQemu

pytestmark = pytest.mark.qemu

BUILDER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from fleecing.drives import Fleecing
    from fleecing.storage import fleecing_storage, plan_fleecing
    from qmpbackup.jobs.storage_cfg import load_storage_cfg
    from qmpbackup.recovery.journal import Journal
    from qmpbackup.qemu.capabilities import probe
    from qmpbackup.qemu.discovery import discover_disks
    from qmpbackup.qemu.session import QmpSession
    from qmpbackup.recovery.replay import qemu_instance

    async def main(sock, state, config, rundir, qemu_img):
        session = QmpSession("100", sock)
        await session.connect()
        journal = Journal.open(Path(state) / "journal" / "100.jsonl")
        journal.bind(qemu_instance(session))  # as the backup does
        caps = await probe(session)
        disks = await discover_disks(session, "100")
        storage = fleecing_storage(load_storage_cfg(Path(config)), "fleece")
        plan = await plan_fleecing(storage, [d.size for d in disks])
        fl = Fleecing(session, journal, caps, 100, disks, plan, rundir=Path(rundir), qemu_img=qemu_img)
        await fl.prepare()
        await fl.insert()
        print("READY", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main(*sys.argv[1:]))
""")


async def _graph(sock: Path) -> dict[str, Any]:
    async with QmpSession(str(VMID), sock) as s:
        blocks = await s.execute("query-block")
        nodes = await s.execute("query-named-block-nodes", {"flat": True})
        exports = await s.execute("query-block-exports")
        pid = s.peer_pid()
    assert pid is not None
    listening = {str(c.laddr) for c in psutil.Process(pid).net_connections(kind="unix") if c.laddr and not c.raddr}
    return {"devices": sorted((b.get("qdev"), (b.get("inserted") or {}).get("node-name")) for b in blocks),
            "nodes": sorted(n["node-name"] for n in nodes), "exports": exports, "listening": sorted(listening)}


def graph(sock: Path) -> dict[str, Any]:
    return asyncio.run(_graph(sock))


def build_and_kill(vm: RunningQemu, state: Path, config: Path, qemu: QemuBinaries) -> Path:
    """Run BUILDER against ``vm`` and SIGKILL it once the graph is built; returns its run folder
    (named as the backup names it, so cleanup recognises QEMU's NBD server socket in it)."""
    rundir = Path(tempfile.mkdtemp(prefix=f"qmpbackup-{VMID}-", dir="/tmp"))
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(vm.qmp_path), str(state), str(config), str(rundir), str(qemu.img)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert builder.stdout is not None
        assert builder.stdout.readline().strip() == "READY", builder.stderr.read() if builder.stderr else ""
    finally:
        builder.send_signal(signal.SIGKILL)
        builder.wait(10)
    return rundir


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("journal", ["journal", "journal-only", "no-journal", "torn-journal", "qemu-gone",
                                     "vm-restarted"])
def test_cleanup_after_sigkill(qemu: QemuBinaries, qemu_vm: Any, tmp_path: Path, isolated_config: Path,
                               journal: str) -> None:
    """A process that built the fleecing graph (and, on QEMU 7.2, started QEMU's NBD server for the
    TRIM path in a run folder) is killed; then ``cleanup`` finds the VM's QEMU through the guest
    definition, through the journal alone (no --qmp, no guest definition), or through --qmp without
    a journal (by name), with half a journal (by name, then the journal again), after QEMU died, or
    after the VM was restarted (its entries are of a QEMU that is gone)."""
    store = tmp_path / "store"
    store.mkdir()
    (isolated_config / "storage.cfg").write_text(f"dir: fleece\n\tpath {store}\n\tcontent images\n")
    drives = [DriveSpec(random_disk(tmp_path / "d0.raw", 8 * MiB), bus="scsi", dev_id="scsi0"),
              DriveSpec(random_disk(tmp_path / "d1.raw", 4 * MiB, seed=2), bus="virtio", style="blockdev",
                        dev_id="virtio1", node_name="disk1")]
    vm: RunningQemu = qemu_vm(drives)
    original = graph(vm.qmp_path)
    state = tmp_path / "state"
    rundir = build_and_kill(vm, state, isolated_config, qemu)
    images = sorted((store / "images" / str(VMID)).iterdir())
    assert [p.name for p in images] == [f"vm-{VMID}-fleece-0.qcow2", f"vm-{VMID}-fleece-1.qcow2"]
    built = graph(vm.qmp_path)
    assert built["devices"] != original["devices"]
    jpath = state / "journal" / f"{VMID}.jsonl"
    assert jpath.exists()
    if journal == "no-journal":
        jpath.unlink()
    if journal == "torn-journal":  # the entries of the device's filter are lost: the replay alone fails
        lines = jpath.read_text().splitlines()
        jpath.write_text("".join(f"{line}\n" for line in lines if '"drive-filter"' not in line))
    if journal in ("qemu-gone", "vm-restarted"):
        vm.kill()
    if journal == "vm-restarted":
        vm = qemu_vm(drives, name="vm2")
        original = graph(vm.qmp_path)
    if journal == "journal":  # the socket from the guest definition's [qmpbackup] qmp
        (isolated_config / "guests").mkdir()
        (isolated_config / "guests" / f"{VMID}.conf").write_text(f"name: t\n\n[qmpbackup]\nqmp: {vm.qmp_path}\n")
        where = []
    elif journal == "journal-only":  # no guest definition, no --qmp: the socket the journal recorded
        where = []
    else:
        where = ["--qmp", str(vm.qmp_path)]
    result = cli("cleanup", str(VMID), "--state-dir", str(state), *where, "--output-format", "json")
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(result.stdout)["vms"][0]
    assert report["failures"] == []
    assert report["qemu"] is (journal != "qemu-gone")
    assert not any(p.exists() for p in images)
    assert not jpath.exists()
    if journal in ("qemu-gone", "vm-restarted"):
        assert any("that is gone" in line for line in report["actions"]), report
    if journal != "qemu-gone":
        assert graph(vm.qmp_path) == original
    shutil.rmtree(rundir, ignore_errors=True)
    again = cli("cleanup", str(VMID), "--state-dir", str(state), "--qmp", str(vm.qmp_path))
    assert again.returncode == 0 and "nothing to clean up" in again.stdout, again.stderr


def test_cleanup_usage_errors(tmp_path: Path) -> None:
    r = cli("cleanup", "--qmp", "/x")
    assert r.returncode == 2 and "--qmp needs a VMID" in r.stderr and "Traceback" not in r.stderr
    r = cli("cleanup", "abc", "--state-dir", str(tmp_path))
    assert r.returncode == 2 and "not a whole number" in r.stderr
    r = cli("cleanup", "--state-dir", str(tmp_path))
    assert r.returncode == 0 and r.stdout == ""


def test_cleanup_leaves_a_running_backup_alone(tmp_path: Path) -> None:
    from qmpbackup.recovery import kinds
    from qmpbackup.recovery.instance import QemuInstance
    from qmpbackup.recovery.journal import Journal

    state = tmp_path / "state"
    qemu = subprocess.Popen(["sleep", "60"])  # stands in for the VM's QEMU
    with Journal.open(state / "journal" / f"{VMID}.jsonl") as j:  # a backup holds the lock
        j.bind(QemuInstance.of(qemu.pid, str(tmp_path / "none.sock")))
        j.record(kinds.BLOCKDEV, node="qmpbackup-100-scsi0-cbw")
        r = cli("cleanup", str(VMID), "--state-dir", str(state), "--qmp", str(tmp_path / "none.sock"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "is a backup of VM 100 running?" in r.stdout + r.stderr
    r = cli("cleanup", "--state-dir", str(state))  # its QEMU runs but cannot be reached: kept
    assert r.returncode == 1 and "kept 1 journal entry" in r.stdout and "cannot be reached" in r.stdout, r.stderr
    qemu.kill()
    qemu.wait()
    r = cli("cleanup", "--state-dir", str(state))  # QEMU gone: the node went with it
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"dropped 1 journal entry of QEMU pid {qemu.pid}" in r.stdout
    assert not (state / "journal" / f"{VMID}.jsonl").exists()


def test_cleanup_kills_orphaned_spawned_qemu(tmp_path: Path) -> None:
    from qmpbackup.recovery.spawned import ProcessRecord, process_create_time, write_record

    state = tmp_path / "state"
    owner = subprocess.Popen(["true"])
    owner_time = process_create_time(owner.pid) or 0.0
    owner.wait()  # the run that spawned it is gone
    orphan = subprocess.Popen(["sleep", "60"])  # stands in for the spawned QEMU
    try:
        created = process_create_time(orphan.pid)
        assert created is not None
        write_record(state, ProcessRecord(VMID, orphan.pid, created, owner.pid, owner_time,
                                          str(tmp_path / "qmpbackup-x")))
        r = cli("cleanup", "--state-dir", str(state))
        assert r.returncode == 0, r.stderr
        assert f"killed orphaned QEMU pid {orphan.pid} of VM {VMID}" in r.stdout
        assert orphan.wait(10) == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_cleanup_keeps_everything_of_a_running_qemu_it_cannot_reach(qemu: QemuBinaries, qemu_vm: Any,
                                                                    tmp_path: Path, isolated_config: Path) -> None:
    """QEMU runs but its QMP socket is held by another client: nothing is taken for gone, no fleecing
    file is deleted, the journal stays and cleanup says why (exit 1); once QEMU answers, it all goes."""
    store = tmp_path / "store"
    store.mkdir()
    (isolated_config / "storage.cfg").write_text(f"dir: fleece\n\tpath {store}\n\tcontent images\n")
    vm: RunningQemu = qemu_vm([DriveSpec(random_disk(tmp_path / "d0.raw", 4 * MiB), bus="scsi", dev_id="scsi0")])
    original = graph(vm.qmp_path)
    state = tmp_path / "state"
    rundir = build_and_kill(vm, state, isolated_config, qemu)
    jpath = state / "journal" / f"{VMID}.jsonl"
    images = sorted((store / "images" / str(VMID)).iterdir())
    built = graph(vm.qmp_path)
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(str(vm.qmp_path))  # QMP serves one client at a time
    try:
        r = cli("cleanup", str(VMID), "--state-dir", str(state))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "cannot be reached" in r.stdout and "FAILED" in r.stdout, r.stdout
        assert all(p.exists() for p in images) and jpath.exists()
    finally:
        holder.close()
    assert graph(vm.qmp_path) == built
    r = cli("cleanup", str(VMID), "--state-dir", str(state))
    assert r.returncode == 0, r.stdout + r.stderr
    assert graph(vm.qmp_path) == original
    assert not any(p.exists() for p in images) and not jpath.exists()
    shutil.rmtree(rundir, ignore_errors=True)
