"""``qmpbackup vma ...`` as users run it: output lines, exit codes, hostile archives."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmpbackup.vma import CLUSTER_SIZE
from qmpbackup.vma import format as fmt
from tests.support.cli import run_main
from tests.vma.archive_builder import RawExtent, disk_image, raw_archive
from tests.vma.test_proxmox_sample import SAMPLE

CONFIG = b"memory: 512\n#qmdump#map:scsi0:drive-scsi0:local:raw:\n"


def qmpbackup(*args: str | Path, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """``qmpbackup vma ARGS``, run in this process (:mod:`tests.support.cli`)."""
    return run_main("vma", *args, stdin=stdin or b"")


def error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    text = proc.stderr.decode()
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A sparse raw disk with data, zeros and a hole; an odd-sized raw disk; a config file."""
    disk = tmp_path / "disk0.raw"
    with disk.open("wb") as f:
        f.write(disk_image(3 * CLUSTER_SIZE, [2, 0, 1, 3], 5))
        f.seek(40 * CLUSTER_SIZE)  # a hole in between
        f.write(b"tail" * 1024)
        f.truncate(48 * CLUSTER_SIZE + 4096)
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"\x09" * 1000)  # QEMU would see 1024 bytes
    conf = tmp_path / "qemu-server.conf"
    conf.write_bytes(CONFIG)
    return {"disk": disk, "odd": odd, "conf": conf}


def create(tmp_path: Path, inputs: dict[str, Path], name: str = "a.vma", *extra: str) -> Path:
    archive = tmp_path / name
    proc = qmpbackup(
        "create", archive, "-c", inputs["conf"],
        "-d", f"format=raw:drive-scsi0={inputs['disk']}", "-d", f"format=raw:drive-efidisk0={inputs['odd']}", *extra,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return archive


def test_create_list_config_verify_extract(tmp_path: Path, inputs: dict[str, Path]) -> None:
    archive = create(tmp_path, inputs)
    proc = qmpbackup("list", archive)
    assert proc.returncode == 0
    lines = proc.stdout.decode().splitlines()
    assert lines[:3] == [
        f"CFG: size: {len(CONFIG)} name: qemu-server.conf",
        f"DEV: dev_id=1 size: {48 * CLUSTER_SIZE + 4096} devname: drive-scsi0",
        "DEV: dev_id=2 size: 1024 devname: drive-efidisk0",
    ]
    assert lines[3].startswith("CTIME: ") and len(lines) == 4

    assert qmpbackup("config", archive).stdout == CONFIG
    assert qmpbackup("config", archive, "-c", "qemu-server.conf").stdout == CONFIG
    missing = qmpbackup("config", archive, "-c", "qemu-server.fw")
    assert missing.returncode == 1
    assert "unable to find configuration data 'qemu-server.fw'" in error_line(missing)

    assert qmpbackup("verify", archive).returncode == 0
    verbose = qmpbackup("verify", archive, "-v")
    assert verbose.returncode == 0 and b"DEV: dev_id=1" in verbose.stdout
    assert verbose.stdout.decode().splitlines()[-2].startswith("total bytes read ")

    target = tmp_path / "out"
    proc = qmpbackup("extract", archive, target)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == [
        f"DEVINFO {target}/tmp-disk-drive-scsi0.raw {48 * CLUSTER_SIZE + 4096}",
        f"DEVINFO {target}/tmp-disk-drive-efidisk0.raw 1024",
    ]
    assert sorted(p.name for p in target.iterdir()) == [
        "disk-drive-efidisk0.raw", "disk-drive-scsi0.raw", "qemu-server.conf",
    ]
    assert (target / "qemu-server.conf").read_bytes() == CONFIG
    restored = target / "disk-drive-scsi0.raw"
    assert restored.read_bytes() == inputs["disk"].read_bytes()
    assert restored.stat().st_blocks * 512 < restored.stat().st_size  # sparse
    assert (target / "disk-drive-efidisk0.raw").read_bytes() == b"\x09" * 1000 + bytes(24)

    again = qmpbackup("extract", archive, target)
    assert again.returncode == 2 and "already exists" in error_line(again)


def test_extract_selected_devices(tmp_path: Path, inputs: dict[str, Path]) -> None:
    archive = create(tmp_path, inputs)
    target = tmp_path / "sel"
    proc = qmpbackup("extract", archive, "-d", "drive-efidisk0", target)
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(p.name for p in target.iterdir()) == ["disk-drive-efidisk0.raw", "qemu-server.conf"]
    proc = qmpbackup("extract", archive, "-d", "drive-nope", tmp_path / "none")
    assert proc.returncode == 2 and "no device named drive-nope" in error_line(proc)
    assert not (tmp_path / "none").exists()


def test_qcow2_input(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "3M"], check=True, timeout=30)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 64k 64k", "-c", "write -P 0x42 2M 4k", image],
        check=True, timeout=30, capture_output=True,
    )
    archive = tmp_path / "q.vma"
    assert qmpbackup("create", archive, "-d", f"format=qcow2:drive-virtio0={image}").returncode == 0
    assert qmpbackup("extract", archive, tmp_path / "x").returncode == 0
    expected = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, expected], check=True, timeout=30)
    assert (tmp_path / "x" / "disk-drive-virtio0.raw").read_bytes() == expected.read_bytes()


