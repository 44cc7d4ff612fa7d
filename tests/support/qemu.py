"""Real QEMU processes for tests: which versions, their binaries, and paused VMs with QMP.

Which QEMU versions run: ``QMPBACKUP_QEMU_VERSIONS`` (``7.2,10.0``); by default every
version available here: the system's QEMU (7.2 on Debian 12) and 10.0 when
``scripts/fetch-qemu`` has unpacked it into ``cache/qemu-10.0`` (or ``$QMPBACKUP_CACHE``).

Use from a conftest::

    from tests.support.qemu import qemu, qemu_vm, pytest_runtest_makereport  # noqa: F401

``qemu`` is parametrized over the versions (ids ``qemu7.2``, ``qemu10.0``), so one pytest
run tests each of them. ``qemu_vm`` is a factory that starts QEMU paused with QMP on a
unix socket, always kills and reaps it, and adds its command line and stderr to the
report of a failed test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSIONS_ENV = "QMPBACKUP_QEMU_VERSIONS"
TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon")


@dataclass(frozen=True, slots=True)
class QemuBinaries:
    """One QEMU version's programs (``storage_daemon`` may be missing on the system QEMU)."""

    version: str  # "7.2", "10.0"
    system: Path
    img: Path
    io: Path
    nbd: Path
    storage_daemon: Path | None


def cache_dir() -> Path:
    return Path(os.environ.get("QMPBACKUP_CACHE") or ROOT / "cache")


def _series(binary: Path) -> str | None:
    try:
        out = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _from_dir(version: str, bindir: Path) -> QemuBinaries:
    sd = bindir / "qemu-storage-daemon"
    return QemuBinaries(
        version=version,
        system=bindir / "qemu-system-x86_64",
        img=bindir / "qemu-img",
        io=bindir / "qemu-io",
        nbd=bindir / "qemu-nbd",
        storage_daemon=sd if sd.exists() else None,
    )


@cache
def available_versions() -> dict[str, QemuBinaries]:
    """Every QEMU this machine has: the system one and the unpacked ones in the cache."""
    found: dict[str, QemuBinaries] = {}
    system = shutil.which("qemu-system-x86_64")
    if system:
        series = _series(Path(system))
        if series:
            which = {t: shutil.which(t) for t in TOOLS}
            found[series] = QemuBinaries(
                version=series,
                system=Path(system),
                img=Path(which["qemu-img"] or "qemu-img"),
                io=Path(which["qemu-io"] or "qemu-io"),
                nbd=Path(which["qemu-nbd"] or "qemu-nbd"),
                storage_daemon=Path(which["qemu-storage-daemon"]) if which["qemu-storage-daemon"] else None,
            )
    for d in sorted(cache_dir().glob("qemu-*/bin")):
        series = d.parent.name.removeprefix("qemu-")
        if (d / "qemu-system-x86_64").exists() and series not in found:
            found[series] = _from_dir(series, d)
    return found


def selected_versions() -> list[str]:
    """The versions to test: ``$QMPBACKUP_QEMU_VERSIONS`` or all available, oldest first."""
    wanted = os.environ.get(VERSIONS_ENV, "").strip()
    if wanted:
        return [v.strip() for v in wanted.split(",") if v.strip()]
    return sorted(available_versions(), key=lambda v: tuple(int(p) for p in v.split(".")))


def binaries_for(version: str) -> QemuBinaries:
    """The binaries of ``version``; fails the test (not skips) when it was asked for but is missing."""
    found = available_versions().get(version)
    if found is None:
        hint = " (run scripts/fetch-qemu)" if version != "7.2" else ""
        pytest.fail(f"QEMU {version} was asked for but is not available{hint}", pytrace=False)
    return found


@pytest.fixture(params=selected_versions(), ids=lambda v: f"qemu{v}")
def qemu(request: pytest.FixtureRequest) -> QemuBinaries:
    """The QEMU version under test; every test using it runs once per version."""
    return binaries_for(str(request.param))


# --------------------------------------------------------------------------- paused VMs

Bus = Literal["virtio", "scsi", "ide", "sata"]


@dataclass(frozen=True)
class DriveSpec:
    """One guest drive. ``path`` None means an empty drive (CD-ROM without medium).

    ``dev_id``: the ``-device id=`` (a Proxmox key such as ``scsi0``, or None for an
    anonymous device); ``drive_id``: the ``-drive id=`` (``drive-scsi0``); with
    ``style="blockdev"`` the nodes are named ``node_name`` and ``node_name-file``.
    """

    path: Path | None
    bus: Bus = "virtio"
    fmt: str = "raw"
    style: Literal["drive", "blockdev"] = "drive"
    dev_id: str | None = None
    drive_id: str | None = None
    node_name: str | None = None
    cdrom: bool = False
    read_only: bool = False


