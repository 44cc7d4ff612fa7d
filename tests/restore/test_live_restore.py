"""restore --live: the test guest runs from its own archive while its disk is copied.

The copy is held back with --bwlimit so that the guest answers (and writes) before it ends; once it
has, the test lifts the limit through a monitor of its own (qmpbackup holds the VM's QMP socket), so
that the rest of the copy does not take the suite's time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.cli.main import main
from qmpbackup.guest_agent import GuestAgentClient
from qmpbackup.qemu.session import QmpSession
from qmpbackup.vma.index import ArchiveIndex
from tests.support.guest import GuestImage, guest_image  # noqa: F401  (fixture)
from tests.support.qemu import QemuBinaries, qemu  # noqa: F401  (fixture)

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.timeout(900)]

PAYLOAD = os.urandom(48 << 20)
JOB = "live-restore-drive-virtio0"


@pytest.fixture(autouse=True)
def qemu_on_path(qemu: QemuBinaries, monkeypatch: pytest.MonkeyPatch) -> QemuBinaries:  # noqa: F811
    """Every test runs once per QEMU version: the VM qmpbackup starts is the first on PATH."""
    monkeypatch.setenv("PATH", f"{qemu.system.parent}:{os.environ['PATH']}")
    return qemu


def _archive(tmp_path: Path, image: GuestImage, compress: str = "zstd") -> Path:
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "keep" / "payload.bin").write_bytes(PAYLOAD)
    data = tmp_path / "data.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(data), "96M"], check=True, capture_output=True)
    append = "console=ttyS0 quiet panic=-1 guest.data=/dev/vda guest.writer=0"
    monitor = f"-qmp unix:{tmp_path / 'mon.sock'},server=on,wait=off"
    conf = tmp_path / "qemu-server.conf"
    conf.write_text(f"name: live\nmemory: 128\nmachine: q35\nagent: 1\nvirtio0: local:100/vm-100-disk-0.raw,size=96M\n"
                    f"args: -kernel {image.vmlinuz} -initrd {image.initrd} -append '{append}' {monitor}\n"
                    "#qmdump#map:virtio0:drive-virtio0:local:raw:\n")
    archive = tmp_path / ("vzdump-qemu-100-2026_12_04-10_00_00.vma" + (".zst" if compress == "zstd" else ""))
    assert main(["vma", "create", str(archive), "-c", str(conf), "--compress", compress,
                 "-d", f"format=raw:drive-virtio0={data}"]) == 0
    return archive


def _full_speed(tmp_path: Path) -> None:
    """The copy job without its limit, through the test's own monitor."""
    asyncio.run(_qmp(tmp_path / "mon.sock", "block-job-set-speed", {"device": JOB, "speed": 0}))


async def _agent_call(sock: Path, command: str, args: dict[str, object] | None = None) -> object:
    async with GuestAgentClient(str(sock)) as agent:
        return await agent.execute(command, args)


