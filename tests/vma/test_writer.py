"""The writer lays archives out as Proxmox does (docs/format.md W1-W6) and refuses misuse."""

from __future__ import annotations

import io
import tracemalloc

import pytest

from qmpbackup.errors import StateError
from qmpbackup.vma import CLUSTER_SIZE, VmaError, VmaReader, VmaWriter
from qmpbackup.vma import format as fmt
from qmpbackup.vma.writer import ReusedPart, WriterState
from tests.vma.archive_builder import TEST_UUID, extent_offsets, read_disks, write_archive


def _slots(archive: bytes, offset: int) -> list[int]:
    return list(fmt.EXTENT_HEADER.unpack_from(archive, offset)[5:])


def test_header_layout_and_rounding() -> None:
    archive = write_archive([("drive-scsi0", bytes(CLUSTER_SIZE))], configs=[("dir/qemu-server.conf", b"a" * 600)])
    prefix = fmt.HEADER_PREFIX.unpack_from(archive)
    blob_size = 1 + (2 + 17) + (2 + 600) + (2 + 12)
    assert prefix[5:] == (12288, blob_size, 12288 + fmt.round_up(blob_size, 512))
    reader = VmaReader(io.BytesIO(archive))
    assert list(reader.configs) == ["qemu-server.conf"]  # basename only
    assert reader.uuid == TEST_UUID


def test_no_disks_gives_header_and_one_empty_extent() -> None:
    out = io.BytesIO()
    writer = VmaWriter(out)
    writer.add_config("qemu-server.conf", b"memory: 512\n")
    writer.close()
    archive = out.getvalue()
    assert len(archive) == 12800 + 512
    assert _slots(archive, 12800) == [0] * 59
    assert VmaReader(io.BytesIO(archive)).devices == {}


def test_58_slots_per_extent_and_final_extent() -> None:
    # 116 clusters: exactly two full extents, then the final empty one Proxmox also writes.
    disk = bytes(116 * CLUSTER_SIZE)
    archive = write_archive([("drive-scsi0", disk)])
    offsets = extent_offsets(archive)
    assert len(offsets) == 3
    assert [sum(1 for s in _slots(archive, o) if s) for o in offsets] == [58, 58, 0]
    assert len(archive) == offsets[-1] + 512
    # 117 clusters: the last extent holds the one left over.
    archive = write_archive([("drive-scsi0", bytes(117 * CLUSTER_SIZE))])
    offsets = extent_offsets(archive)
    assert [sum(1 for s in _slots(archive, o) if s) for o in offsets] == [58, 58, 1]


def test_zero_blocks_are_left_out_through_the_mask() -> None:
    cluster = bytearray(CLUSTER_SIZE)
    cluster[4096 * 3] = 1  # block 3
    cluster[4096 * 15 + 4095] = 2  # block 15
    archive = write_archive([("drive-scsi0", bytes(cluster) + bytes(CLUSTER_SIZE) + b"\xff" * CLUSTER_SIZE)])
    [offset, *_] = extent_offsets(archive)
    slots = _slots(archive, offset)
    assert [fmt.split_blockinfo(s) for s in slots[:3]] == [((1 << 3) | (1 << 15), 1, 0), (0, 1, 1), (0xFFFF, 1, 2)]
    assert int.from_bytes(archive[offset + 6 : offset + 8], "big") == 2 + 16
    _reader, disks = read_disks(archive)
    assert bytes(disks[1]) == bytes(cluster) + bytes(CLUSTER_SIZE) + b"\xff" * CLUSTER_SIZE


def test_partial_last_cluster() -> None:
    size = CLUSTER_SIZE + 4096 + 512  # block 1 of the last cluster straddles the end
    data = b"\x07" * size
    archive = write_archive([("drive-scsi0", data)])
    offset = extent_offsets(archive)[0]
    mask, _dev, cluster = fmt.split_blockinfo(_slots(archive, offset)[1])
    assert (mask, cluster) == (0b11, 1)
    payload_end = offset + 512 + (16 + 2) * 4096
    assert archive[payload_end - 4096 : payload_end] == b"\x07" * 512 + bytes(3584)  # zero padded
    _reader, disks = read_disks(archive)
    assert bytes(disks[1]) == data


def test_last_cluster_may_be_passed_full_length() -> None:
    out = io.BytesIO()
    writer = VmaWriter(out)
    dev = writer.add_device("drive-scsi0", 4096)
    writer.write_cluster(dev, 0, b"\x01" * CLUSTER_SIZE)  # bytes past the end are ignored
    writer.close()
    _reader, disks = read_disks(out.getvalue())
    assert bytes(disks[1]) == b"\x01" * 4096


