"""Boot the tiny test guest (scripts/build-test-guest) under TCG for real-QEMU tests.

Why here: every QEMU-facing test dir (guest agent, backup engine, restore)
needs the same thing, a real guest with qemu-ga and a writer on an ext4 data
disk, started with a chosen QEMU binary and disk layout, and always killed.

Use from a conftest.py::

    from tests.support.guest import GuestOptions, guest_factory, guest_image  # noqa: F401

    @pytest.fixture(scope="module")
    def guest(module_guest_factory):
        return module_guest_factory.start(GuestOptions(data_format="raw", style="drive"))

``guest_image`` (session) builds or finds the image and skips with the reason
when it cannot; ``guest_factory`` (function scope) and ``module_guest_factory``
start guests and kill every one of them on teardown. ``check_writer_image`` verifies a
copy of the data disk (a backup) on the host. A started TestGuest has
``qmp_path``, ``qga_path``, ``disks`` (Proxmox-style keys, node names), the
console log (writer progress) and ``agent()`` for a fresh GuestAgentClient.
QGA serves one client at a time: close your client before another connects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import pytest

from qmpbackup.guest_agent import GuestAgentClient, GuestAgentError

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-test-guest"
BUILD_TIMEOUT_S = 900.0
AGENT_TIMEOUT_S = 120.0
_WRITER_LINE = re.compile(rb"^\[writer\] seq=(\d+) sha256=([0-9a-f]{64})\r?$", re.MULTILINE)

T = TypeVar("T")


class GuestImageUnavailable(Exception):
    """The test guest image could not be built (no network and no cache, not root, ...)."""


class GuestStartError(Exception):
    """QEMU did not start or the agent never answered; the message has QEMU's output."""