def test_live_restore_serves_the_guest_while_copying(tmp_path: Path, guest_image: GuestImage,  # noqa: F811
                                                      isolated_config: Path) -> None:
    archive = _archive(tmp_path, guest_image)
    target, run_dir = tmp_path / "images", tmp_path / "run"
    target.mkdir()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "qmpbackup.cli.main", "restore", str(archive), "100", "--live",
                             "--target-dir", str(target), "--run-dir", str(run_dir), "--bwlimit", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    qga = run_dir / "vms" / "100" / "qga.sock"
    answered = None
    try:
        while time.monotonic() - started < 240 and proc.poll() is None:
            if qga.exists():
                try:
                    asyncio.run(_agent_call(qga, "guest-ping"))
                    answered = time.monotonic() - started
                    break
                except Exception:
                    pass
            time.sleep(0.5)
        assert answered is not None and proc.poll() is None, "the guest did not answer during the copy"

        async def write_file() -> None:
            async with GuestAgentClient(str(qga)) as agent:
                handle = await agent.execute("guest-file-open", {"path": "/mnt/data/live.txt", "mode": "w"})
                await agent.execute("guest-file-write", {"handle": handle,
                                                         "buf-b64": base64.b64encode(b"written live\n").decode()})
                await agent.execute("guest-file-flush", {"handle": handle})
                await agent.execute("guest-file-close", {"handle": handle})

        asyncio.run(write_file())
        _full_speed(tmp_path)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "the VM was up" in err and "progress 100%" in err
        qmp = run_dir / "vms" / "100" / "qmp.sock"  # paused only for the pivot, running again
        assert asyncio.run(_qmp(qmp, "query-status"))["status"] == "running"
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "stop", "100", "--run-dir", str(run_dir),
                        "--timeout", "60"], capture_output=True, timeout=120)
    _check_image(tmp_path, target / "vm-100-disk-0.qcow2", b"written live\n")
    assert sorted(p.name for p in target.iterdir()) == ["vm-100-disk-0.qcow2"]  # no overlay or work file left
    assert not (run_dir / "live-restore" / "100").exists()


def _check_image(tmp_path: Path, image: Path, live_text: bytes | None) -> None:
    info = subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True,
                          check=True).stdout
    assert "backing-filename" not in info
    assert json.loads(info)["actual-size"] < 72 << 20  # sparse: the 48 MiB payload, not the 96 MiB disk
    raw = tmp_path / "restored.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    assert subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True).returncode == 0
    dump = subprocess.run(["debugfs", "-R", "cat /keep/payload.bin", str(raw)], capture_output=True, check=True)
    assert dump.stdout == PAYLOAD
    if live_text is not None:
        live = subprocess.run(["debugfs", "-R", "cat /live.txt", str(raw)], capture_output=True, check=True)
        assert live.stdout == live_text


