"""qemu-img and qemu-io (real NBD clients) writing into our server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.nbd.conftest import ServeFactory, assert_same_as_file
from tests.nbd.images import MiB, make_raw
from tests.support.qemu import QemuBinaries

pytestmark = pytest.mark.qemu


async def run(*args: str, timeout: float = 60, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if check:
        assert proc.returncode == 0, out.decode()
    return out.decode()


@pytest.mark.parametrize("parallel", [False, True], ids=["in-order", "W"])
async def test_qemu_img_convert(qemu: QemuBinaries, parallel: bool, tmp_path: Path, serve: ServeFactory) -> None:
    size = 20 * MiB + 4608
    src = make_raw(tmp_path / "src.raw", size, "zero-regions")
    async with serve({"d0": size}) as served:
        args = [str(qemu.img), "convert", "-n", "-f", "raw", "-O", "raw"]
        if parallel:
            args.append("-W")
        await run(*args, str(src), served.url("d0"))
        await served.server.wait_disconnected("d0", timeout=10)
        served.server.check()
        asm = served.assemblers["d0"]
        asm.finish()
        assert_same_as_file(served.sink, 1, src, size)


async def test_qemu_io_commands(qemu: QemuBinaries, tmp_path: Path, serve: ServeFactory) -> None:
    size = 4 * MiB + 65536 + 512
    commands = [
        "write -P 0xab 0 1M",            # whole clusters
        "write -P 0xcd 1M 4k",           # partial cluster, then the rest of it
        "write -P 0 1052672 61440",      # ... as data zeroes: cluster complete
        "write -z 2M 512k",              # WRITE_ZEROES with NO_HOLE
        "write -z -u 3M 128k",           # WRITE_ZEROES that may punch holes
        "write -f -P 0x11 3200k 64k",    # FUA
        "discard 2560k 64k",             # TRIM: ignored
        "flush",
        "aio_write -P 0x21 4M 32k",      # pipelined: two halves of one cluster
        "aio_write -P 0x22 4227072 32k",
        "aio_write -P 0x23 4259840 512", # the short last cluster, whole
        "aio_flush",
        "write -P 0 3M 64k",             # zeroes again, as data: accepted
    ]
    expect = bytearray(size)
    expect[0:MiB] = b"\xab" * MiB
    expect[MiB:MiB + 4096] = b"\xcd" * 4096
    expect[3200 * 1024:3264 * 1024] = b"\x11" * 65536
    expect[4 * MiB:4 * MiB + 32768] = b"\x21" * 32768
    expect[4227072:4227072 + 32768] = b"\x22" * 32768
    expect[4259840:] = b"\x23" * 512
    async with serve({"d0": size}) as served:
        args = [str(qemu.io), "-f", "raw"]
        for c in commands:
            args += ["-c", c]
        out = await run(*args, served.url("d0"))
        assert "failed" not in out, out
        await served.server.wait_disconnected("d0", timeout=10)
        served.server.check()
        asm = served.assemblers["d0"]
        assert asm.partial_clusters == 0
        assert asm.stats.duplicate_bytes == 65536
        assert asm.stats.bytes_trimmed == 65536
        asm.finish()
        assert served.sink.image(1, size) == bytes(expect)


async def test_read_is_refused_cleanly(qemu: QemuBinaries, serve: ServeFactory) -> None:
    async with serve({"d0": MiB}) as served:
        out = await run(str(qemu.io), "-f", "raw", "-c", "read 0 64k",
                        "-c", "write -P 1 0 64k", served.url("d0"), check=False)
        assert "read failed: Invalid argument" in out
        assert "wrote 65536/65536" in out
        served.server.check()


async def test_point_in_time_violation_fails_the_write_and_the_server(qemu: QemuBinaries, serve: ServeFactory) -> None:
    async with serve({"d0": MiB}) as served:
        out = await run(str(qemu.io), "-f", "raw", "-c", "write -P 1 0 64k",
                        "-c", "write -P 2 0 64k", served.url("d0"), check=False)
        assert "write failed: Input/output error" in out
        failure = served.server.failure
        assert failure is not None and "written twice" in str(failure)
        # After a failure, reconnects are refused (QEMU would otherwise retry).
        with pytest.raises(AssertionError):
            await run(str(qemu.io), "-f", "raw", "-c", "write -P 1 0 64k",
                      served.url("d0"))