@pytest.mark.parametrize(
    ("method", "magic"), [("zstd", b"\x28\xb5\x2f\xfd"), ("gzip", b"\x1f\x8b"), ("lzo", b"\x89LZO")]
)
def test_compressed_archives(tmp_path: Path, inputs: dict[str, Path], method: str, magic: bytes) -> None:
    archive = create(tmp_path, inputs, f"c.vma.{method}", "--compress", method)
    assert archive.read_bytes().startswith(magic)
    assert qmpbackup("verify", archive).returncode == 0
    assert qmpbackup("config", archive).stdout == CONFIG
    from_stdin = qmpbackup("list", "-", stdin=archive.read_bytes())
    assert from_stdin.returncode == 0 and from_stdin.stdout.startswith(b"CFG: size:")
    proc = qmpbackup("extract", "-", tmp_path / "x", stdin=archive.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "x" / "disk-drive-scsi0.raw").read_bytes() == inputs["disk"].read_bytes()


def test_create_usage_errors(tmp_path: Path, inputs: dict[str, Path]) -> None:
    existing = tmp_path / "exists.vma"
    existing.write_bytes(b"keep")
    proc = qmpbackup("create", existing, "-d", f"format=raw:d={inputs['disk']}")
    assert proc.returncode == 2 and "already exists" in error_line(proc)
    assert existing.read_bytes() == b"keep"
    for spec in ("raw:d=/x", "format=raw:d", "format=raw:=x", "format=:d=x", "format=RAW!:d=x"):
        proc = qmpbackup("create", tmp_path / "n.vma", "-d", spec)
        assert proc.returncode == 2, spec
        assert "bad disk spec" in error_line(proc)
    proc = qmpbackup("create", tmp_path / "n.vma", "-d", f"format=raw:d={tmp_path / 'missing.raw'}")
    assert proc.returncode == 2 and "does not exist" in error_line(proc)
    proc = qmpbackup("create", tmp_path / "n.vma", "-d", f"format=raw:a/b={inputs['disk']}")
    assert proc.returncode == 1 and "invalid device name" in error_line(proc)
    proc = qmpbackup("create", tmp_path / "n.vma", "--compress", "bz2", "-d", f"format=raw:d={inputs['disk']}")
    assert proc.returncode == 2
    assert not list(tmp_path.glob("n.*"))  # nothing left behind, no n.vma and no n.dat


