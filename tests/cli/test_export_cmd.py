"""``qmpbackup export`` of real archives, read by real clients (qemu-img 7.2 and 10.0, nbdinfo,
nbdcopy), compared with ``vma extract`` of the same archive; ``--daemon`` ended by ``cleanup``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpbackup.vma.create import DiskSpec, create_archive_file
from tests.nbd.file_source import zero_ranges
from tests.nbd.test_read_clients import merged, qemu_img_zero_ranges
from tests.support.qemu import QemuBinaries, qemu  # noqa: F401  (the QEMU version fixture)

KiB = 1024
MiB = 1024 * KiB


def qmpbackup(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def tool(*args: str | Path) -> str:
    done = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def make_disk(path: Path, size: int, seed: int) -> Path:
    """Data, a zero-filled stretch, a hole and an odd-sized tail."""
    rng = __import__("random").Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 192 * KiB):
            f.seek(off)
            f.write(rng.randbytes(min(68 * KiB, size - off)))
        f.seek(size // 2)
        f.write(bytes(min(256 * KiB, size - size // 2)))
    return path


@pytest.fixture(params=["vma", "vma.zst"])
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    disks = {"drive-scsi0": make_disk(tmp_path / "d0.raw", 5 * MiB + 3 * 512, 1),
             "drive-virtio1": make_disk(tmp_path / "d1.raw", 3 * 65536, 2),
             "drive-sata2": make_disk(tmp_path / "d2.raw", 2 * MiB + 4 * KiB, 3)}
    conf = tmp_path / "qemu-server.conf"
    conf.write_text("memory: 512\n")
    path = tmp_path / f"vzdump-qemu-100-2026_01_01-00_00_00.{request.param}"
    create_archive_file(str(path), [conf], [DiskSpec("raw", n, p) for n, p in disks.items()],
                        "zstd" if request.param.endswith("zst") else "none", zstd_threads=2)
    return path, disks


def _start_daemon(archive: Path, sock: Path, state: Path) -> dict[str, tuple[int, str]]:
    done = qmpbackup("export", archive, "--socket", sock, "--daemon", "--state-dir", state)
    assert done.returncode == 0, done.stderr
    exports = {}
    for line in done.stdout.splitlines():
        name, size, url = line.split()
        exports[name] = (int(size), url)
    return exports


@pytest.mark.qemu
def test_export_daemon_equals_extract(qemu: QemuBinaries, archive: tuple[Path, dict[str, Path]],  # noqa: F811
                                      tmp_path: Path) -> None:
    path, disks = archive
    extracted = tmp_path / "extracted"
    done = qmpbackup("vma", "extract", path, extracted)
    assert done.returncode == 0, done.stderr
    sock = tmp_path / "export.sock"
    state = tmp_path / "state"
    exports = _start_daemon(path, sock, state)
    try:
        assert set(exports) == set(disks)
        pid = int((tmp_path / "export.sock.pid").read_text())
        for name, (size, url) in exports.items():
            expect = (extracted / f"disk-{name}.raw").read_bytes()
            assert size == len(expect)
            out = tmp_path / f"{name}.nbd.raw"
            tool(qemu.img, "convert", "-f", "raw", "-O", "raw", url, out)
            assert out.read_bytes() == expect
            zeros = zero_ranges(extracted / f"disk-{name}.raw")
            assert qemu_img_zero_ranges(tool(qemu.img, "map", "--output=json", "-f", "raw", url)) == zeros
            if shutil.which("nbdinfo") and qemu.version == "10.0":
                mapped = [line.split() for line in tool("nbdinfo", "--map", url).splitlines()]
                assert merged([(int(o), int(n)) for o, n, st, *_ in mapped if st == "3"]) == zeros
                copy = tmp_path / f"{name}.nbdcopy.raw"
                tool("nbdcopy", url, copy)
                assert copy.read_bytes() == expect
    finally:
        done = qmpbackup("cleanup", "--state-dir", state)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "undid export-daemon" in done.stdout
    assert not sock.exists() and not (tmp_path / "export.sock.pid").exists()
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
    assert not list((state / "host").glob("*.jsonl"))


def test_export_foreground_ends_on_sigterm(archive: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    path, _ = archive
    sock = tmp_path / "fg.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qmpbackup.cli.main", "export", str(path), "--socket", str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("drive-scsi0 ") and f"socket={sock}" in first
        info = json.loads(tool("nbdinfo", "--json", first.split()[2])) if shutil.which("nbdinfo") else None
        if info is not None:
            assert info["exports"][0]["is_read_only"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not sock.exists()


def test_export_errors_are_one_line(tmp_path: Path) -> None:
    done = qmpbackup("export", tmp_path / "missing.vma", "--socket", tmp_path / "s")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    gz = tmp_path / "a.vma.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00" + bytes(60))
    for extra in ((), ("--daemon", "--state-dir", str(tmp_path / "state"))):
        done = qmpbackup("export", gz, "--socket", tmp_path / "s", *extra)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "recompress" in done.stderr
    assert not (tmp_path / "s").exists()
