"""Real NBD clients reading our read-only exports: qemu-img (7.2 and 10.0), nbdinfo, nbdcopy.

Export sources are raw files here (tests.nbd.file_source); tests/cli/test_export_cmd.py runs
the same clients against ``qmpbackup export`` of real archives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.nbd.conftest import ReadServeFactory, url
from tests.nbd.file_source import zero_ranges
from tests.nbd.images import MiB, make_raw
from tests.nbd.test_qemu_tools import run
from tests.support.qemu import QemuBinaries

pytestmark = pytest.mark.qemu

SIZE = 12 * MiB + 4608  # odd size; data, allocated zeroes, a punched hole, a short tail


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in ranges:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


def qemu_img_zero_ranges(map_json: str) -> list[tuple[int, int]]:
    entries = json.loads(map_json)
    return merged([(e["start"], e["length"]) for e in entries if e["zero"] and not e["data"]])


async def test_qemu_img_convert_and_map(qemu: QemuBinaries, tmp_path: Path,
                                        serve_files: ReadServeFactory) -> None:
    src = make_raw(tmp_path / "src.raw", SIZE, "zero-regions")
    other = make_raw(tmp_path / "other.raw", 3 * MiB + 512, "sparse")
    async with serve_files({"drive-scsi0": src, "drive-scsi1": other}) as server:
        for name, path in (("drive-scsi0", src), ("drive-scsi1", other)):
            out = tmp_path / f"{name}.out"
            await run(str(qemu.img), "convert", "-f", "raw", "-O", "raw", url(server, name), str(out))
            assert out.read_bytes() == path.read_bytes()
            mapped = await run(str(qemu.img), "map", "--output=json", "-f", "raw", url(server, name))
            assert qemu_img_zero_ranges(mapped) == zero_ranges(path)
        assert server.failure is None


async def test_qemu_io_read_only(qemu: QemuBinaries, tmp_path: Path, serve_files: ReadServeFactory) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x11" * MiB + b"\x22" * 4096)
    async with serve_files({"d0": src}) as server:
        out = await run(str(qemu.io), "-f", "raw", "-c", "write -P 1 0 64k", url(server, "d0"), check=False)
        assert "Permission denied" in out and "wrote" not in out, out
        out = await run(str(qemu.io), "-r", "-f", "raw", "-c", "read -P 0x11 0 1M",
                        "-c", "read -P 0x22 1M 4k", url(server, "d0"))
        assert "read 1048576/1048576" in out and "read 4096/4096" in out, out


@pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="libnbd-bin (scripts/setup installs it)")
async def test_nbdinfo_map_and_nbdcopy(tmp_path: Path, serve_files: ReadServeFactory) -> None:
    src = make_raw(tmp_path / "src.raw", SIZE, "zero-regions")
    async with serve_files({"drive-scsi0": src}) as server:
        u = url(server, "drive-scsi0")
        info = json.loads(await run("nbdinfo", "--json", u))
        [export] = info["exports"]
        assert export["export-size"] == SIZE and export["is_read_only"] is True
        assert "base:allocation" in export["contexts"]
        zero = []
        for line in (await run("nbdinfo", "--map", u)).splitlines():
            offset, length, status, *_ = line.split()
            assert int(status) in (0, 3), line
            if int(status) == 3:
                zero.append((int(offset), int(length)))
        assert merged(zero) == zero_ranges(src)
        out = tmp_path / "copy.raw"
        await run("nbdcopy", u, str(out))
        assert out.read_bytes() == src.read_bytes()
        assert server.failure is None
