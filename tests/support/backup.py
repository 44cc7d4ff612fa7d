"""Running ``qmpbackup backup`` against a test QEMU, and checking what it wrote.

The backup holds the VM's QMP socket (QMP serves one client), so test VMs get a
second monitor, ``monitor.sock``, through which a test watches jobs and writes
through the devices (HMP ``qemu-io``) while the backup runs.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

ROOT = Path(__file__).resolve().parents[2]


def monitor_args(rundir: Path) -> list[str]:
    """Extra QEMU arguments for the test's own QMP monitor."""
    return ["-qmp", f"unix:{rundir / 'monitor.sock'},server=on,wait=off"]


class Monitor:
    """A synchronous QMP connection for the test's side of things."""

    def __init__(self, path: Path) -> None:
        self._qmp = QEMUMonitorProtocol(str(path))
        self._qmp.connect()

    def cmd(self, name: str, **args: Any) -> Any:
        reply = self._qmp.cmd_raw(name, args or None)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']['desc']}")
        return reply["return"]

    def qemu_io(self, qdev: str, command: str) -> None:
        out = self.cmd("human-monitor-command", **{"command-line": f'qemu-io -d {qdev} "{command}"'})
        assert not str(out).startswith("Error"), out

    def wait_jobs(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [j for j in self.cmd("query-block-jobs") if j["status"] == "running"]
            if len(jobs) >= count:
                return jobs
            time.sleep(0.02)
        raise TimeoutError(f"{count} backup jobs did not start")

    def node_names(self) -> set[str]:
        return {n["node-name"] for n in self.cmd("query-named-block-nodes", flat=True)}

    def close(self) -> None:
        self._qmp.close()


@dataclass
class BackupRun:
    """Arguments every test run of the CLI needs: private state, lock and config dirs."""

    tmp: Path

    @property
    def dumpdir(self) -> Path:
        return self.tmp / "dump"

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "qmpbackup.cli.main", "backup", *args,
            "--dumpdir", str(self.dumpdir), "--state-dir", str(self.tmp / "state"),
            "--run-dir", str(self.tmp / "run"), "--lockwait", "0",
        ]  # fmt: skip

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ))

    def run(self, *args: str, timeout: float = 120.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, env=env)

    def archives(self) -> list[Path]:
        return sorted(p for p in self.dumpdir.glob("vzdump-qemu-*.vma*")
                      if p.name.endswith((".vma", ".vma.zst", ".vma.gz", ".vma.lzo")))

    def leftovers(self) -> list[Path]:
        return sorted(p for p in self.dumpdir.glob("*.dat"))


def next_second() -> None:
    """Wait into the next wall-clock second: archive names have a resolution of one second, so a
    run must not start in the second of the run before it."""
    time.sleep(1.05 - time.time() % 1.0)


def terminate(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 60.0) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def extract(archive: Path, target: Path) -> dict[str, Path]:
    """``qmpbackup vma extract``; returns device name → extracted raw image."""
    subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "vma", "extract", str(archive), str(target)],
                   check=True, capture_output=True, timeout=120)
    return {p.name.removeprefix("disk-").removesuffix(".raw"): p for p in target.glob("disk-*.raw")}


def images_equal(qemu_img: Path, raw: Path, image: Path, fmt: str) -> bool:
    r = subprocess.run([str(qemu_img), "compare", "-U", "-f", "raw", "-F", fmt, str(raw), str(image)],
                       capture_output=True, text=True, timeout=120)
    return r.returncode == 0


def result_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def make_image(qemu_img: Path, qemu_io: Path, path: Path, fmt: str, size: int,
               writes: Sequence[tuple[int, int, int]] = ()) -> Path:
    """An image with ``(pattern, offset, length)`` writes; offsets may be unaligned."""
    subprocess.run([str(qemu_img), "create", "-q", "-f", fmt, str(path), str(size)], check=True, timeout=60)
    if writes:
        cmds: list[str] = []
        for pattern, offset, length in writes:
            cmds += ["-c", f"write -P {pattern} {offset} {length}"]
        subprocess.run([str(qemu_io), "-f", fmt, *cmds, str(path)], check=True, capture_output=True, timeout=60)
    return path


def random_fill(path: Path, offset: int, length: int) -> None:
    """Incompressible data at ``offset`` of a raw image."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(os.urandom(length))


def dir_fleecing_storage(config_dir: Path, path: Path, storeid: str = "fast") -> Path:
    """A ``dir`` storage for fleecing images in ``config_dir``'s storage.cfg; returns its folder."""
    path.mkdir()
    (config_dir / "storage.cfg").write_text(f"dir: {storeid}\n\tpath {path}\n\tcontent images\n")
    return path


#: The test-only hook of qmpbackup/backup/kill_points.py.
HOLD_ENV = "QMPBACKUP_TEST_HOLD"


class HeldRun:
    """A backup started in its own process group, held at points of its window."""

    def __init__(self, run: BackupRun, hold: str, *args: str, env: dict[str, str] | None = None) -> None:
        env = {**(env or os.environ), HOLD_ENV: hold}
        self.proc = subprocess.Popen(run.argv(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, start_new_session=True)
        self.err = b""
        self.points: list[str] = []

    def wait_point(self, point: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while point not in self.points:
            left = deadline - time.monotonic()
            assert left > 0, f"the run never reached {point}:\n{self.err.decode(errors='replace')}"
            self._read(left)

    def read_available(self) -> None:
        before = -1
        while len(self.err) != before:
            before = len(self.err)
            self._read(0)

    def _read(self, timeout: float) -> None:
        assert self.proc.stderr is not None
        ready, _, _ = select.select([self.proc.stderr], [], [], timeout)
        if not ready:
            return
        chunk = os.read(self.proc.stderr.fileno(), 65536)
        if not chunk:
            raise AssertionError(f"the run ended (status {self.proc.wait()}):\n{self.err.decode(errors='replace')}")
        self.err += chunk
        self.points = re.findall(r"qmpbackup-test: at (\w+)", self.err.decode(errors="replace"))

    def kill(self) -> float:
        """SIGKILL the run's process group; returns the moment of the kill."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        self.proc.wait(timeout=30)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return killed