def test_memoryview_and_bytearray_inputs() -> None:
    out = io.BytesIO()
    writer = VmaWriter(out)
    dev = writer.add_device("d", 2 * CLUSTER_SIZE)
    buf = bytearray(b"\x05" * 2 * CLUSTER_SIZE)
    writer.write_cluster(dev, 1, memoryview(buf)[CLUSTER_SIZE:])
    writer.write_cluster(dev, 0, buf[:CLUSTER_SIZE])
    writer.close()
    _reader, disks = read_disks(out.getvalue())
    assert bytes(disks[1]) == bytes(buf)


def test_duplicate_cluster_is_refused() -> None:
    writer = VmaWriter(io.BytesIO())
    dev = writer.add_device("d", 2 * CLUSTER_SIZE)
    writer.write_cluster(dev, 0, None)
    with pytest.raises(VmaError, match="cluster 0 written twice"):
        writer.write_cluster(dev, 0, b"\x01" * CLUSTER_SIZE)


def test_missing_cluster_fails_close() -> None:
    out = io.BytesIO()
    writer = VmaWriter(out)
    a = writer.add_device("a", CLUSTER_SIZE)
    b = writer.add_device("b", 3 * CLUSTER_SIZE)
    writer.write_cluster(a, 0, None)
    writer.write_cluster(b, 0, None)
    writer.write_cluster(b, 2, None)
    with pytest.raises(VmaError, match="device b: cluster 1 was never written"):
        writer.close()


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [
        ("", 512, "invalid device name"),
        ("a/b", 512, "invalid device name"),
        ("a b", 512, "invalid device name"),
        ("vmstate", 512, "reserved"),
        ("d", 0, "not a positive multiple of 512"),
        ("d", 1000, "not a positive multiple of 512"),
        ("d", (1 << 48) + 512, "256 TiB"),
    ],
)
def test_bad_devices(name: str, size: int, message: str) -> None:
    writer = VmaWriter(io.BytesIO())
    with pytest.raises(VmaError, match=message):
        writer.add_device(name, size)


def test_bad_configs_and_limits() -> None:
    writer = VmaWriter(io.BytesIO())
    with pytest.raises(VmaError, match="too large"):
        writer.add_config("big", bytes(65536))
    writer.add_config("x/qemu-server.conf", b"")
    with pytest.raises(VmaError, match="duplicate"):
        writer.add_config("qemu-server.conf", b"")
    for name in ("", "/", "a/..", "nul\0"):
        with pytest.raises(VmaError, match="invalid config"):
            writer.add_config(name, b"")
    for i in range(8):
        writer.add_config(f"c{i}", bytes(65535))  # 8 x 64 KiB > the 512 KiB header the C writer allows
    writer.add_device("d", 512)
    with pytest.raises(VmaError, match="header too large"):
        writer.write_cluster(1, 0, None)


def test_wrong_use() -> None:
    writer = VmaWriter(io.BytesIO())
    dev = writer.add_device("d", CLUSTER_SIZE)
    with pytest.raises(VmaError, match="unknown VMA device id 2"):
        writer.write_cluster(2, 0, None)
    with pytest.raises(VmaError, match="beyond the end"):
        writer.write_cluster(dev, 1, None)
    with pytest.raises(VmaError, match="has 100 bytes"):
        writer.write_cluster(dev, 0, bytes(100))
    with pytest.raises(StateError):
        writer.add_device("e", 512)  # the header is already out
    writer.write_cluster(dev, 0, None)
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(StateError):
        writer.write_cluster(dev, 0, None)


def test_sink_receives_one_write_per_extent() -> None:
    class CountingSink:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def write(self, data: bytes | memoryview) -> None:
            self.sizes.append(len(data))

    sink = CountingSink()
    writer = VmaWriter(sink)
    dev = writer.add_device("d", 100 * CLUSTER_SIZE)
    for c in range(100):
        writer.write_cluster(dev, c, b"\x01" * CLUSTER_SIZE)
    writer.close()
    assert sink.sizes[1:] == [512 + 58 * CLUSTER_SIZE, 512 + 42 * CLUSTER_SIZE]


def test_memory_is_bounded_by_one_extent() -> None:
    """A 4 GiB device streamed as zero clusters: memory stays at the extent buffer plus the bitmap."""

    class NullSink:
        def write(self, data: bytes | memoryview) -> None:
            pass

    clusters = 1 << 16  # 4 GiB
    tracemalloc.start()
    try:
        writer = VmaWriter(NullSink())
        dev = writer.add_device("d", clusters * CLUSTER_SIZE)
        full = b"\x01" * CLUSTER_SIZE
        for c in range(0, clusters, 4):
            writer.write_cluster(dev, c, full)
        for c in range(clusters):
            if c % 4:
                writer.write_cluster(dev, c, None)
        writer.close()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


class _FramedSink:
    """Records where the writer asks a framed compressor to cut, and frames handed over whole."""

    takes_frames = True

    def __init__(self) -> None:
        self.data = bytearray()
        self.cuts: list[int] = []
        self.frames: list[bytes] = []

    def write(self, data: bytes | memoryview, /) -> None:
        self.data += data

    def end_frame(self) -> None:
        if not self.cuts or self.cuts[-1] != len(self.data):
            self.cuts.append(len(self.data))

    def write_frame(self, frame: bytes | memoryview) -> None:
        self.end_frame()
        self.frames.append(bytes(frame))


