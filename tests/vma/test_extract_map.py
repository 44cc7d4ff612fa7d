"""``vma extract -r FIFO``: qmrestore's protocol over a real FIFO, into existing raw images."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpbackup.vma import format as fmt
from qmpbackup.vma.extract import extract_mapped
from qmpbackup.vma.reader import VmaReader
from qmpbackup.vma.restore_map import RestoreMapError, parse_map, parse_map_line, read_map_lines
from tests.vma.archive_builder import RawExtent, disk_image, raw_archive, write_archive
from tests.vma.test_cli import CONFIG

CLUSTER = fmt.CLUSTER_SIZE
BLOCK = fmt.BLOCK_SIZE
GARBAGE = 0xEE


def scsi_image() -> bytes:
    """Data clusters, a cluster with zero 4 KiB blocks inside, all-zero clusters, an odd tail."""
    data = bytearray(disk_image(3 * CLUSTER, [2, 0, 1, 3], 5))  # kinds as test_cli uses them
    data += bytes(5 * CLUSTER)
    data += b"\x07" * (CLUSTER + 2048)
    return bytes(data)


EFI = b"\x09" * 1000 + bytes(24)  # 1024 bytes: one partial cluster


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "a.vma"
    path.write_bytes(write_archive(
        [("drive-scsi0", scsi_image()), ("drive-efidisk0", EFI)],
        configs=[("qemu-server.conf", CONFIG), ("qemu-server.fw", b"[OPTIONS]\n")],
    ))
    return path


def garbage_target(path: Path, size: int) -> Path:
    """An existing image full of old data, as an LVM volume may be."""
    path.write_bytes(bytes([GARBAGE]) * size)
    return path


def sparse_target(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


class VmaExtract:
    """``qmpbackup vma extract -r FIFO`` as qmrestore runs it: read the list lines, then write the map."""

    def __init__(self, tmp_path: Path, archive: Path, *extra: str, name: str = "vmatmp") -> None:
        self.fifo = tmp_path / f"{name}.fifo"
        os.mkfifo(self.fifo)
        self.target = tmp_path / name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qmpbackup.cli.main", "vma", "extract", *extra, "-r", str(self.fifo),
             str(archive), str(self.target)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def list_lines(self) -> list[str]:
        """stdout up to and including the CTIME line (configs must be in place by then)."""
        assert self.proc.stdout is not None
        lines = []
        while not lines or not lines[-1].startswith("CTIME: "):
            line = self.proc.stdout.readline()
            assert line, f"vma extract ended early: {self.finish()[1]}"
            lines.append(line.decode().rstrip("\n"))
        return lines

    def write_map(self, text: str, timeout: float = 20) -> None:
        """Open the FIFO once vma opened it for reading (ENXIO until then), write, close."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.01)
        try:
            os.set_blocking(fd, True)
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(), err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@pytest.fixture
def run_extract(tmp_path: Path, archive: Path) -> Iterator[type[VmaExtract]]:
    started: list[VmaExtract] = []

    class Tracked(VmaExtract):
        def __init__(self, *extra: str, name: str = "vmatmp") -> None:
            super().__init__(tmp_path, archive, *extra, name=name)
            started.append(self)

    yield Tracked  # type: ignore[misc]
    for run in started:
        run.kill()


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_restore_into_existing_images(tmp_path: Path, run_extract: type[VmaExtract]) -> None:
    scsi = garbage_target(tmp_path / "vm-100-disk-0.raw", len(scsi_image()))
    efi = sparse_target(tmp_path / "vm-100-disk-1.raw", len(EFI))
    run = run_extract("-v")
    assert run.list_lines()[:4] == [
        f"CFG: size: {len(CONFIG)} name: qemu-server.conf",
        "CFG: size: 10 name: qemu-server.fw",
        f"DEV: dev_id=1 size: {len(scsi_image())} devname: drive-scsi0",
        "DEV: dev_id=2 size: 1024 devname: drive-efidisk0",
    ]
    # qmrestore reads the config while vma waits for the map
    assert (run.target / "qemu-server.conf").read_bytes() == CONFIG
    assert (run.target / "qemu-server.fw").read_bytes() == b"[OPTIONS]\n"
    run.write_map(
        f"format=raw:1:drive-scsi0={scsi}\n"
        f"throttling.bps=104857600:throttling.group=local:format=raw:0:drive-efidisk0={efi}\n"
        "done\n"
    )
    code, out, err = run.finish()
    assert code == 0, err
    assert scsi.read_bytes() == scsi_image()  # old data under zero blocks overwritten (flag 1)
    assert efi.read_bytes() == EFI
    assert efi.stat().st_blocks * 512 <= 8192  # flag 0 on a sparse target: zeros never written
    assert sorted(p.name for p in run.target.iterdir()) == ["qemu-server.conf", "qemu-server.fw"]  # no DEVINFO files
    assert "DEVINFO" not in out
    assert out.splitlines()[-2].startswith("total bytes read ")


