"""Shared fixtures of the compression tests: sample data, and a check that no child process is left."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import psutil
import pytest


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Every test must end with all compressor processes gone (reaped, not only killed)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    while True:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"child processes left behind: {[(p.pid, p.name(), p.status()) for p in left]}"


def make_sample(size_mib: int = 4, seed: int = 1) -> bytes:
    """Random, zero and text parts with odd sizes: compresses like a mix of disk contents."""
    rng = random.Random(seed)
    text = b"".join(f"line {i}: the quick brown fox {rng.random()}\n".encode() for i in range(20000))
    parts = [rng.randbytes(1_000_003), bytes(1_500_007), text, os.urandom(77), bytes(4095)]
    data = b"".join(parts)
    while len(data) < size_mib << 20:
        data += text[: (size_mib << 20) - len(data)]
    return data[: (size_mib << 20) - 11]


@pytest.fixture(scope="session")
def sample() -> bytes:
    return make_sample()
