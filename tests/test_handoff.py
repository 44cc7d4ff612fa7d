"""The hand-off between a pipeline and its helper thread: order, errors, stop, and the one stall policy."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from qmpbackup import atomic_file, handoff
from qmpbackup.atomic_file import DIRECT_CHUNK, atomic_output
from qmpbackup.handoff import Handoff, Owner, Stalled
from qmpbackup.restore.raw_image import WritePool
from tests.test_atomic_file import supports_o_direct


def test_items_arrive_in_order_then_the_end() -> None:
    h: Handoff[int] = Handoff(2, "counting", owner=Owner.CONSUMER)

    def produce() -> None:
        for i in range(100):
            assert h.put(i)

    h.start(produce, "test-producer")
    got = []
    while (item := h.get()) is not None:
        got.append(item)
    assert got == list(range(100))
    assert h.get() is None
    assert h.stop()


def test_the_helpers_error_comes_after_the_items_before_it_and_stays() -> None:
    h: Handoff[int] = Handoff(4, "reading", owner=Owner.CONSUMER)

    def produce() -> None:
        h.put(1)
        h.put(2)
        raise OSError(5, "Input/output error")

    h.start(produce, "test-producer")
    assert [h.get(), h.get()] == [1, 2]
    for _ in range(2):
        with pytest.raises(OSError, match="Input/output error"):
            h.get()
    h.stop()


def test_an_owning_producer_meets_the_helpers_error_on_its_next_wait() -> None:
    h: Handoff[int] = Handoff(1, "writing", owner=Owner.PRODUCER)

    def consume() -> None:
        h.get()
        raise OSError(28, "No space left on device")

    h.start(consume, "test-consumer")
    h.put(1)
    with pytest.raises(OSError, match="No space left"):
        for i in range(10):
            h.put(i)
    with pytest.raises(OSError, match="No space left"):
        h.join()
    h.stop()


def test_join_waits_until_every_item_is_done() -> None:
    h: Handoff[int] = Handoff(1, "writing", owner=Owner.PRODUCER)
    done: list[int] = []

    def consume() -> None:
        while (item := h.get()) is not None:
            time.sleep(0.01)
            done.append(item)
            h.done()

    h.start(consume, "test-consumer")
    for i in range(5):
        h.put(i)
    h.join()
    assert done == list(range(5))
    h.finish()
    assert h.stop()


def test_close_ends_the_helpers_waits_at_once() -> None:
    h: Handoff[int] = Handoff(1, "reading", owner=Owner.CONSUMER)

    def produce() -> None:
        while h.put(0):
            pass

    h.start(produce, "test-blocked-producer")
    assert h.get() == 0
    started = time.monotonic()
    assert h.stop()
    assert time.monotonic() - started < 5
    assert not [t for t in threading.enumerate() if t.name == "test-blocked-producer"]


def test_the_owner_gives_up_after_the_stall_time_without_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handoff, "STALL_S", 0.3)
    release = threading.Event()
    h: Handoff[int] = Handoff(1, "reading /dev/stuck", owner=Owner.CONSUMER)

    def produce() -> None:
        for i in range(5):  # slow but steady: each wait is shorter than the stall time
            time.sleep(0.1)
            h.put(i)
        release.wait(30)  # then stuck

    h.start(produce, "test-stuck-producer")
    assert [h.get() for _ in range(5)] == list(range(5))
    with pytest.raises(Stalled, match=r"reading /dev/stuck stalled: no progress for 0 s"):
        h.get()
    release.set()
    h.stop()


async def test_get_async_waits_off_the_event_loop() -> None:
    h: Handoff[str] = Handoff(1, "reading", owner=Owner.CONSUMER)
    go = threading.Event()

    def produce() -> None:
        go.wait(30)
        h.put("late")

    h.start(produce, "test-late-producer")
    waiter = asyncio.ensure_future(h.get_async())
    ticks = 0
    while not waiter.done() and ticks < 3:
        await asyncio.sleep(0.01)  # the loop runs meanwhile
        ticks += 1
    go.set()
    assert await waiter == "late"
    assert await h.get_async() is None
    h.stop()


def test_a_stuck_archive_write_fails_the_output_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not supports_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    monkeypatch.setattr(handoff, "STALL_S", 0.5)
    monkeypatch.setattr(handoff, "STOP_TIMEOUT_S", 0.5)
    release = threading.Event()

    def stuck(fd: int, view: memoryview) -> None:
        release.wait(30)  # a dead disk

    monkeypatch.setattr(atomic_file, "write_aligned", stuck)
    final, temp = tmp_path / "f", tmp_path / "f.dat"
    try:
        with pytest.raises(Stalled, match="stalled"), atomic_output(final, temp) as out:
            for _ in range(8):
                out.write(bytes(DIRECT_CHUNK))
        assert not final.exists() and not temp.exists()
    finally:
        release.set()


def test_stuck_image_writes_fail_the_restore_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handoff, "STALL_S", 0.3)
    pool = WritePool(threads=1, buffers=2)
    try:
        pool.take()
        pool.take()  # both in flight, and no write ever gives one back
        with pytest.raises(Stalled, match="image writes stalled"):
            pool.take()
    finally:
        pool.close()