def _drive_args(drives: Sequence[DriveSpec]) -> list[str]:
    args: list[str] = []
    have_scsi = have_ahci = False
    ide_port = sata_port = scsi_id = 0
    for n, d in enumerate(drives):
        backend: str | None = None
        if d.style == "drive":
            if d.path is not None or d.cdrom:
                backend = d.drive_id or f"tdrive{n}"
                opts = [f"if=none,id={backend}"]
                if d.path is not None:
                    opts.insert(0, f"file={d.path},format={d.fmt}")
                if d.cdrom:
                    opts.append("media=cdrom")
                if d.read_only:
                    opts.append("readonly=on")
                args += ["-drive", ",".join(opts)]
        elif d.path is not None:
            backend = d.node_name or f"tnode{n}"
            ro = {"read-only": True} if d.read_only else {}
            args += [
                "-blockdev",
                json.dumps({"driver": "file", "filename": str(d.path), "node-name": f"{backend}-file", **ro}),
            ]
            args += ["-blockdev", json.dumps({"driver": d.fmt, "file": f"{backend}-file", "node-name": backend, **ro})]
        dev_opts = (f",drive={backend}" if backend else "") + (f",id={d.dev_id}" if d.dev_id else "")
        if d.bus == "virtio":
            args += ["-device", f"virtio-blk-pci{dev_opts}"]
        elif d.bus == "scsi":
            if not have_scsi:
                args += ["-device", "virtio-scsi-pci,id=scsihw0"]
                have_scsi = True
            kind = "scsi-cd" if d.cdrom else "scsi-hd"
            args += ["-device", f"{kind},bus=scsihw0.0,scsi-id={scsi_id}{dev_opts}"]
            scsi_id += 1
        elif d.bus == "ide":  # q35's built-in AHCI, ports ide.0 .. ide.5
            kind = "ide-cd" if d.cdrom else "ide-hd"
            args += ["-device", f"{kind},bus=ide.{ide_port}{dev_opts}"]
            ide_port += 1
        elif d.bus == "sata":
            if not have_ahci:
                args += ["-device", "ahci,id=ahci0"]
                have_ahci = True
            kind = "ide-cd" if d.cdrom else "ide-hd"
            args += ["-device", f"{kind},bus=ahci0.{sata_port}{dev_opts}"]
            sata_port += 1
    return args


@dataclass
class RunningQemu:
    """A paused QEMU started by a test."""

    binaries: QemuBinaries
    argv: list[str]
    proc: subprocess.Popen[bytes]
    qmp_path: Path
    stderr_path: Path
    rundir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self) -> str:
        return (
            f"QEMU {self.binaries.version} pid {self.proc.pid} exit {self.proc.poll()}\n"
            f"command line: {subprocess.list2cmdline(self.argv)}\nstderr:\n{self.stderr()}"
        )

    def kill(self) -> None:
        """SIGKILL and reap; safe twice."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _short_dir(preferred: Path) -> Path:
    """A private directory whose socket paths fit the 108-byte unix socket limit."""
    if len(str(preferred / "qmp.sock")) < 100:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    return Path(tempfile.mkdtemp(prefix="qb-", dir="/tmp"))


def start_qemu(
    binaries: QemuBinaries,
    workdir: Path,
    drives: Sequence[DriveSpec] = (),
    extra_args: Sequence[str] = (),
    wait_s: float = 20.0,
) -> RunningQemu:
    """Start QEMU paused (``-S``) with QMP on ``<dir>/qmp.sock``; returns once the socket exists."""
    rundir = _short_dir(workdir)
    qmp_path = rundir / "qmp.sock"
    stderr_path = rundir / "qemu.stderr"
    argv = [
        str(binaries.system), "-S", "-nodefaults", "-no-user-config", "-display", "none",
        "-accel", "tcg", "-machine", "q35", "-m", "64",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        *_drive_args(drives), *extra_args,
    ]  # fmt: skip
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    vm = RunningQemu(binaries, argv, proc, qmp_path, stderr_path, rundir)
    deadline = time.monotonic() + wait_s
    while not _greets(qmp_path):  # QEMU greets once its set-up is done
        if proc.poll() is not None or time.monotonic() > deadline:
            vm.kill()
            raise RuntimeError(f"QEMU did not come up\n{vm.describe()}")
        time.sleep(0.01)
    return vm


def _greets(path: Path) -> bool:
    """A probe connection gets QMP's greeting (then closes, freeing the monitor)."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(path))
            return s.recv(6) == b'{"QMP"'
    except OSError:
        return False


_RUNNING = pytest.StashKey[list[RunningQemu]]()


@pytest.fixture
def qemu_vm(
    qemu: QemuBinaries, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., RunningQemu]]:
    """Factory: ``qemu_vm(drives, extra_args=(), name="vm")`` starts a paused QEMU of the
    version under test. Every QEMU it started is killed and reaped at teardown."""
    started: list[RunningQemu] = []
    request.node.stash[_RUNNING] = started

    def start(drives: Sequence[DriveSpec] = (), extra_args: Sequence[str] = (), name: str = "vm") -> RunningQemu:
        vm = start_qemu(qemu, tmp_path / name, drives, extra_args)
        started.append(vm)
        return vm

    try:
        yield start
    finally:
        for vm in started:
            vm.kill()
            if vm.rundir != tmp_path / vm.rundir.name:
                shutil.rmtree(vm.rundir, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Add each test QEMU's command line and stderr to a failed test's report."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for vm in item.stash.get(_RUNNING, []):
            report.sections.append((f"QEMU {vm.binaries.version} (pid {vm.pid})", vm.describe()))
    return report
