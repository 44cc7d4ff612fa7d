"""A real QEMU ``blockdev-backup`` into our NBD server, on every QEMU version under test."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpbackup.backup.assembler import ClusterAssembler
from qmpbackup.nbd import Export, NbdConsumerError, NbdServer
from tests.nbd.conftest import RecordingSink, ServeFactory, assert_same_as_file
from tests.nbd.images import MiB, make_raw, to_qcow2
from tests.nbd.qemu_vm import backup_to_nbd, paused_qemu
from tests.support.qemu import QemuBinaries

pytestmark = pytest.mark.qemu

SOURCES = [
    ("sparse", 16 * MiB, "raw"),
    ("random", 16 * MiB, "raw"),
    ("zero-regions", 16 * MiB, "raw"),
    ("tail", 12 * MiB + 4608, "raw"),     # not a multiple of 64 KiB
    ("zero-regions", 16 * MiB, "qcow2"),
    ("tail", 12 * MiB + 4608, "qcow2"),
]


@pytest.mark.parametrize(("kind", "size", "fmt"), SOURCES,
                         ids=[f"{k}-{f}-{s}" for k, s, f in SOURCES])
async def test_backup_job_into_server(qemu: QemuBinaries, kind: str, size: int, fmt: str,
                                      tmp_path: Path, sockdir: Path, serve: ServeFactory) -> None:
    raw = make_raw(tmp_path / "src.raw", size, kind)
    source = raw if fmt == "raw" else to_qcow2(str(qemu.img), raw, tmp_path / "src.qcow2")
    async with serve({"drive-scsi0": size}) as served:
        async with paused_qemu(qemu, sockdir, {"disk0": (source, fmt)}) as qmp:
            event = await backup_to_nbd(qmp, "disk0", served.socket, "drive-scsi0")
            assert event["event"] == "BLOCK_JOB_COMPLETED"
            assert "error" not in event, event
            await served.server.wait_disconnected("drive-scsi0", timeout=10)
        served.server.check()
        asm = served.assemblers["drive-scsi0"]
        asm.finish()
        assert_same_as_file(served.sink, 1, raw, size)
        assert asm.partial_clusters == 0
        assert asm.stats.bytes_written + asm.stats.bytes_zeroed <= size
        assert asm.stats.duplicate_bytes == 0


async def test_two_drives_one_server(qemu: QemuBinaries, tmp_path: Path, sockdir: Path, serve: ServeFactory) -> None:
    a = make_raw(tmp_path / "a.raw", 8 * MiB, "random", seed=2)
    b = make_raw(tmp_path / "b.raw", 4 * MiB + 512, "sparse", seed=3)
    async with serve({"drive-scsi0": 8 * MiB, "drive-virtio1": 4 * MiB + 512}) as served:
        async with paused_qemu(qemu, sockdir, {"d0": (a, "raw"), "d1": (b, "raw")}) as qmp:
            await backup_to_nbd(qmp, "d0", served.socket, "drive-scsi0", job="j0")
            await backup_to_nbd(qmp, "d1", served.socket, "drive-virtio1", job="j1")
        for asm in served.assemblers.values():
            asm.finish()
        served.server.check()
        assert_same_as_file(served.sink, 1, a, 8 * MiB)
        assert_same_as_file(served.sink, 2, b, 4 * MiB + 512)


class FailingAt:
    """Wraps an assembler; the write covering ``bad_offset`` fails like a consumer bug."""

    def __init__(self, inner: ClusterAssembler, bad_offset: int) -> None:
        self.inner = inner
        self.bad_offset = bad_offset

    async def write(self, offset: int, data: memoryview, /) -> None:
        if offset <= self.bad_offset < offset + len(data):
            raise OSError(28, "No space left on device")
        await self.inner.write(offset, data)

    async def write_zeroes(self, offset: int, length: int, /) -> None:
        await self.inner.write_zeroes(offset, length)

    async def trim(self, offset: int, length: int, /) -> None:
        await self.inner.trim(offset, length)

    async def flush(self) -> None:
        await self.inner.flush()


async def test_consumer_failure_fails_the_job(qemu: QemuBinaries, tmp_path: Path,
                                              sockdir: Path) -> None:
    size = 16 * MiB
    raw = make_raw(tmp_path / "src.raw", size, "random")
    consumer = FailingAt(ClusterAssembler(RecordingSink(), 1, size), 9 * MiB)
    async with NbdServer(sockdir / "nbd.sock", [Export("d", size, consumer)]) as server:
        async with paused_qemu(qemu, sockdir, {"disk0": (raw, "raw")}) as qmp:
            event = await backup_to_nbd(qmp, "disk0", str(server.path), "d")
        assert event["event"] == "BLOCK_JOB_COMPLETED"
        assert "error" in event
        failure = server.failure
        assert isinstance(failure, NbdConsumerError)
        assert "No space left" in str(failure)
