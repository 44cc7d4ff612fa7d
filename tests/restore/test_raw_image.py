"""RawImage: aligned views written as they are, anything else copied, zeros never written."""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest

from qmpbackup.restore import raw_image
from qmpbackup.restore.raw_image import RawImage, WritePool
from qmpbackup.vma import CLUSTER_SIZE
from qmpbackup.vma import format as fmt

SIZE = 40 * CLUSTER_SIZE + 4096 + 512  # an odd tail: the last cluster is partial and ends mid-block


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of the file's data regions (SEEK_DATA/SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd, pos, end = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


@pytest.mark.parametrize("buffer_size", [raw_image.BUFFER_SIZE, 3 * CLUSTER_SIZE])
def test_mixed_clusters_land_where_they_belong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffer_size: int
) -> None:
    monkeypatch.setattr(raw_image, "BUFFER_SIZE", buffer_size)
    rng = random.Random(5)
    aligned = mmap.mmap(-1, 64 * CLUSTER_SIZE)  # like the read-ahead's payload buffers
    aligned[:] = rng.randbytes(len(aligned))
    expected = bytearray(SIZE)
    vector_writes = []
    original = WritePool.submit_vector

    def counted(self: WritePool, views: list[memoryview], offset: int, fd: int) -> object:
        vector_writes.append(offset)
        return original(self, views, offset, fd)

    monkeypatch.setattr(WritePool, "submit_vector", counted)
    pool = WritePool()
    image = RawImage(tmp_path / "img", SIZE, pool)
    try:
        for n in range(fmt.cluster_count(SIZE)):
            kind = n % 7
            start = n * CLUSTER_SIZE
            length = min(CLUSTER_SIZE, SIZE - start)
            if kind == 0:
                image.write_cluster(n, 0, None)  # all zero: a hole
                continue
            if kind == 1:
                image.write_cluster(n, fmt.FULL_MASK, bytes(CLUSTER_SIZE))  # stored zeros: a hole too
                continue
            if kind in (2, 3, 4):  # an aligned view, as restore gets it
                data: bytes | memoryview = memoryview(aligned)[n * CLUSTER_SIZE : (n + 1) * CLUSTER_SIZE]
            else:  # a bytes object (not aligned): copied
                data = rng.randbytes(CLUSTER_SIZE)
            mask = fmt.FULL_MASK if kind != 6 else 0b1011_0000_0000_0110
            if mask != fmt.FULL_MASK:
                filled = bytearray(data)
                for block in range(fmt.BLOCKS_PER_CLUSTER):
                    if not mask >> block & 1:
                        filled[block * fmt.BLOCK_SIZE : (block + 1) * fmt.BLOCK_SIZE] = bytes(fmt.BLOCK_SIZE)
                data = bytes(filled)
            image.write_cluster(n, mask, data)
            expected[start : start + length] = bytes(data[:length])
        image.close()
    except BaseException:
        image.discard()
        raise
    finally:
        pool.close()
    path = tmp_path / "img"
    assert path.read_bytes() == bytes(expected)
    assert vector_writes, "no aligned view was written as it is"
    if data_extents(path) == [(0, SIZE)]:
        pytest.skip("this file system does not report holes")
    for start, end in data_extents(path):
        for n in range(start // CLUSTER_SIZE, -(-end // CLUSTER_SIZE)):
            assert n % 7 not in (0, 1), f"zero cluster {n} was written"
