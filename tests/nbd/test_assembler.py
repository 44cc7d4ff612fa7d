"""ClusterAssembler without QEMU: slicing, partial clusters, zeroes, duplicates, finish."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpbackup.backup.assembler import ClusterAssembler, PointInTimeError
from qmpbackup.errors import StateError
from qmpbackup.vma.format import CLUSTER_SIZE
from tests.nbd.conftest import RecordingSink

C = CLUSTER_SIZE


def image_of(size: int, seed: int, zero_every: int = 3) -> bytes:
    """A device image: random clusters with every ``zero_every``-th cluster zero."""
    rnd = random.Random(seed)
    out = bytearray(rnd.randbytes(size))
    for c in range(0, (size + C - 1) // C, zero_every):
        out[c * C:(c + 1) * C] = bytes(len(out[c * C:(c + 1) * C]))
    return bytes(out)


def test_whole_clusters_zero_detection_and_finish() -> None:
    size = 5 * C + 1000
    sink = RecordingSink()
    asm = ClusterAssembler(sink, 7, size, name="drive-scsi0")
    data = bytes(C) + b"\x01" * C + b"\x02" * C
    asm.write_sync(0, data)
    asm.write_zeroes_sync(3 * C, C)
    asm.write_sync(5 * C, b"\x05" * 1000)           # the short last cluster, whole
    assert sink.clusters[(7, 0)] is None           # data that is all zero
    assert sink.clusters[(7, 1)] == b"\x01" * C
    assert sink.clusters[(7, 3)] is None
    assert sink.clusters[(7, 5)] == b"\x05" * 1000
    assert (7, 4) not in sink.clusters
    asm.finish()
    assert sink.clusters[(7, 4)] is None           # never touched → zero
    assert sink.image(7, size) == bytes(C) + b"\x01" * C + b"\x02" * C + bytes(2 * C) + b"\x05" * 1000
    s = asm.stats
    assert (s.bytes_written, s.bytes_zeroed, s.clusters_emitted) == (3 * C + 1000, C, 6)
    assert s.zero_bytes == 3 * C
    with pytest.raises(StateError):
        asm.write_sync(0, b"x")
    with pytest.raises(StateError):
        asm.finish()


def test_partial_clusters_are_held_until_complete() -> None:
    sink = RecordingSink()
    asm = ClusterAssembler(sink, 1, 2 * C)
    asm.write_sync(100, b"a" * 200)
    asm.write_sync(C - 100, b"b" * 200)             # spans clusters 0 and 1
    assert asm.partial_clusters == 2 and not sink.clusters
    asm.write_sync(0, b"\0" * 100)
    asm.write_zeroes_sync(300, C - 400)             # cluster 0 now complete
    assert asm.partial_clusters == 1
    assert sink.clusters[(1, 0)] == bytes(100) + b"a" * 200 + bytes(C - 400) + b"b" * 100
    with pytest.raises(PointInTimeError, match="cannot be compared"):
        asm.write_sync(150, b"a" * 50)              # even identical: the first copy is gone
    asm.finish()                                    # cluster 1: gaps zero
    assert sink.clusters[(1, 1)] == b"b" * 100 + bytes(C - 100)


def test_only_zeroes_may_come_again() -> None:
    """QEMU never writes a cluster twice; a repeat is fine only when it is zeroes over zeroes."""
    sink = RecordingSink()
    asm = ClusterAssembler(sink, 1, 4 * C, name="drive-virtio1")
    asm.write_sync(0, b"x" * 2 * C)
    asm.write_zeroes_sync(2 * C, C)
    asm.write_sync(2 * C, bytes(C))                 # zeroes again as data
    asm.write_sync(2 * C + 5, bytes(10))            # part of a zero cluster, zero again
    asm.write_zeroes_sync(2 * C, C)
    assert asm.stats.duplicate_bytes == 2 * C + 10
    with pytest.raises(PointInTimeError, match=r"drive-virtio1: cluster 1 \(offset 65536\).*cannot be compared"):
        asm.write_sync(C, b"x" * C)                 # even identical data: the first copy is gone
    with pytest.raises(PointInTimeError, match="cannot be compared"):
        asm.write_sync(10, b"x" * 10)
    with pytest.raises(PointInTimeError):
        asm.write_zeroes_sync(0, C)                 # zeroes over data
    with pytest.raises(PointInTimeError):
        asm.write_sync(2 * C, b"y" * C)             # data over zeroes
    asm.write_sync(3 * C + 10, b"p" * 10)
    with pytest.raises(PointInTimeError, match="byte 15"):
        asm.write_sync(3 * C, b"p" * 15 + b"q" * 10)
    asm.write_sync(3 * C + 12, b"p" * 4)            # identical overlap inside a partial cluster
    with pytest.raises(PointInTimeError):
        asm.write_sync(3 * C, bytes(C))             # whole write contradicting the partial part
    assert asm.partial_clusters == 1


def test_bounds_and_empty_device() -> None:
    sink = RecordingSink()
    asm = ClusterAssembler(sink, 1, C)
    with pytest.raises(ValueError):
        asm.write_sync(C - 1, b"ab")
    with pytest.raises(ValueError):
        asm.write_zeroes_sync(-1, 1)
    empty = ClusterAssembler(sink, 2, 0)
    empty.finish()
    assert empty.stats.clusters_emitted == 0
    assert "finished" in repr(empty)


@settings(max_examples=60, deadline=None)
@given(
    clusters=st.integers(1, 12),
    tail=st.sampled_from([0, 512, 1000, C - 1]),
    seed=st.integers(0, 2**32 - 1),
    pieces=st.integers(1, 40),
    repeat=st.booleans(),
)
def test_random_order_pieces_rebuild_the_image(clusters: int, tail: int, seed: int,
                                               pieces: int, repeat: bool) -> None:
    size = clusters * C + tail if tail else clusters * C
    image = image_of(size, seed)
    rnd = random.Random(seed)
    # cut [0, size) into pieces at random points, leave some out (they stay zero only if zero)
    cuts = sorted({0, size, *(rnd.randrange(size) for _ in range(pieces))})
    ranges = list(itertools.pairwise(cuts))
    if repeat:
        ranges += rnd.sample(ranges, k=min(3, len(ranges)))
    rnd.shuffle(ranges)
    sink = RecordingSink()
    asm = ClusterAssembler(sink, 1, size)
    for start, end in ranges:
        piece = image[start:end]
        if piece == bytes(len(piece)) and rnd.random() < 0.5:
            asm.write_zeroes_sync(start, end - start)
        elif piece == bytes(len(piece)) and rnd.random() < 0.5:
            continue                                # a hole the client skipped
        else:
            try:
                asm.write_sync(start, piece)
            except PointInTimeError as err:
                # only a partial rewrite of a completed non-zero cluster may be refused
                assert "cannot be compared" in str(err) and repeat
                return
    assert asm.partial_clusters <= (size + C - 1) // C
    asm.finish()
    assert sink.image(1, size) == image
    assert asm.stats.clusters_emitted == (size + C - 1) // C
