"""The extent-aware read-ahead: same bytes in any case, payloads page-aligned, buffers reused."""

from __future__ import annotations

import ctypes
import io
import mmap

import pytest

from qmpbackup.restore import extent_prefetch
from qmpbackup.restore.extent_prefetch import ExtentPrefetch
from qmpbackup.vma import CLUSTER_SIZE, VmaReader
from tests.vma.archive_builder import disk_image, write_archive


class Source(io.BytesIO):
    """A decompressor stand-in: read and readinto of a byte string, optionally failing after some bytes."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.fail_at = fail_at

    def _check(self) -> None:
        if self.fail_at is not None and self.tell() >= self.fail_at:
            raise OSError(5, "Input/output error")

    def read(self, n: int | None = -1, /) -> bytes:
        self._check()
        return super().read(n)

    def readinto(self, buffer: memoryview, /) -> int:  # type: ignore[override]
        self._check()
        return super().readinto(buffer)


def pieces(prefetch: ExtentPrefetch, size: int = 1 << 30) -> list[memoryview]:
    out = []
    while piece := prefetch.read(size):
        out.append(piece)
    return out


@pytest.fixture(scope="module")
def archive() -> bytes:
    disk = disk_image(300 * CLUSTER_SIZE + 4096 * 3 + 512, [2, 2, 0, 1, 3, 2, 2, 2])
    return write_archive([("drive-a", disk), ("drive-b", b"\x22" * (70 * CLUSTER_SIZE))])


def test_pieces_are_the_archive_cut_at_extents_with_aligned_payloads(archive: bytes) -> None:
    prefetch = ExtentPrefetch(Source(archive))
    try:
        got = pieces(prefetch)
    finally:
        prefetch.close()
    assert b"".join(got) == archive
    payloads = [p for p in got if len(p) > 512 and p.obj is not None and not p.readonly]
    assert len(payloads) >= 5
    for payload in payloads:
        assert ctypes.addressof(ctypes.c_char.from_buffer(payload)) % 4096 == 0


def test_reader_through_it_sees_the_same_clusters(archive: bytes) -> None:
    expected = [(c.dev_id, c.cluster_num, c.mask, c.data) for c in VmaReader(io.BytesIO(archive)).clusters()]
    prefetch = ExtentPrefetch(Source(archive))
    try:
        reader = VmaReader(prefetch)
        got = [(c.dev_id, c.cluster_num, c.mask, None if c.data is None else bytes(c.data))
               for c in reader.cluster_views()]
    finally:
        prefetch.close()
    assert got == expected


@pytest.mark.parametrize(
    "damage", ["junk", "short-header", "header-size-fixed-part-only", "bad-extent-magic", "huge-block-count",
               "cut-payload"]
)
def test_unexpected_input_passes_through_unchanged(archive: bytes, damage: str) -> None:
    """Whatever the bytes, the same bytes come out (the reader, not the read-ahead, judges them)."""
    first_extent = int.from_bytes(archive[56:60], "big")
    data = bytearray(archive)
    if damage == "junk":
        data = bytearray(b"no archive here" * 1000)
    elif damage == "short-header":
        data = data[:5000]
    elif damage == "header-size-fixed-part-only":
        data[56:60] = (12288).to_bytes(4, "big")
    elif damage == "bad-extent-magic":
        data[first_extent : first_extent + 4] = b"XXXX"
    elif damage == "huge-block-count":
        data[first_extent + 6 : first_extent + 8] = (60000).to_bytes(2, "big")
    else:
        data = data[: first_extent + 512 + 10000]
    prefetch = ExtentPrefetch(Source(bytes(data)))
    try:
        assert b"".join(pieces(prefetch, 777)) == bytes(data)
    finally:
        prefetch.close()


def test_a_read_error_arrives_after_the_bytes_before_it(archive: bytes) -> None:
    prefetch = ExtentPrefetch(Source(archive, fail_at=len(archive) // 2))
    try:
        got = 0
        with pytest.raises(OSError, match="Input/output error"):
            while piece := prefetch.read(1 << 20):
                got += len(piece)
        assert len(archive) // 2 <= got < len(archive)
    finally:
        prefetch.close()


def test_buffers_are_reused_once_released(archive: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extent_prefetch, "MAX_BUFFERS", 2)
    prefetch = ExtentPrefetch(Source(archive * 1), depth=1)
    try:
        total, payloads = 0, 0
        buffers: set[int] = set()
        while piece := prefetch.read(1 << 30):
            total += len(piece)
            if isinstance(piece.obj, mmap.mmap):  # a payload, in one of the prefetch's buffers (kept till close)
                payloads += 1
                buffers.add(id(piece.obj))
            del piece  # the consumer lets go: the buffer can be reused
        assert total == len(archive)
        assert len(buffers) <= 2 < payloads, f"{payloads} payloads in {len(buffers)} buffers"
    finally:
        prefetch.close()