def test_create_writes_dat_then_renames(tmp_path: Path, inputs: dict[str, Path]) -> None:
    """A failing create (second disk unreadable) leaves neither the archive nor its .dat file."""
    proc = qmpbackup(
        "create", tmp_path / "f.vma.zst", "--compress", "zstd",
        "-d", f"format=raw:drive-scsi0={inputs['disk']}", "-d", f"format=qcow2:drive-scsi1={inputs['odd']}",
    )
    assert proc.returncode == 1 and "qemu-img" in error_line(proc)
    assert not list(tmp_path.glob("f.*"))
    archive = create(tmp_path, inputs, "g.vma.zst", "--compress", "zstd")
    assert archive.exists() and not (tmp_path / "g.vma.dat").exists()


def test_missing_archive_and_corruption(tmp_path: Path, inputs: dict[str, Path]) -> None:
    proc = qmpbackup("list", tmp_path / "nope.vma")
    assert proc.returncode == 2 and "cannot open archive" in error_line(proc)
    archive = create(tmp_path, inputs)
    data = bytearray(archive.read_bytes())
    data[12800 + 100] ^= 1
    broken = tmp_path / "broken.vma"
    broken.write_bytes(bytes(data))
    assert qmpbackup("list", broken).returncode == 0  # the header is fine
    proc = qmpbackup("verify", broken)
    assert proc.returncode == 1
    assert "wrong vma extent header checksum (at byte 12800)" in error_line(proc)
    proc = qmpbackup("extract", broken, tmp_path / "b")
    assert proc.returncode == 1 and not (tmp_path / "b").exists()
    proc = qmpbackup("list", inputs["conf"])
    assert proc.returncode == 1


@pytest.mark.skipif(not SAMPLE.exists(), reason="proxmox-sample.vma.gz not available")
def test_proxmox_sample_is_reported_truncated(tmp_path: Path) -> None:
    """The real sample, gzip-compressed as stored: readable header, missing clusters from 23 on."""
    proc = qmpbackup("list", SAMPLE)
    assert proc.stdout.decode().splitlines() == [
        "CFG: size: 417 name: qemu-server.conf",
        "DEV: dev_id=1 size: 10737418240 devname: drive-scsi0",
        "CTIME: Sun Oct 31 11:43:42 2021",
    ]
    proc = qmpbackup("verify", SAMPLE)
    assert proc.returncode == 1
    assert "detected missing cluster 23 for stream drive-scsi0" in error_line(proc)
    proc = qmpbackup("extract", "-", tmp_path / "s", stdin=gzip.decompress(SAMPLE.read_bytes()))
    assert proc.returncode == 1 and "missing cluster 23" in error_line(proc)
    assert not (tmp_path / "s").exists()


def _hostile(tmp_path: Path, configs: list[tuple[bytes, bytes]], devices: list[tuple[str, int]]) -> Path:
    extents = [RawExtent(slots=[fmt.blockinfo(0, dev_id, 0) for dev_id in range(1, len(devices) + 1)])]
    path = tmp_path / "hostile.vma"
    path.write_bytes(raw_archive(devices, extents, configs))
    return path