def test_flag_0_leaves_zero_blocks_alone(tmp_path: Path, run_extract: type[VmaExtract]) -> None:
    scsi = garbage_target(tmp_path / "scsi.raw", len(scsi_image()))
    efi = garbage_target(tmp_path / "efi.raw", len(EFI) + (1 << 20))  # larger is allowed (up to 4 MiB)
    run = run_extract()
    run.list_lines()
    run.write_map(f"format=raw:0:drive-scsi0={scsi}\n1:drive-efidisk0={efi}\ndone\n")
    code, _out, err = run.finish()
    assert code == 0, err
    expected = bytearray(scsi_image())
    for offset in range(0, len(expected), BLOCK):
        if not expected[offset : offset + BLOCK].strip(b"\0"):
            expected[offset : offset + BLOCK] = bytes([GARBAGE]) * len(expected[offset : offset + BLOCK])
    assert scsi.read_bytes() == bytes(expected)
    restored = efi.read_bytes()
    assert restored[: len(EFI)] == EFI and restored[len(EFI) :] == bytes([GARBAGE]) * (1 << 20)


def test_device_filter_and_skip(tmp_path: Path, run_extract: type[VmaExtract]) -> None:
    efi = garbage_target(tmp_path / "efi.raw", len(EFI))
    run = run_extract("-d", "drive-efidisk0")
    run.list_lines()
    run.write_map(f"format=raw:1:drive-efidisk0={efi}\n")  # no done: end of input ends the map too
    code, out, err = run.finish()
    assert code == 0 and out == "" and err == "", err
    assert efi.read_bytes() == EFI

    scsi = garbage_target(tmp_path / "scsi.raw", len(scsi_image()))
    efi.write_bytes(bytes([GARBAGE]) * len(EFI))
    run = run_extract(name="second")
    run.list_lines()
    run.write_map(f"skip=drive-scsi0\nformat=raw:1:drive-efidisk0={efi}\ndone\n")
    code, _out, err = run.finish()
    assert code == 0, err
    assert efi.read_bytes() == EFI
    assert scsi.read_bytes() == bytes([GARBAGE]) * len(scsi_image())


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("format=raw:2:drive-scsi0={scsi}\n", "read map failed - parse error ('format=raw:2:drive-scsi0="),
        ("format=raw:1:{scsi}\n", "read map failed - no dev name specified"),
        ("format=raw\n", "read map failed - option 'format' not terminated"),
        ("throttling.bps=fast:format=raw:1:drive-scsi0={scsi}\n", "read map failed - not a number: fast"),
        ("format=raw:format=raw:1:drive-scsi0={scsi}\n", "read map failed - duplicate value for option 'format'"),
        ("format=raw:1:drive-scsi0={scsi}\nformat=raw:1:drive-scsi0={scsi}\n", "device 'drive-scsi0' mapped twice"),
        ("format=raw:1:drive-sata7={scsi}\n", "read map failed - archive has no device 'drive-sata7'"),
        ("format=raw:1:drive-scsi0={scsi}\ndone\n", "no device name mapping for drive-efidisk0"),
        ("format=raw:1:drive-scsi0={tmp}/nope.raw\nskip=drive-efidisk0\n",
         "can't open file {tmp}/nope.raw - No such file or directory"),
        ("format=raw:1:drive-scsi0={small}\nskip=drive-efidisk0\n",
         "vma_reader_register_bs for stream drive-scsi0 failed - unexpected size 4096 != {size}"),
        ("format=qcow2:1:drive-scsi0={scsi}\nskip=drive-efidisk0\n",
         "can't open file {scsi} - qemu-img info {scsi}: qemu-img: Could not open '{scsi}': "
         "Image is not in qcow2 format"),
        ("1:drive-scsi0={tmp}/scsi.img\nskip=drive-efidisk0\n", "no format= given for {tmp}/scsi.img"),
        ("format=Raw/x:1:drive-scsi0={scsi}\nskip=drive-efidisk0\n", "read map failed - bad format 'Raw/x'"),
        ("cache=fast:format=raw:1:drive-scsi0={scsi}\n", "invalid cache option: fast"),
    ],
)
def test_bad_map(tmp_path: Path, run_extract: type[VmaExtract], lines: str, message: str) -> None:
    scsi = garbage_target(tmp_path / "scsi.raw", len(scsi_image()))
    small = garbage_target(tmp_path / "small.raw", 4096)
    values = {"scsi": scsi, "small": small, "tmp": tmp_path, "size": len(scsi_image())}
    run = run_extract()
    run.list_lines()
    run.write_map(lines.format(**values))
    code, _out, err = run.finish()
    assert code != 0
    assert message.format(**values) in one_error_line(err)
    assert not run.target.exists()  # the folder it made is gone again
    assert scsi.read_bytes() == bytes([GARBAGE]) * len(scsi_image())  # nothing written before the map checked out


def test_missing_cluster_fails(tmp_path: Path) -> None:
    """A truncated archive: the mapped device's missing cluster is reported, exit 1."""
    data = raw_archive(
        [("drive-scsi0", 2 * CLUSTER)], [RawExtent(slots=[fmt.blockinfo(fmt.FULL_MASK, 1, 0)], payload=b"\1" * CLUSTER)]
    )
    archive = tmp_path / "t.vma"
    archive.write_bytes(data)
    target = garbage_target(tmp_path / "t.raw", 2 * CLUSTER)
    run = VmaExtract(tmp_path, archive)
    try:
        run.list_lines()
        run.write_map(f"format=raw:1:drive-scsi0={target}\ndone\n")
        code, _out, err = run.finish()
    finally:
        run.kill()
    assert code == 1 and "detected missing cluster 1 for stream drive-scsi0" in one_error_line(err)


