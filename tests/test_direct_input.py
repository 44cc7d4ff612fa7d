"""Archives are read with O_DIRECT and read-ahead: same bytes, any read sizes, errors surface."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from qmpbackup import direct_input
from qmpbackup.direct_input import CHUNK, DirectInput, open_direct


def _direct_ok(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"x")
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


@pytest.mark.parametrize("size", [0, 1, 4096, 4097, CHUNK, 3 * CHUNK + 12345])
def test_reads_return_the_file(tmp_path: Path, size: int) -> None:
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    rng = random.Random(1)
    with open_direct(str(path)) as f:
        assert isinstance(f, DirectInput) and not f.seekable()
        got = bytearray()
        while True:
            if rng.random() < 0.5:
                chunk = f.read(rng.choice((1, 3, 4096, 100_000, CHUNK + 7)))
            else:
                buf = bytearray(rng.choice((5, 65536, 2 * CHUNK)))
                chunk = bytes(buf[: f.readinto(buf)])
            if not chunk:
                break
            got += chunk
    assert got == data


def test_a_read_error_reaches_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    path = tmp_path / "f"
    path.write_bytes(bytes(3 * CHUNK))
    real = os.readv
    calls = []

    def failing(fd: int, buffers: list[object]) -> int:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(fd, buffers)  # type: ignore[arg-type]

    monkeypatch.setattr(direct_input.os, "readv", failing)
    with open_direct(str(path)) as f:
        assert len(f.read(CHUNK)) == CHUNK
        with pytest.raises(OSError, match="Input/output"):
            f.read(CHUNK)


def test_without_o_direct_a_plain_file_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    real_open = os.open

    def no_direct(name: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(name, flags, *args)

    monkeypatch.setattr(direct_input.os, "open", no_direct)
    with open_direct(str(path)) as f:
        assert not isinstance(f, DirectInput)
        assert f.read() == b"abc"
