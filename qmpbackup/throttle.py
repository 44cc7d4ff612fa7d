"""Byte-rate limiting (vzdump's and qmrestore's ``--bwlimit``): a token bucket and stream wrappers.

The bucket uses a debt model: a consumer takes any number of bytes at once and
then waits until the bucket has paid them off, so chunk size never matters and
the long-run rate is exact. It starts empty (no initial burst, unlike a leaky
bucket that starts full), and idle time earns at most ``burst_s`` seconds of
tokens, which keeps the rate smooth after a slow phase. The state is guarded by
a thread lock that is never held while sleeping, so threads and asyncio tasks
can share one bucket; waiters are served in arrival order because each one
waits for the debt of all who came before.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Protocol

DEFAULT_BURST_S = 0.1


class ByteSource(Protocol):
    """What ThrottledSource wraps (the VMA reader's source protocol)."""

    def read(self, n: int, /) -> bytes: ...


class ByteSink(Protocol):
    """What ThrottledSink wraps (the VMA writer's sink protocol)."""

    def write(self, data: bytes | memoryview, /) -> object: ...


class TokenBucket:
    """Limits a byte stream to ``rate_bytes_per_s``; ``rate <= 0`` means unlimited."""

    def __init__(
        self,
        rate_bytes_per_s: float,
        *,
        burst_s: float = DEFAULT_BURST_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._burst_s = max(0.0, burst_s)
        self._rate = float(rate_bytes_per_s)
        self._tokens = 0.0
        self._last = clock()

    @property
    def rate(self) -> float:
        """Bytes per second; 0 or less means unlimited."""
        return self._rate

    def set_rate(self, rate_bytes_per_s: float) -> None:
        """Change the limit live; the debt already taken is paid at the new rate."""
        with self._lock:
            self._refill(self._clock())
            self._rate = float(rate_bytes_per_s)
            if self._rate <= 0:
                self._tokens = 0.0

    def _refill(self, now: float) -> None:
        if self._rate > 0:
            self._tokens = min(self._tokens + (now - self._last) * self._rate, self._rate * self._burst_s)
        self._last = now

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes now and return how many seconds the caller must wait before using them."""
        if n < 0:
            raise ValueError(f"cannot consume a negative byte count ({n})")
        with self._lock:
            if self._rate <= 0:
                return 0.0
            self._refill(self._clock())
            self._tokens -= n
            return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def consume(self, n: int) -> None:
        """Take ``n`` bytes, blocking the calling thread as long as the rate demands."""
        delay = self.reserve(n)
        if delay > 0:
            time.sleep(delay)

    async def aconsume(self, n: int) -> None:
        """Take ``n`` bytes, suspending the calling task as long as the rate demands."""
        delay = self.reserve(n)
        if delay > 0:
            await asyncio.sleep(delay)


class ThrottledSource:
    """A ByteSource whose reads are paid for in a bucket (restore's read limit on the archive)."""

    def __init__(self, source: ByteSource, bucket: TokenBucket) -> None:
        self._source = source
        self._bucket = bucket

    def read(self, n: int, /) -> bytes:
        data = self._source.read(n)
        self._bucket.consume(len(data))
        return data


class ThrottledSink:
    """A ByteSink whose writes are paid for in a bucket before they go out."""

    def __init__(self, sink: ByteSink, bucket: TokenBucket) -> None:
        self._sink = sink
        self._bucket = bucket

    def write(self, data: bytes | memoryview, /) -> object:
        self._bucket.consume(len(data))
        return self._sink.write(data)