def test_parse_map_line() -> None:
    entry = parse_map_line("throttling.group=local:throttling.bps=0x100:cache=none:format=raw:0:drive-scsi0=/dev/x=y")
    assert (entry.devname, str(entry.path), entry.image_format) == ("drive-scsi0", "/dev/x=y", "raw")
    assert not entry.write_zeroes
    assert (entry.throttling_bps, entry.throttling_group, entry.cache) == (256, "local", "none")
    assert parse_map_line("1:d=/p").image_format is None
    assert parse_map_line("skip=drive-scsi0").skip
    with pytest.raises(RestoreMapError, match="option 'skip' has no value"):
        parse_map_line("skip=")
    assert list(parse_map(["1:a=/x", "", "1:b=/y"])) == ["a"]  # an empty line ends the map


def test_map_wait_is_bounded(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(RestoreMapError, match="no device mapping from"):
        read_map_lines(fifo, timeout_s=0.3)
    assert time.monotonic() - started < 5
    with pytest.raises(RestoreMapError, match="unable to open fifo"):
        read_map_lines(tmp_path / "absent")


def test_throttling_in_process(tmp_path: Path) -> None:
    """Two devices of one throttle group share its rate; a FIFO written by a thread carries the map."""
    a, b = b"\x11" * (4 * CLUSTER), b"\x22" * (4 * CLUSTER)
    # interleaved: with a bucket per device each would pay only half the time
    archive = write_archive([("drive-scsi0", a), ("drive-scsi1", b)], order=[(d, c) for c in range(4) for d in (0, 1)])
    ta = sparse_target(tmp_path / "a.raw", len(a))
    tb = sparse_target(tmp_path / "b.raw", len(b))
    fifo = tmp_path / "map"
    os.mkfifo(fifo)
    rate = 1 << 20  # 512 KiB in all: at least half a second

    def writer() -> None:
        with open(fifo, "w") as f:
            f.write(f"throttling.bps={rate}:throttling.group=g:format=raw:0:drive-scsi0={ta}\n")
            f.write(f"throttling.bps={rate}:throttling.group=g:format=raw:0:drive-scsi1={tb}\ndone\n")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    seen: list[str] = []
    reader = VmaReader(io.BytesIO(archive))
    started = time.monotonic()
    extract_mapped(reader, tmp_path / "dir", lambda: parse_map(read_map_lines(fifo, timeout_s=20)),
                   on_configs=lambda: seen.append("configs"))
    elapsed = time.monotonic() - started
    thread.join(timeout=10)
    assert seen == ["configs"]
    assert ta.read_bytes() == a and tb.read_bytes() == b
    assert 0.45 <= elapsed < 5, elapsed


def qcow2_target(path: Path, size: int, *, old_data: bool) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True, timeout=30)
    if old_data:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {GARBAGE} 0 {size}", path],
                       check=True, timeout=30, capture_output=True)
    return path


def qcow2_contents(path: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / f"{path.name}.check.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw], check=True, timeout=30)
    return raw.read_bytes()


def test_qcow2_targets(tmp_path: Path, run_extract: type[VmaExtract]) -> None:
    """Old data under zero blocks is overwritten with flag 1; flag 0 on a new image leaves zeros unallocated."""
    scsi = qcow2_target(tmp_path / "vm-100-disk-0.qcow2", len(scsi_image()), old_data=True)
    efi = qcow2_target(tmp_path / "vm-100-disk-1.qcow2", len(EFI), old_data=False)
    run = run_extract()
    run.list_lines()
    run.write_map(f"format=qcow2:1:drive-scsi0={scsi}\nthrottling.bps=10485760:format=qcow2:0:drive-efidisk0={efi}\n"
                  "done\n")
    code, _out, err = run.finish()
    assert code == 0, err
    assert qcow2_contents(scsi, tmp_path) == scsi_image()
    assert qcow2_contents(efi, tmp_path) == EFI
    assert sorted(p.name for p in run.target.iterdir()) == ["qemu-server.conf", "qemu-server.fw"]  # temp files gone

    fresh = qcow2_target(tmp_path / "vm-100-disk-2.qcow2", len(scsi_image()), old_data=False)
    run = run_extract(name="second")
    run.list_lines()
    run.write_map(f"format=qcow2:0:drive-scsi0={fresh}\nskip=drive-efidisk0\n")
    code, _out, err = run.finish()
    assert code == 0, err
    assert qcow2_contents(fresh, tmp_path) == scsi_image()
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", fresh], check=True,
                                        timeout=30, capture_output=True, text=True).stdout)
    data = sum(e["length"] for e in extents if e["data"])
    assert data <= len(scsi_image()) - 5 * CLUSTER  # the five zero clusters were never written