def test_a_framed_sink_is_cut_after_headers_and_every_16_slots() -> None:
    sink = _FramedSink()
    writer = VmaWriter(sink)
    dev = writer.add_device("drive-scsi0", 40 * CLUSTER_SIZE)
    for c in range(40):
        writer.write_cluster(dev, c, bytes([c + 1]) * CLUSTER_SIZE if c != 3 else None)
    writer.close()
    header = 12800
    data_start = header + fmt.EXTENT_HEADER_SIZE
    assert sink.cuts == [header, data_start, data_start + 15 * CLUSTER_SIZE,  # slot 3 is zero: no data
                         data_start + 31 * CLUSTER_SIZE, data_start + 39 * CLUSTER_SIZE]
    assert read_disks(bytes(sink.data))[1][dev][3 * CLUSTER_SIZE:4 * CLUSTER_SIZE] == bytes(CLUSTER_SIZE)


def test_reused_extents_keep_their_blocks_and_frames() -> None:
    sink = _FramedSink()
    writer = VmaWriter(sink)
    dev = writer.add_device("d", 4 * CLUSTER_SIZE)
    writer.write_cluster(dev, 0, b"a" * CLUSTER_SIZE)
    block = b"b" * fmt.BLOCK_SIZE
    writer.write_reused_extent([
        fmt_part((dev, 1, 0), b""),
        fmt_part((dev, 2, 0b101), block * 2, frame=b"FRAME"),   # blocks 0 and 2 stored
        fmt_part((dev, 3, 0xFFFF), b"c" * CLUSTER_SIZE),
    ])
    assert sink.frames == [b"FRAME"] and writer.frames_reused == 1
    with pytest.raises(VmaError, match="written twice"):
        writer.write_reused_extent([fmt_part((dev, 3, 0), b"")])
    assert writer.state is WriterState.FAILED
    other = VmaWriter(io.BytesIO())
    other.add_device("d", CLUSTER_SIZE)
    with pytest.raises(VmaError, match="blocks but"):
        other.write_reused_extent([fmt_part((1, 0, 1), b"")])


def test_reused_extents_read_back_through_a_plain_sink() -> None:
    out = io.BytesIO()
    writer = VmaWriter(out)
    dev = writer.add_device("d", 3 * CLUSTER_SIZE)
    block = b"b" * fmt.BLOCK_SIZE
    writer.write_reused_extent([fmt_part((dev, 2, 0b101), block * 2, frame=b"ignored: not a framed sink"),
                                fmt_part((dev, 0, 0), b"")])
    writer.write_cluster(dev, 1, b"x" * CLUSTER_SIZE)
    writer.close()
    disk = read_disks(out.getvalue())[1][dev]
    assert disk[2 * CLUSTER_SIZE:3 * CLUSTER_SIZE] == block + bytes(fmt.BLOCK_SIZE) + block + bytes(13 * fmt.BLOCK_SIZE)
    assert disk[:CLUSTER_SIZE] == bytes(CLUSTER_SIZE) and disk[CLUSTER_SIZE:2 * CLUSTER_SIZE] == b"x" * CLUSTER_SIZE


def fmt_part(slot: tuple[int, int, int], payload: bytes, frame: bytes | None = None) -> ReusedPart:
    return ReusedPart((slot,), payload, frame)


def test_a_failed_writer_accepts_no_more_clusters() -> None:
    """Once the sink failed (the dump disk is full), every call raises that error again and nothing
    more reaches the sink: also when the failure came from cutting a frame (zstd's frame flush)."""

    class FullSink(_FramedSink):
        def __init__(self) -> None:
            super().__init__()
            self.fail_cut = False

        def end_frame(self) -> None:
            if self.fail_cut:
                raise OSError(28, "No space left on device", "/dump/x.vma.zst.dat")
            super().end_frame()

    sink = FullSink()
    writer = VmaWriter(sink)
    dev = writer.add_device("d", 200 * CLUSTER_SIZE)
    writer.write_cluster(dev, 0, b"a" * CLUSTER_SIZE)
    sink.fail_cut = True
    with pytest.raises(OSError) as first:
        for cluster in range(1, 100):
            writer.write_cluster(dev, cluster, b"b" * CLUSTER_SIZE)
    assert writer.state is WriterState.FAILED
    written = len(sink.data)
    sink.fail_cut = False
    for call in (lambda: writer.write_cluster(dev, 150, b"c" * CLUSTER_SIZE), writer.close,
                 lambda: writer.write_reused_extent([fmt_part((dev, 151, 0), b"")])):
        with pytest.raises(OSError) as again:
            call()
        assert again.value is first.value
    assert len(sink.data) == written
