"""The read-ahead thread: same bytes, errors passed on in order, prompt stop."""

from __future__ import annotations

import io
import threading
import time

import pytest

from qmpbackup.restore.prefetch import PrefetchSource


def read_all(source: PrefetchSource, sizes: list[int]) -> bytes:
    out = []
    i = 0
    while chunk := source.read(sizes[i % len(sizes)]):
        out.append(chunk)
        i += 1
    return b"".join(out)


def test_same_bytes_for_any_read_sizes() -> None:
    data = bytes(range(256)) * 4099
    source = PrefetchSource(io.BytesIO(data), chunk=1000, depth=2)
    try:
        assert read_all(source, [512, 3, 4096, 1000, 1]) == data
        assert source.read(10) == b""
    finally:
        source.close()


class Failing:
    def __init__(self) -> None:
        self.calls = 0

    def read(self, n: int, /) -> bytes:
        self.calls += 1
        if self.calls > 2:
            raise OSError(5, "Input/output error")
        return b"x" * n


def test_an_error_arrives_after_the_data_before_it() -> None:
    source = PrefetchSource(Failing(), chunk=10, depth=4)
    try:
        assert source.read(10) == b"x" * 10
        assert source.read(100) == b"x" * 10
        with pytest.raises(OSError, match="Input/output error"):
            source.read(10)
        assert source.read(10) == b""
    finally:
        source.close()


class Endless:
    def read(self, n: int, /) -> bytes:
        return b"y" * n


def test_close_stops_a_thread_blocked_on_a_full_queue() -> None:
    source = PrefetchSource(Endless(), chunk=10, depth=1)
    source.read(5)
    started = time.monotonic()
    source.close()
    assert time.monotonic() - started < 2
    assert not any(t.name == "qmpbackup-prefetch" and t.is_alive() for t in threading.enumerate())
