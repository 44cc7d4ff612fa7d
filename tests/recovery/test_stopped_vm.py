"""``stopped-vm``: a VM that a killed stop-mode run left shut down is started again by ``qmpbackup cleanup``.

No guest here (tests/integration/test_stop_mode_restart.py kills a real stop-mode run): the "VM"
is a process listening on the QMP socket path, started by a real start command; the journal entry
is the one ``reach_qemu`` writes. What is checked: the order (the orphaned QEMU spawned on the
disks is gone before the start command runs), nothing is started while the socket accepts, a
failing start command is one line and exit 1 with the entry kept for the next cleanup, and a
backup that cannot start the VM backs it up as a stopped one (a real QEMU of ours on its disk).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Journal
from qmpbackup.recovery.spawned import ProcessRecord, process_create_time, write_record
from qmpbackup.recovery.state import journal_path
from tests.support.backup import BackupRun, make_image
from tests.support.qemu import ROOT, QemuBinaries

VMID = 100
MiB = 1 << 20

#: Stands in for the VM's QEMU: listens on the QMP socket until killed (a stale socket file is
#: replaced, as QEMU does).
LISTENER = ("import os, socket, sys, time; p = sys.argv[1]; os.path.exists(p) and os.unlink(p); "
            "s = socket.socket(socket.AF_UNIX); s.bind(p); s.listen(); time.sleep(600)")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Short enough for a unix socket path."""
    path = Path(tempfile.mkdtemp(prefix="qsv-", dir="/tmp"))
    yield path
    pid_file = path / "vm.pid"
    if pid_file.exists():
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def _cleanup(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "cleanup", str(VMID), "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)


def _start_script(d: Path, orphan_pid: int) -> Path:
    """A start command that notes whether the orphan still ran, then starts the "VM" in the background."""
    script = d / "start.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        [ -e {d}/fail ] && {{ echo "no such VM unit" >&2; exit 3; }}
        # (a zombie holds nothing)
        [ -e /proc/{orphan_pid} ] && ! grep -qs zombie /proc/{orphan_pid}/status && echo orphan-alive >> {d}/log
        echo started >> {d}/log
        setsid {sys.executable} -c '{LISTENER}' {d}/qmp.sock </dev/null >/dev/null 2>&1 &
        echo $! > {d}/vm.pid
        """))
    script.chmod(0o755)
    return script


def _record_stopped(state: Path, d: Path, script: Path) -> None:
    with Journal.open(journal_path(state, VMID)) as journal:
        journal.record(kinds.STOPPED_VM, vmid=VMID, qmp=str(d / "qmp.sock"), start=[str(script)])


def _orphan(state: Path, d: Path) -> int:
    """A process standing in for the QEMU the killed run spawned on the VM's disks (its owner is gone;
    not our child, so that it is reaped when killed, as such a QEMU is)."""
    owner = subprocess.Popen(["true"])
    owner_time = process_create_time(owner.pid) or 0.0
    owner.wait()
    pid = int(subprocess.run(["sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True).stdout)
    created = process_create_time(pid)
    assert created is not None
    write_record(state, ProcessRecord(VMID, pid, created, owner.pid, owner_time, str(d / "qmpbackup-x")))
    return pid


def test_cleanup_kills_the_spawned_qemu_then_starts_the_vm(tmp_path: Path, short_dir: Path) -> None:
    state = tmp_path / "state"
    orphan = _orphan(state, short_dir)
    try:
        _record_stopped(state, short_dir, _start_script(short_dir, orphan))
        r = _cleanup(state)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (short_dir / "log").read_text() == "started\n", r.stdout + r.stderr
        assert f"killed orphaned QEMU pid {orphan} of VM {VMID}" in r.stdout
        assert f"VM {VMID} was left stopped by a stop-mode backup that died - started it again" in r.stdout
        assert not journal_path(state, VMID).exists()
        r = _cleanup(state)  # nothing left: the VM is not started twice
        assert r.returncode == 0 and (short_dir / "log").read_text() == "started\n"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)


def test_a_failing_start_command_is_one_line_and_kept_until_the_vm_runs(tmp_path: Path, short_dir: Path) -> None:
    state = tmp_path / "state"
    (short_dir / "fail").touch()
    _record_stopped(state, short_dir, _start_script(short_dir, 0))
    r = _cleanup(state)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and (short_dir / "log").exists() is False, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: cleanup incomplete") and last.endswith(
        "the start command of VM 100 failed with exit status 3: no such VM unit"), r.stderr
    assert r.stderr.count("exit status 3") == 2, "tried once (a WARN line, then the error)"
    assert "FAILED" in r.stdout and "stopped-vm" in journal_path(state, VMID).read_text()
    # The user starts the VM by hand: the next cleanup sees it answer and runs nothing.
    vm = subprocess.Popen([sys.executable, "-c", LISTENER, str(short_dir / "qmp.sock")], start_new_session=True)
    try:
        while not (short_dir / "qmp.sock").exists():
            assert vm.poll() is None
        (short_dir / "fail").unlink()
        r = _cleanup(state)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not (short_dir / "log").exists(), "a running VM is not started again"
        assert not journal_path(state, VMID).exists()
    finally:
        vm.kill()
        vm.wait()


def test_a_refusing_socket_left_by_a_killed_qemu_means_stopped(tmp_path: Path, short_dir: Path) -> None:
    """A QMP socket file whose QEMU was killed still exists but refuses: the VM is started."""
    state = tmp_path / "state"
    stale = subprocess.Popen([sys.executable, "-c", LISTENER, str(short_dir / "qmp.sock")])
    while not (short_dir / "qmp.sock").exists():
        assert stale.poll() is None
    stale.kill()
    stale.wait()
    assert (short_dir / "qmp.sock").exists()
    _record_stopped(state, short_dir, _start_script(short_dir, 0))
    r = _cleanup(state)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (short_dir / "log").read_text() == "started\n"


@pytest.mark.qemu
def test_the_next_backup_backs_up_a_vm_it_cannot_start_as_a_stopped_one(qemu: QemuBinaries, tmp_path: Path,
                                                                        isolated_config: Path,
                                                                        short_dir: Path) -> None:
    """The backup tries the start first (one WARN line when it fails), then backs the VM up stopped
    (a QEMU of ours on its disks); the entry stays, and the next cleanup starts the VM."""
    disk = make_image(qemu.img, qemu.io, tmp_path / "d.raw", "raw", 2 * MiB, [(0x42, 0, MiB)])
    (isolated_config / "guests").mkdir()
    (isolated_config / "guests" / "100.conf").write_text(
        f"name: vm100\nmemory: 64\nscsi0: {disk},format=raw\n\n[qmpbackup]\nqemu: {qemu.system}\n"
        f"qmp: {short_dir / 'qmp.sock'}\n")
    state = tmp_path / "state"
    (short_dir / "fail").touch()
    _record_stopped(state, short_dir, _start_script(short_dir, 0))
    run = BackupRun(tmp_path)
    r = run.run("100")
    assert r.returncode == 0, r.stderr
    assert "exit status 3: no such VM unit" in r.stderr and "backup mode: stop" in r.stderr, r.stderr
    assert len(run.archives()) == 1 and "stopped-vm" in journal_path(state, VMID).read_text()
    (short_dir / "fail").unlink()
    r = _cleanup(state)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (short_dir / "log").read_text() == "started\n" and not journal_path(state, VMID).exists()
