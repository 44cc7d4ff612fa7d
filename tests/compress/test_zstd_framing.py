"""The zstd frame tracker that turns a silently short stream into an error."""

from __future__ import annotations

import io
import random
import struct

import pytest
import zstandard

from qmpbackup.compress import CompressError, open_decompressor


def frame(data: bytes, **kwargs: object) -> bytes:
    return zstandard.ZstdCompressor(level=3, **kwargs).compress(data)  # type: ignore[arg-type]


def skippable(payload: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A53, len(payload)) + payload


def read(blob: bytes) -> bytes:
    with open_decompressor(io.BytesIO(blob)) as dec:
        parts = []
        while piece := dec.read(1 << 16):
            parts.append(piece)
        return b"".join(parts)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"write_checksum": True}, {"write_content_size": False}, {"threads": 2, "write_checksum": True}],
)
def test_frames_with_any_header_layout_and_skippable_frames_between(kwargs: dict[str, object]) -> None:
    one, two = b"abc" * 100_000, bytes(300_000) + b"xyz"
    blob = frame(one, **kwargs) + skippable(b"metadata") + frame(two, **kwargs) + skippable(b"")
    assert read(blob) == one + two


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 100])
def test_every_cut_of_a_frame_is_an_error(cut: int) -> None:
    blob = frame(random.Random(cut).randbytes(50_000) + b"hello world " * 20_000, write_checksum=True)
    with pytest.raises(CompressError, match="truncated|corrupt"):
        read(blob[:-cut])


def test_cut_inside_a_trailing_skippable_frame_is_an_error() -> None:
    blob = frame(b"data" * 1000) + skippable(b"0123456789")
    with pytest.raises(CompressError, match="truncated"):
        read(blob[:-4])


def test_junk_after_a_frame_is_an_error() -> None:
    with pytest.raises(CompressError, match="corrupt"):
        read(frame(b"data" * 1000) + b"junk-junk")
