"""Small QMP helpers the fleecing tests share: read a snapshot through a backup job, guest writes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qmpbackup.qemu.session import QmpSession


async def backup_node_to_file(session: QmpSession, node: str, target: Path, size: int, *,
                              job: str = "testcopy", timeout: float = 60, speed: int = 0) -> dict[str, Any]:
    """``blockdev-backup`` of ``node`` into a new raw file; returns the job's final event data."""
    with open(target, "wb") as f:
        f.truncate(size)
    tnode = f"{job}-t"
    await session.execute("blockdev-add", {"driver": "raw", "node-name": tnode,
                                           "file": {"driver": "file", "filename": str(target)}})
    try:
        async with session.events(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"]) as ev:
            args: dict[str, Any] = {"job-id": job, "device": node, "target": tnode, "sync": "full"}
            if speed:
                args["speed"] = speed
            await session.execute("blockdev-backup", args)
            event = await ev.wait_for(lambda e: e["data"].get("device") == job, timeout)
    finally:
        await session.execute("blockdev-del", {"node-name": tnode})
    return dict(event["data"]) | {"event": event["event"]}


async def guest_write(session: QmpSession, qdev: str, pattern: int, offset: int, length: int) -> None:
    """A write through the device (so it passes any filter), checked by the caller via data."""
    await session.qemu_io(qdev, f"write -P {pattern:#x} {offset} {length}")


def expect_pattern(data: bytearray, pattern: int, offset: int, length: int) -> None:
    data[offset:offset + length] = bytes([pattern]) * length


async def wait_until(predicate: Any, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


class FileConsumer:
    """An NBD export consumer that stores what it gets into a file, optionally at a limited rate."""

    def __init__(self, path: Path, size: int, rate_bps: float = 0) -> None:
        import os

        from qmpbackup.throttle import TokenBucket

        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, size)
        self.bucket = TokenBucket(rate_bps) if rate_bps else None
        self.received: list[tuple[float, int, int]] = []

    async def _pace(self, n: int) -> None:
        if self.bucket is not None:
            await self.bucket.aconsume(n)

    async def write(self, offset: int, data: memoryview, /) -> None:
        import os
        import time

        await self._pace(len(data))
        os.pwrite(self.fd, data, offset)
        self.received.append((time.monotonic(), offset, len(data)))

    async def write_zeroes(self, offset: int, length: int, /) -> None:
        import os
        import time

        await self._pace(length)
        os.pwrite(self.fd, bytes(length), offset)
        self.received.append((time.monotonic(), offset, length))

    async def trim(self, offset: int, length: int, /) -> None:
        pass

    async def flush(self) -> None:
        import os

        os.fsync(self.fd)

    def close(self) -> None:
        import os

        os.close(self.fd)
