"""atomic_output: O_EXCL temp, durable rename, removal on every failure, never overwriting."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from qmpbackup import atomic_file
from qmpbackup.atomic_file import DIRECT_CHUNK, OutputExistsError, OutputFile, atomic_output
from qmpbackup.errors import QmpBackupError
from qmpbackup.ionice import get_priority


def test_success_publishes_final_and_removes_temp(tmp_path: Path) -> None:
    data = os.urandom(DIRECT_CHUNK * 2 + 12345)
    final, temp = tmp_path / "a.vma", tmp_path / "a.dat"
    with atomic_output(final, temp) as out:
        assert temp.exists() and not final.exists()
        out.write(data[:100])
        out.write(memoryview(data)[100:])
    assert final.read_bytes() == data
    assert not temp.exists()


def test_small_odd_writes_flush_and_tell(tmp_path: Path) -> None:
    final = tmp_path / "b"
    pieces = [os.urandom(n) for n in (1, 4095, 4097, 65536, 3, DIRECT_CHUNK + 1, 7)]
    with atomic_output(final, tmp_path / "b.dat") as out:
        written = 0
        for piece in pieces:
            out.write(piece)
            written += len(piece)
            assert out.tell() == written
            out.flush()  # only the aligned part goes out; the tail waits
    assert final.read_bytes() == b"".join(pieces)


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_any_exception_removes_temp_and_propagates(tmp_path: Path, exc_type: type[BaseException]) -> None:
    final, temp = tmp_path / "c", tmp_path / "c.dat"
    with pytest.raises(exc_type), atomic_output(final, temp) as out:
        out.write(b"partial" * 1_000_000)
        raise exc_type("stop")
    assert not temp.exists() and not final.exists()


def test_refuses_existing_final(tmp_path: Path) -> None:
    final, temp = tmp_path / "d", tmp_path / "d.dat"
    final.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="already exists") as err, atomic_output(final, temp):
        pass
    assert isinstance(err.value, QmpBackupError)
    assert final.read_bytes() == b"precious" and not temp.exists()


def test_final_appearing_meanwhile_is_not_overwritten(tmp_path: Path) -> None:
    final, temp = tmp_path / "e", tmp_path / "e.dat"
    with pytest.raises(OutputExistsError), atomic_output(final, temp) as out:
        out.write(b"new")
        final.write_bytes(b"someone else's")
    assert final.read_bytes() == b"someone else's" and not temp.exists()


def test_refuses_existing_temp_and_leaves_it(tmp_path: Path) -> None:
    final, temp = tmp_path / "f", tmp_path / "f.dat"
    temp.write_bytes(b"leftover")
    with pytest.raises(OutputExistsError, match="left over"), atomic_output(final, temp):
        pass
    assert temp.read_bytes() == b"leftover" and not final.exists()


def supports_o_direct(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def test_direct_io_where_the_file_system_has_it(tmp_path: Path) -> None:
    if not supports_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    with atomic_output(tmp_path / "g", tmp_path / "g.dat") as out:
        assert isinstance(out, OutputFile)
        assert out.direct
        out.write(b"z" * 10)
    assert (tmp_path / "g").read_bytes() == b"z" * 10


def test_without_o_direct_support_writes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fcntl = fcntl.fcntl

    def refuse_direct(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", refuse_direct)
    data = os.urandom(DIRECT_CHUNK + 99)
    with atomic_output(tmp_path / "t", tmp_path / "t.dat") as out:
        assert isinstance(out, OutputFile) and not out.direct
        out.write(data)
    assert (tmp_path / "t").read_bytes() == data


def test_fileno_hands_over_to_a_child_writer(tmp_path: Path) -> None:
    """Our buffered bytes go out first, then a child writes unaligned data to the same descriptor."""
    final = tmp_path / "h"
    with atomic_output(final, tmp_path / "h.dat") as out:
        out.write(b"A" * 5000)
        subprocess.run(["printf", "child"], stdout=out.fileno(), check=True)
        assert isinstance(out, OutputFile) and not out.direct
        out.write(b"B" * 3)
    assert final.read_bytes() == b"A" * 5000 + b"child" + b"BBB"


def test_many_odd_writes_and_flushes_keep_order_and_position(tmp_path: Path) -> None:
    """The background writer gets full buffers and flushed aligned parts in the order written."""
    if not supports_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    rng = random.Random(5)
    expected = bytearray()
    with atomic_output(tmp_path / "o", tmp_path / "o.dat") as out:
        for step in range(60):
            piece = rng.randbytes(rng.choice((1, 4095, 65536, DIRECT_CHUNK - 3, 300_000)))
            out.write(piece)
            expected += piece
            assert out.tell() == len(expected)
            if step % 7 == 0:
                out.flush()
    assert (tmp_path / "o").read_bytes() == expected


def test_a_failed_background_write_fails_the_output_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not supports_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")

    def disk_full(fd: int, view: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_file, "write_aligned", disk_full)
    final, temp = tmp_path / "f", tmp_path / "f.dat"
    with pytest.raises(OSError, match="No space left") as err, atomic_output(final, temp) as out:
        for _ in range(8):
            out.write(bytes(DIRECT_CHUNK))
    assert err.value.errno == errno.ENOSPC
    assert not final.exists() and not temp.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("write ")]


def test_the_writer_thread_carries_the_ionice_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not supports_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    seen: list[tuple[int, int]] = []
    real = atomic_file.write_aligned

    def record(fd: int, view: memoryview) -> None:
        tid = threading.get_native_id()
        seen.append((get_priority(tid).ioclass, tid))
        real(fd, view)

    monkeypatch.setattr(atomic_file, "write_aligned", record)
    with atomic_output(tmp_path / "i", tmp_path / "i.dat", ionice=8) as out:
        out.write(bytes(DIRECT_CHUNK + 4096))
    assert seen and all(ioclass == int(psutil.IOPRIO_CLASS_IDLE) for ioclass, _ in seen)
    assert all(tid != threading.get_native_id() for _, tid in seen)
    assert get_priority(threading.get_native_id()).ioclass != int(psutil.IOPRIO_CLASS_IDLE)