def test_a_killed_live_restore_resumes_without_guest_io_errors(tmp_path: Path, guest_image: GuestImage,  # noqa: F811
                                                                 isolated_config: Path) -> None:
    archive = _archive(tmp_path, guest_image)
    target, run_dir = tmp_path / "images", tmp_path / "run"
    target.mkdir()
    cmd = [sys.executable, "-m", "qmpbackup.cli.main", "restore"]
    proc = subprocess.Popen([*cmd, str(archive), "100", "--live", "--target-dir", str(target),
                             "--run-dir", str(run_dir), "--bwlimit", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    qga = run_dir / "vms" / "100" / "qga.sock"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                asyncio.run(_agent_call(qga, "guest-ping"))
                break
            except Exception:
                time.sleep(0.5)
        assert proc.poll() is None, "the copy ended before the kill"
        _full_speed(tmp_path)  # what is left after the kill and the resume is not held back
        proc.kill()
        proc.wait()
        time.sleep(2)  # the guest's reads of uncopied clusters now wait for the export to come back
        resumed = subprocess.run([*cmd, "--live", "--resume", "100", "--run-dir", str(run_dir)],
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr

        async def dmesg() -> str:
            async with GuestAgentClient(str(qga)) as agent:
                pid = (await agent.execute("guest-exec", {"path": "/bin/dmesg", "capture-output": True}))["pid"]
                for _ in range(100):
                    status = await agent.execute("guest-exec-status", {"pid": pid})
                    if status.get("exited"):
                        return base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                    await asyncio.sleep(0.1)
            raise AssertionError("dmesg did not finish")

        kernel_log = asyncio.run(dmesg())
        assert "I/O error" not in kernel_log and "EXT4-fs error" not in kernel_log, kernel_log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([sys.executable, "-m", "qmpbackup.cli.main", "stop", "100", "--run-dir", str(run_dir),
                        "--timeout", "60"], capture_output=True, timeout=120)
    _check_image(tmp_path, target / "vm-100-disk-0.qcow2", None)


async def _qmp(sock: Path, command: str, args: dict[str, object] | None = None) -> Any:
    async with QmpSession(100, sock) as session:
        return await session.execute(command, args)


def test_a_damaged_cluster_pauses_the_vm_and_is_named(tmp_path: Path, guest_image: GuestImage,  # noqa: F811
                                                      isolated_config: Path) -> None:
    """One flipped byte in a payload cluster of a plain .vma: the copy stops there, the VM is paused (not
    killed), the error names the cluster as verify does, nothing is deleted; cleanup names the command that
    finishes the restore and leaves the VM alone; --resume fails the same way until the archive is repaired,
    then finishes the copy and the VM runs again."""
    archive = _archive(tmp_path, guest_image, compress="none")
    raw = (tmp_path / "data.raw").read_bytes()
    at = raw.index(PAYLOAD[32 << 20:(32 << 20) + 4096])
    cluster = at // 65536 + 1  # a cluster wholly inside the payload, half-way through the disk
    with ArchiveIndex.open(archive) as index:
        dev = index.devices[0]
        record = index.record(dev, cluster)
        assert record.mask == 0xFFFF
    offset = record.data_offset
    with open(archive, "r+b") as f:
        f.seek(offset + 1000)
        good = f.read(1)
        f.seek(offset + 1000)
        f.write(bytes([good[0] ^ 0xFF]))
    named = f"data checksum mismatch in drive-virtio0 cluster {cluster} (byte offset {offset})"
    target, run_dir = tmp_path / "images", tmp_path / "run"
    target.mkdir()
    cli = [sys.executable, "-m", "qmpbackup.cli.main"]
    qmp = run_dir / "vms" / "100" / "qmp.sock"
    try:
        failed = subprocess.run([*cli, "restore", str(archive), "100", "--live", "--target-dir", str(target),
                                 "--run-dir", str(run_dir), "--bwlimit", "16384"],
                                capture_output=True, text=True, timeout=600)
        assert failed.returncode != 0
        assert named in failed.stderr and "the VM is paused" in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
        assert asyncio.run(_qmp(qmp, "query-status"))["status"] == "paused"
        image = target / "vm-100-disk-0.qcow2"
        assert image.exists() and (target / ".vm-100-disk-0.qcow2.live-target").exists()
        assert "backing-filename" in json.loads(subprocess.run(  # the image's name is still the overlay
            ["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, text=True,
            check=True).stdout)
        assert (isolated_config / "guests" / "100.conf").exists()
        assert (run_dir / "live-restore" / "100" / "state.json").exists()

        cleanup = subprocess.run([*cli, "cleanup", "100", "--run-dir", str(run_dir)], capture_output=True,
                                 text=True, timeout=120)
        assert cleanup.returncode == 1
        assert f"qmpbackup restore --live --resume 100 --run-dir {run_dir}" in cleanup.stdout, cleanup.stdout
        assert asyncio.run(_qmp(qmp, "query-status"))["status"] == "paused"
        assert [j["device"] for j in asyncio.run(_qmp(qmp, "query-block-jobs"))] == [JOB]

        resume = [*cli, "restore", "--live", "--resume", "100", "--run-dir", str(run_dir)]
        again = subprocess.run(resume, capture_output=True, text=True, timeout=600)
        assert again.returncode != 0 and named in again.stderr, again.stderr
        assert asyncio.run(_qmp(qmp, "query-status"))["status"] == "paused"

        with open(archive, "r+b") as f:  # the archive repaired (e.g. copied again from elsewhere)
            f.seek(offset + 1000)
            f.write(good)
        done = subprocess.run(resume, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert asyncio.run(_qmp(qmp, "query-status"))["status"] == "running"
        assert not (run_dir / "live-restore" / "100").exists()
    finally:
        subprocess.run([*cli, "stop", "100", "--run-dir", str(run_dir), "--timeout", "60"], capture_output=True,
                       timeout=120)
    _check_image(tmp_path, target / "vm-100-disk-0.qcow2", None)
    assert sorted(p.name for p in target.iterdir()) == ["vm-100-disk-0.qcow2"]
