"""Hostile input: mutated archives make the reader raise VmaError and nothing else, quickly."""

from __future__ import annotations

import contextlib
import io
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpbackup.vma import CLUSTER_SIZE, VmaError, VmaReader
from qmpbackup.vma import format as fmt
from tests.vma import archive_builder
from tests.vma.archive_builder import (
    RawExtent,
    disk_image,
    extent_offsets,
    raw_archive,
    write_archive,
)

BASE = write_archive(
    [("drive-a", disk_image(3 * CLUSTER_SIZE + 4096, [0, 1, 2, 3], 1)), ("drive-b", disk_image(2048, [2], 2))],
    configs=[("qemu-server.conf", b"memory: 512\n"), ("qemu-server.fw", b"[OPTIONS]\n")],
)
OFFSETS = extent_offsets(BASE)

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(BASE) - 1), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, len(BASE) - 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(BASE) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(BASE)), st.binary(min_size=1, max_size=600)),
    # fields whose values steer the reader: header pointers and sizes, extent counts and slots
    st.tuples(st.just("field"), st.sampled_from([4, 48, 52, 56, 2044, 3068, 4096 + 32, 4096 + 40, 4096 + 64]),
              st.integers(0, 2**32 - 1)),
    st.tuples(st.just("slot"), st.integers(0, 58), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("count"), st.just(0), st.integers(0, 65535)),
)


def mutate(ops: list[tuple[str, int, object]], rehash: bool) -> bytes:
    return archive_builder.mutate(BASE, OFFSETS, ops, rehash)


def read_everything(data: bytes) -> None:
    reader = VmaReader(io.BytesIO(data))
    for cluster in reader.clusters():
        assert cluster.data is None or len(cluster.data) == CLUSTER_SIZE


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_mutated_archives_raise_only_vma_errors(ops: list[tuple[str, int, object]], rehash: bool) -> None:
    data = mutate(ops, rehash)
    started = time.monotonic()
    with contextlib.suppress(VmaError):
        read_everything(data)
    assert time.monotonic() - started < 2.0


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=14000))
def test_random_bytes(data: bytes) -> None:
    with pytest.raises(VmaError):
        read_everything(b"VMA\0" + data if data[:1] == b"\1" else data)


def test_hostile_sizes_do_not_cost_memory() -> None:
    """A device claiming 256 TiB with clusters far apart: memory stays small, the gap is reported."""
    huge = 1 << 48
    far = [fmt.blockinfo(0, 1, c) for c in (0, 1 << 31, (1 << 32) - 1)]
    archive = raw_archive([("d", huge)], [RawExtent(slots=far)])
    tracemalloc.start()
    try:
        with pytest.raises(VmaError, match="detected missing cluster 1 for stream d"):
            read_everything(archive)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


@pytest.mark.parametrize("size", [(1 << 48) + 512, (1 << 63), (1 << 64) - 512])
def test_devices_larger_than_the_format_can_address_are_refused(size: int) -> None:
    archive = raw_archive([("d", 512), ("e", size)], [RawExtent(slots=[fmt.blockinfo(0, 1, 0)])])
    with pytest.raises(VmaError, match=rf"^device 2 size {size} is larger than .* \(at byte {4096 + 64 + 8}\)$"):
        VmaReader(io.BytesIO(archive))


def test_largest_header_and_extent_are_bounded() -> None:
    buf = bytearray(BASE)
    buf[56:60] = fmt.MAX_READER_HEADER_SIZE.to_bytes(4, "big")
    with pytest.raises(VmaError, match="can't read vma header data"):
        read_everything(bytes(buf))
