"""zstd in independent frames: any decoder reads them as one stream; the reader finds every frame."""

from __future__ import annotations

import io
import itertools
import os
import random
import subprocess

import pytest
import zstandard

from qmpbackup.zstd_frames import FramedZstdWriter, FrameError, FrameTrackingSource


def _streamed(data: bytes) -> bytes:
    """One frame without a content size, as the zstd command writes from a pipe."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as writer:
        writer.write(data)
    return out.getvalue()


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_frames_round_trip_and_are_found_again(threads: int) -> None:
    rng = random.Random(threads)
    parts = [rng.randbytes(rng.randrange(1, 300_000)) + bytes(rng.randrange(0, 500_000))
             + b"abc" * rng.randrange(0, 100_000) for _ in range(12)]
    streamed = b"streamed" * 100_000
    out = io.BytesIO()
    writer = FramedZstdWriter(out, threads, 3)
    for part in parts[:6]:
        writer.write(part[: len(part) // 2])
        writer.write(part[len(part) // 2:])
        writer.end_frame()
    writer.write_frame(_streamed(streamed))     # a foreign frame, read block by block
    for part in parts[6:]:
        writer.write(part)
        writer.end_frame()
    writer.close()
    data = out.getvalue()
    plain = b"".join(parts[:6]) + streamed + b"".join(parts[6:])
    assert subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout == plain

    source = FrameTrackingSource(io.BytesIO(data))
    got = bytearray()
    while chunk := source.read(rng.randrange(1, 200_000)):
        got += chunk
    frames = source.take_frames(len(plain))
    assert got == plain
    ends = list(itertools.accumulate([len(p) for p in parts[:6]] + [len(streamed)] + [len(p) for p in parts[6:]]))
    assert [f.plain_end for f in frames] == ends
    assert [f.plain_start for f in frames] == [0, *ends[:-1]]
    # Each kept frame is a complete zstd frame holding exactly its plain bytes.
    for frame in frames:
        assert frame.compressed is not None
        assert zstandard.ZstdDecompressor().decompressobj().decompress(frame.compressed) == \
            plain[frame.plain_start:frame.plain_end]


def test_a_large_frame_is_read_in_bounded_steps_and_not_kept() -> None:
    data = zstandard.ZstdCompressor(threads=2).compress(os.urandom(3 << 20) + bytes(40 << 20))
    source = FrameTrackingSource(io.BytesIO(data), keep_limit=1 << 20)
    sizes = []
    while chunk := source.read(64 << 20):
        sizes.append(len(chunk))
    frames = source.take_frames(43 << 20)
    assert max(sizes) <= 128 << 10  # one block at a time
    assert len(frames) == 1 and frames[0].plain_end == 43 << 20 and frames[0].compressed is None


@pytest.mark.parametrize("damage", ["checksum", "truncated", "not zstd", "block header"])
def test_damage_is_a_frame_error(damage: str) -> None:
    good = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(1000) + bytes(5000))
    bad = {
        "checksum": good[:-1] + bytes([good[-1] ^ 1]),
        "truncated": good[:-10],
        "not zstd": b"hello world",
        "block header": good[:6] + b"\xff\xff\xff" + good[9:],
    }[damage]
    source = FrameTrackingSource(io.BytesIO(bad))
    with pytest.raises(FrameError):
        while source.read(4096):
            pass