@dataclass(frozen=True)
class GuestImage:
    path: Path
    manifest: dict[str, Any]

    @property
    def vmlinuz(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initramfs.cpio.gz"


def build_guest_image(timeout: float = BUILD_TIMEOUT_S) -> GuestImage:
    """Run scripts/build-test-guest (a cache hit takes ~0.1 s). Raises GuestImageUnavailable."""
    try:
        proc = subprocess.run([str(BUILD_SCRIPT), "--json"], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestImageUnavailable(f"build-test-guest: {exc}") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise GuestImageUnavailable(last)
    manifest = json.loads(proc.stdout)
    return GuestImage(Path(manifest["path"]), manifest)


@dataclass(frozen=True)
class ExtraDisk:
    """An additional disk: blank, or ext4 when ``ext4`` (the guest does not mount it)."""

    size_mb: int = 16
    fmt: str = "qcow2"
    bus: str = "virtio"  # "virtio" (virtio-blk-pci) or "scsi" (scsi-hd on virtio-scsi-pci)
    ext4: bool = False


@dataclass(frozen=True)
class GuestOptions:
    """How to start the guest. Defaults: QEMU 7.2 from PATH, qcow2 data disk, -blockdev, writer on."""

    qemu: str = "qemu-system-x86_64"
    qemu_args: tuple[str, ...] = ()  # extra QEMU arguments, e.g. ("-L", "<qemu-10>/usr/share/qemu")
    qemu_img: str = "qemu-img"
    data_format: str = "qcow2"  # "qcow2" or "raw"
    data_size_mb: int = 64
    data_disk: Path | None = None  # boot an existing data disk (e.g. a restored one) instead
    data_files: tuple[tuple[str, bytes], ...] = ()  # files put on a new data disk (mkfs.ext4 -d)
    style: str = "blockdev"  # "blockdev" or "drive"
    extra_disks: tuple[ExtraDisk, ...] = ()
    writer: bool = True
    # Under TCG each iteration's processes cost more than its data: 64 KiB every 0.2 s keeps the
    # period near 0.3 s (a frozen writer still shows within a second) at two thirds of the CPU that
    # 256 KiB every 0.05 s took, for every second a guest lives.
    writer_kb: int = 64
    writer_delay_s: float = 0.2
    verify: bool = False  # guest checks the writer's blobs at boot (console: VERIFY OK/BAD)
    kernel_args: tuple[str, ...] = ()
    memory_mb: int = 128
    paused: bool = False  # -S: QEMU runs, the guest never boots, the QGA socket has no agent
    agent_timeout_s: float = AGENT_TIMEOUT_S
    label: str = "testguest"


@dataclass(frozen=True)
class GuestDisk:
    """One disk as QEMU sees it (names follow Proxmox: drive-<key> and device id <key>)."""

    key: str
    path: Path
    fmt: str
    node_name: str  # format node (-blockdev) or drive id (-drive)
    device_id: str


def _run_in_thread(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a private loop in a worker thread (safe from sync fixtures)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _make_ext4(path: Path, size_mb: int, files: tuple[tuple[str, bytes], ...]) -> None:
    with tempfile.TemporaryDirectory(prefix="qg-seed-") as seed:
        for name, data in files:
            target = Path(seed) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        with open(path, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", "-E",
                        "lazy_itable_init=0,lazy_journal_init=0", "-d", seed, str(path)],
                       check=True, capture_output=True, timeout=60)


class TestGuest:
    """One QEMU process running the test guest. Create through GuestFactory.start()."""

    __test__ = False  # not a pytest test class

    def __init__(self, image: GuestImage, options: GuestOptions) -> None:
        self.image = image
        self.options = options
        # unix socket paths are limited to 107 bytes: keep the folder short
        self.workdir = Path(tempfile.mkdtemp(prefix="qg-", dir="/tmp"))
        self.qmp_path = self.workdir / "qmp.sock"
        self.qga_path = self.workdir / "qga.sock"
        self.console_path = self.workdir / "console.log"
        self.qemu_log_path = self.workdir / "qemu.log"
        self.disks: list[GuestDisk] = []
        self.argv: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.boot_s: float | None = None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<TestGuest {self.options.label} pid={pid} {self.workdir}>"

    @property
    def data_disk(self) -> GuestDisk:
        return self.disks[0]

    # --- disks and command line ----------------------------------------------------------------

    def _disk(self, key: str, size_mb: int, fmt: str, ext4: bool,
              files: tuple[tuple[str, bytes], ...] = ()) -> GuestDisk:
        raw = self.workdir / f"{key}.raw"
        if ext4:
            _make_ext4(raw, size_mb, files)
        else:
            with open(raw, "wb") as f:
                f.truncate(size_mb * 1024 * 1024)
        path = raw
        if fmt == "qcow2":
            path = self.workdir / f"{key}.qcow2"
            subprocess.run([self.options.qemu_img, "convert", "-O", "qcow2", str(raw), str(path)],
                           check=True, capture_output=True, timeout=60)
            raw.unlink()
        elif fmt != "raw":
            raise ValueError(f"unsupported disk format {fmt!r}")
        return GuestDisk(key, path, fmt, f"drive-{key}", key)

    def _disk_args(self, disk: GuestDisk, bus: str) -> list[str]:
        args: list[str]
        if self.options.style == "drive":
            args = ["-drive", (f"file={disk.path},format={disk.fmt},if=none,id={disk.node_name},"
                               "cache=writeback,discard=unmap")]
        elif self.options.style == "blockdev":
            file_node = f"file-{disk.key}"
            args = ["-blockdev", json.dumps({"driver": "file", "filename": str(disk.path),
                                             "node-name": file_node, "discard": "unmap"}),
                    "-blockdev", json.dumps({"driver": disk.fmt, "file": file_node,
                                             "node-name": disk.node_name, "discard": "unmap"})]
        else:
            raise ValueError(f"unsupported disk style {self.options.style!r}")
        if bus == "virtio":
            args += ["-device", f"virtio-blk-pci,drive={disk.node_name},id={disk.device_id}"]
        elif bus == "scsi":
            args += ["-device", f"scsi-hd,bus=scsihw0.0,drive={disk.node_name},id={disk.device_id}"]
        else:
            raise ValueError(f"unsupported bus {bus!r}")
        return args

    def _build_argv(self) -> list[str]:
        o = self.options
        if o.data_disk is not None:
            with open(o.data_disk, "rb") as f:
                fmt = "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
            self.disks.append(GuestDisk("virtio0", Path(o.data_disk), fmt, "drive-virtio0", "virtio0"))
        else:
            self.disks.append(self._disk("virtio0", o.data_size_mb, o.data_format, True, o.data_files))
        buses = ["virtio"]
        counters = {"virtio": 1, "scsi": 0}
        for extra in o.extra_disks:
            key = f"{extra.bus}{counters[extra.bus]}"
            counters[extra.bus] += 1
            self.disks.append(self._disk(key, extra.size_mb, extra.fmt, extra.ext4))
            buses.append(extra.bus)
        append = ["console=ttyS0", "quiet", "panic=-1", "guest.data=/dev/vda",
                  f"guest.writer={int(o.writer)}", f"guest.writer_kb={o.writer_kb}",
                  f"guest.writer_delay={o.writer_delay_s:g}", f"guest.verify={int(o.verify)}",
                  *o.kernel_args]
        argv = [o.qemu, "-name", o.label, "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-machine", "q35", "-accel", "tcg", "-m", str(o.memory_mb), "-smp", "1",
                "-kernel", str(self.image.vmlinuz), "-initrd", str(self.image.initrd),
                "-append", " ".join(append),
                "-serial", f"file:{self.console_path}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-chardev", f"socket,id=qga0,path={self.qga_path},server=on,wait=off",
                "-device", "virtio-serial-pci,id=vser0",
                "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"]
        if "scsi" in buses:
            argv += ["-device", "virtio-scsi-pci,id=scsihw0"]
        for disk, bus in zip(self.disks, buses, strict=True):
            argv += self._disk_args(disk, bus)
        if o.paused:
            argv.append("-S")
        return argv + list(o.qemu_args)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> TestGuest:
        """Spawn QEMU and (unless paused) wait until the agent answers. Raises GuestStartError."""
        self.argv = self._build_argv()
        self.started_at = time.monotonic()
        with open(self.qemu_log_path, "wb") as log_file:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while not (self.qmp_path.exists() and self.qga_path.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(remove=False)
                raise GuestStartError(self._failure("QEMU did not create its sockets"))
            time.sleep(0.01)
        if not self.options.paused:
            try:
                self.wait_agent(self.options.agent_timeout_s)
            except BaseException:
                self.stop(remove=False)
                raise
            self.boot_s = time.monotonic() - self.started_at
        return self

    def wait_agent(self, timeout: float) -> None:
        """Block until guest-sync + guest-ping succeed (QEMU dying ends the wait at once)."""
        async def wait() -> None:
            agent = self.agent()
            connect = asyncio.create_task(agent.connect(timeout=timeout))
            try:
                while not connect.done():
                    await asyncio.wait({connect}, timeout=0.1)
                    if self.proc is not None and self.proc.poll() is not None:
                        connect.cancel()
                        raise GuestStartError(self._failure("QEMU exited during boot"))
                await connect
                await agent.ping()
            finally:
                if not connect.done():
                    connect.cancel()
                await agent.close()

        try:
            _run_in_thread(wait)
        except GuestAgentError as exc:
            raise GuestStartError(self._failure(str(exc))) from exc

    def agent(self, name: str | None = None) -> GuestAgentClient:
        """A new, unconnected client for this guest's QGA socket."""
        return GuestAgentClient(str(self.qga_path), name=name or self.options.label)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, remove: bool = True) -> None:
        """Kill and reap QEMU (safe to call twice); remove the work folder unless told not to."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- observation ----------------------------------------------------------------------------

    def console(self) -> bytes:
        try:
            return self.console_path.read_bytes()
        except FileNotFoundError:
            return b""

    def writer_seq(self) -> int:
        """Last writer iteration the guest reported on its console (0 if none yet)."""
        matches = _WRITER_LINE.findall(self.console())
        return int(matches[-1][0]) if matches else 0

    def wait_writer(self, above: int, timeout: float = 30.0) -> int:
        """Wait until the writer reports a seq greater than ``above``; return it."""
        deadline = time.monotonic() + timeout
        while (seq := self.writer_seq()) <= above:
            if time.monotonic() > deadline or not self.alive():
                raise AssertionError(f"writer stuck at seq {seq} (wanted > {above})\n"
                                     + self._failure("writer did not advance"))
            time.sleep(0.05)
        return seq

    def _failure(self, what: str) -> str:
        qemu_out = self.qemu_log_path.read_bytes()[-2000:] if self.qemu_log_path.exists() else b""
        return (f"{what}\nargv: {' '.join(self.argv)}\nqemu output: "
                f"{qemu_out.decode(errors='replace')}\nconsole tail: "
                f"{self.console()[-1500:].decode(errors='replace')}")


@dataclass(frozen=True)
class WriterCheck:
    """What a copy of the data disk holds: ``seq`` from /writer/seq, blobs checked against their names."""

    fsck_rc: int
    seq: int
    good: int
    bad: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.fsck_rc == 0 and not self.bad and self.good > 0


def check_writer_image(image: Path, qemu_img: str = "qemu-img") -> WriterCheck:
    """Verify a data disk image (raw or qcow2, e.g. a backup) on the host, without mounting it.

    ``qemu-img convert -U`` (works while QEMU holds the image), ``e2fsck -fn``,
    ``debugfs rdump /writer``, then every blob must hash to the sha256 in its name.
    """
    with tempfile.TemporaryDirectory(prefix="qg-check-") as tmp:
        raw = Path(tmp) / "disk.raw"
        subprocess.run([qemu_img, "convert", "-U", "-O", "raw", str(image), str(raw)], check=True,
                       capture_output=True, timeout=120)
        fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, timeout=120,
                              check=False)
        subprocess.run(["debugfs", "-R", f"rdump /writer {tmp}", str(raw)], check=True,
                       capture_output=True, timeout=120)
        writer = Path(tmp) / "writer"
        good, bad = 0, []
        for blob in sorted(writer.glob("blob-*")):
            if hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name.rsplit("-", 1)[1]:
                good += 1
            else:
                bad.append(blob.name)
        seq_file = writer / "seq"
        seq = int(seq_file.read_text().strip() or 0) if seq_file.exists() else 0
        return WriterCheck(fsck.returncode, seq, good, tuple(bad))


@dataclass
class GuestFactory:
    """Starts test guests and kills all of them on close()."""

    image: GuestImage
    guests: list[TestGuest] = field(default_factory=list)

    def start(self, options: GuestOptions | None = None, **overrides: Any) -> TestGuest:
        opts = options or GuestOptions()
        if overrides:
            opts = GuestOptions(**{**opts.__dict__, **overrides})
        if shutil.which(opts.qemu) is None:
            pytest.skip(f"QEMU binary {opts.qemu} not found")
        guest = TestGuest(self.image, opts)
        self.guests.append(guest)
        return guest.start()

    def close(self) -> None:
        for guest in reversed(self.guests):
            guest.stop()
        self.guests.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_image_result: GuestImage | GuestImageUnavailable | None = None


def _cached_image() -> GuestImage:
    global _image_result
    if _image_result is None:
        try:
            _image_result = build_guest_image()
        except GuestImageUnavailable as exc:
            _image_result = exc
    if isinstance(_image_result, GuestImageUnavailable):
        pytest.skip(f"test guest image unavailable: {_image_result}")
    return _image_result


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The built test guest (built once per session); skips with the reason if impossible."""
    return _cached_image()


@pytest.fixture
def guest_factory(guest_image: GuestImage) -> Iterator[GuestFactory]:
    with GuestFactory(guest_image) as factory:
        yield factory


@pytest.fixture(scope="module")
def module_guest_factory(guest_image: GuestImage) -> Iterator[GuestFactory]:
    with GuestFactory(guest_image) as factory:
        yield factory
