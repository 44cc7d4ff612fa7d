"""ionice really applied: read back with psutil from the child compressor and from our writing thread."""

from __future__ import annotations

import threading
from pathlib import Path

import psutil
import pytest

from qmpbackup.compress import Compression, CompressOptions, open_compressor
from qmpbackup.errors import UsageError
from qmpbackup.ionice import ThreadIonice, apply_ionice, get_priority, io_priority


def current_thread_ionice() -> tuple[int, int]:
    value = psutil.Process(threading.get_native_id()).ionice()
    return int(value.ioclass), int(value.value)


@pytest.mark.parametrize(
    ("level", "expected"),
    [(0, (psutil.IOPRIO_CLASS_BE, 0)), (7, (psutil.IOPRIO_CLASS_BE, 7)), (8, (psutil.IOPRIO_CLASS_IDLE, 0))],
)
def test_levels_map_like_vzdump(level: int, expected: tuple[int, int]) -> None:
    priority = io_priority(level)
    assert (priority.ioclass, priority.value) == expected


@pytest.mark.parametrize("level", [-1, 9])
def test_bad_level(level: int) -> None:
    with pytest.raises(UsageError, match="0-8"):
        io_priority(level)


@pytest.mark.parametrize(("compression", "level"), [(Compression.GZIP, 5), (Compression.LZO, 8)])
def test_child_compressor_gets_the_priority(tmp_path: Path, compression: Compression, level: int) -> None:
    with open(tmp_path / "out", "wb") as out, open_compressor(out, compression, CompressOptions(ionice=level)) as comp:
        comp.write(b"data" * 1000)
        (child,) = psutil.Process().children()
        got = child.ionice()
        expected = io_priority(level)
        assert (got.ioclass, got.value) == (expected.ioclass, expected.value)


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.ZSTD])
def test_in_process_writer_thread_gets_the_priority_and_gets_it_back(tmp_path: Path, compression: Compression) -> None:
    before = current_thread_ionice()
    seen: list[tuple[int, int]] = []
    with open(tmp_path / "out", "wb") as out, open_compressor(out, compression, CompressOptions(ionice=6)) as comp:
        comp.write(b"x" * 100_000)
        seen.append(current_thread_ionice())
    assert seen == [(psutil.IOPRIO_CLASS_BE, 6)]
    assert current_thread_ionice() == before


def test_thread_ionice_touches_only_threads_that_write() -> None:
    guard = ThreadIonice(8)
    results: dict[str, tuple[int, int]] = {}

    def writer() -> None:
        guard.enter_current()
        results["writer"] = current_thread_ionice()

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    results["main"] = current_thread_ionice()
    guard.restore()
    assert results["writer"] == (psutil.IOPRIO_CLASS_IDLE, 0)
    assert results["main"][0] != psutil.IOPRIO_CLASS_IDLE


def test_apply_to_a_finished_process_reports_false() -> None:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    assert apply_ionice(proc.pid, 3) is False
    assert get_priority(psutil.Process().pid) is not None
