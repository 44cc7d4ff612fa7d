"""The token bucket: exact rate in real time, no initial burst, bounded burst after idling, sync and async."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest

from qmpbackup.throttle import ThrottledSink, ThrottledSource, TokenBucket

MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_starts_empty_no_initial_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(MiB, clock=clock)
    assert bucket.reserve(MiB) == pytest.approx(1.0)


def test_debt_accumulates_for_later_callers() -> None:
    clock = FakeClock()
    bucket = TokenBucket(MiB, clock=clock)
    assert bucket.reserve(MiB // 2) == pytest.approx(0.5)
    assert bucket.reserve(MiB // 2) == pytest.approx(1.0)
    clock.now += 1.0
    assert bucket.reserve(MiB) == pytest.approx(1.0)


def test_idle_time_earns_only_a_short_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(MiB, burst_s=0.1, clock=clock)
    clock.now += 60
    assert bucket.reserve(MiB // 10) == 0.0
    assert bucket.reserve(MiB) == pytest.approx(1.0)


def test_unlimited_and_live_rate_change() -> None:
    clock = FakeClock()
    bucket = TokenBucket(0, clock=clock)
    assert bucket.reserve(10**12) == 0.0
    bucket.set_rate(2 * MiB)
    assert bucket.reserve(MiB) == pytest.approx(0.5)
    bucket.set_rate(-1)
    assert bucket.reserve(10**12) == 0.0


def test_negative_count_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(1).reserve(-1)


def test_source_limit_10_mib_per_s_measures_10_plus_minus_1() -> None:
    """Real time, about 3 s: restore's --bwlimit 10240 on the archive read."""
    source = ThrottledSource(io.BytesIO(bytes(64 * MiB)), TokenBucket(10 * MiB))
    start = time.monotonic()
    total = 0
    while time.monotonic() - start < 3.0:
        total += len(source.read(256 << 10))
    rate = total / (time.monotonic() - start) / MiB
    assert 9.0 <= rate <= 11.0, rate


def test_threads_share_one_bucket() -> None:
    bucket = TokenBucket(8 * MiB)
    sink = ThrottledSink(io.BytesIO(), bucket)
    lock = threading.Lock()
    counts = [0]

    def pump(stop: float) -> None:
        while time.monotonic() < stop:
            sink.write(bytes(128 << 10))
            with lock:
                counts[0] += 128 << 10

    start = time.monotonic()
    threads = [threading.Thread(target=pump, args=(start + 1.0,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = counts[0] / (time.monotonic() - start) / MiB
    assert 7.0 <= rate <= 9.0, rate


async def test_async_consumers_do_not_block_the_loop() -> None:
    bucket = TokenBucket(4 * MiB)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    start = time.monotonic()
    try:
        for _ in range(16):
            await bucket.aconsume(256 << 10)
    finally:
        tick_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await tick_task
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed <= 1.2
    assert ticks >= 50