@pytest.mark.parametrize(
    ("configs", "devices", "message"),
    [
        ([(b"../escape", b"x")], [("d", 512)], "unsafe config file name"),
        ([(b"/tmp/abs", b"x")], [("d", 512)], "unsafe config file name"),
        ([(b"..", b"x")], [("d", 512)], "unsafe config file name"),
        ([(b"a\0b", b"x")], [("d", 512)], "unsafe config file name"),
        ([(b"", b"x")], [("d", 512)], "empty name"),
        ([(b"same", b"1"), (b"same", b"2")], [("d", 512)], "duplicate config file name"),
        ([(b"ok", b"x")], [("../../escape", 512)], "unsafe device name"),
        ([(b"ok", b"x")], [("", 512)], "device 1 has an empty name (at byte 4128)"),
        ([(b"ok", b"x")], [("d", 512), ("d", 512)], "duplicate device name d (at byte 4160)"),
        ([(b"disk-d.raw", b"x")], [("d", 512)], "collides with a disk"),
        ([(b"line\nbreak", b"x")], [("d", 512)], "unsafe config file name"),
    ],
)
def test_extract_refuses_hostile_names(
    tmp_path: Path, configs: list[tuple[bytes, bytes]], devices: list[tuple[str, int]], message: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    archive = _hostile(tmp_path, configs, devices)
    before = sorted(p for p in tmp_path.rglob("*"))
    proc = qmpbackup("extract", archive, work / "target")
    assert proc.returncode == 1
    assert message in error_line(proc)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing created anywhere
    assert not Path("/tmp/abs").exists()


def test_undecodable_names_round_trip_as_bytes(tmp_path: Path) -> None:
    archive = _hostile(tmp_path, [(b"conf\xff", b"data")], [("dr\udcffive", 512)])
    proc = qmpbackup("list", archive)
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[:2] == [b"CFG: size: 4 name: conf\xff",
                                            b"DEV: dev_id=1 size: 512 devname: dr\xffive"]
    proc = qmpbackup("extract", archive, tmp_path / "x")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(os.fsencode(tmp_path / "x"))) == [b"conf\xff", b"disk-dr\xffive.raw"]


def test_usage(tmp_path: Path) -> None:
    proc = qmpbackup()
    assert proc.returncode == 2
    proc = qmpbackup("list")
    assert proc.returncode == 2
    proc = qmpbackup("extract", "x.vma", tmp_path / "t", "-d", ",")
    assert proc.returncode == 2


def test_hashes_match_between_create_and_extract(tmp_path: Path) -> None:
    """A bigger disk with every block kind, through create and extract, keeps its bytes."""
    disk = tmp_path / "big.raw"
    disk.write_bytes(disk_image(130 * CLUSTER_SIZE + 512, [2, 0, 0, 1, 3, 2], 9))
    archive = tmp_path / "big.vma"
    assert qmpbackup("create", archive, "-d", f"format=raw:drive-sata0={disk}").returncode == 0
    assert qmpbackup("extract", archive, tmp_path / "o").returncode == 0
    restored = (tmp_path / "o" / "disk-drive-sata0.raw").read_bytes()
    assert hashlib.sha256(restored).digest() == hashlib.sha256(disk.read_bytes()).digest()
    assert os.path.getsize(tmp_path / "o" / "disk-drive-sata0.raw") == 130 * CLUSTER_SIZE + 512


PVE_VMA = os.environ.get("QMPBACKUP_PVE_VMA")


@pytest.mark.skipif(not PVE_VMA, reason="QMPBACKUP_PVE_VMA (Proxmox's vma binary) not set")
def test_verify_v_prints_what_proxmox_vma_prints(tmp_path: Path) -> None:
    """Same archive, same lines: list lines, one progress line per percent, the sparse statistics."""
    assert PVE_VMA is not None
    a = tmp_path / "a.raw"
    a.write_bytes(os.urandom(3 * 2**20) + bytes(2 * 2**20) + os.urandom(5000))  # data, zeros, partial cluster
    b = tmp_path / "b.raw"
    b.write_bytes(bytes(4096) + os.urandom(2**20 - 4096))  # a 4 KiB zero block inside a cluster
    conf = tmp_path / "qemu-server.conf"
    conf.write_bytes(CONFIG)
    archive = tmp_path / "p.vma"
    subprocess.run([PVE_VMA, "create", str(archive), "-c", str(conf), "-d", f"format=raw:drive-scsi0={a}",
                    "-d", f"format=raw:drive-virtio1={b}"], check=True, capture_output=True, cwd=tmp_path)
    env = dict(os.environ, TZ="UTC")
    theirs = subprocess.run([PVE_VMA, "verify", str(archive), "-v"], capture_output=True, env=env, check=False)
    ours = subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "vma", "verify", str(archive), "-v"],
                          capture_output=True, env=env, check=False)
    assert (ours.returncode, ours.stdout.decode()) == (theirs.returncode, theirs.stdout.decode())
    assert len(ours.stdout.decode().splitlines()) > 50
