"""One crafted archive per reader rule (docs/format.md R1-R3), each rejected with its rule and offset."""

from __future__ import annotations

import io
from uuid import UUID

import pytest

from qmpbackup.vma import CLUSTER_SIZE, VmaError, VmaFormatError, VmaReader
from qmpbackup.vma import format as fmt
from tests.vma.archive_builder import (
    RawExtent,
    disk_image,
    raw_archive,
    read_disks,
    rehash_extent,
    rehash_header,
    write_archive,
)

FULL = b"\x11" * CLUSTER_SIZE


def _read_all(archive: bytes) -> None:
    reader = VmaReader(io.BytesIO(archive))
    for _ in reader.clusters():
        pass


class Views:
    """A source like the restore read-ahead: memoryviews of pieces of odd sizes."""

    def __init__(self, data: bytes, sizes: tuple[int, ...] = (70001, 777, 4096 * 5 + 3)) -> None:
        self.view = memoryview(data)
        self.pos = 0
        self.sizes = sizes
        self.calls = 0

    def read(self, n: int, /) -> memoryview:
        size = min(n, self.sizes[self.calls % len(self.sizes)])
        self.calls += 1
        piece = self.view[self.pos : self.pos + size]
        self.pos += len(piece)
        return piece


def _read_all_views(archive: bytes) -> None:
    reader = VmaReader(Views(archive))
    for _ in reader.cluster_views():
        pass


def _reject(archive: bytes | bytearray, rule: str, offset: int | None) -> VmaFormatError:
    """Both read paths (copies and views) reject it with the same error."""
    with pytest.raises(VmaFormatError) as err:
        _read_all(bytes(archive))
    assert rule in err.value.rule, err.value.rule
    if offset is not None:
        assert err.value.offset == offset
    assert str(err.value).endswith(f"(at byte {err.value.offset})")
    with pytest.raises(VmaFormatError) as err_views:
        _read_all_views(bytes(archive))
    assert str(err_views.value) == str(err.value)
    return err.value


@pytest.fixture
def good() -> bytes:
    """Two devices of 2 clusters each, all written, one extent plus nothing else."""
    return write_archive([("drive-a", FULL + bytes(CLUSTER_SIZE)), ("drive-b", FULL * 2)])


def header_end(archive: bytes) -> int:
    return int.from_bytes(archive[56:60], "big")


# --- R1: header -----------------------------------------------------------------------------


def test_good_archive_reads(good: bytes) -> None:
    _reader, disks = read_disks(good)
    assert bytes(disks[1]) == FULL + bytes(CLUSTER_SIZE) and bytes(disks[2]) == FULL * 2


@pytest.mark.parametrize("length", [0, 4, 12287])
def test_short_header(good: bytes, length: int) -> None:
    _reject(good[:length], "can't read vma header - got", length)


def test_wrong_magic(good: bytes) -> None:
    _reject(b"VMB\0" + good[4:], "not a vma file - wrong magic number", 0)


@pytest.mark.parametrize("size", [0, 12288, fmt.MAX_READER_HEADER_SIZE + 1, 0xFFFFFFFF])
def test_wrong_header_size(good: bytes, size: int) -> None:
    buf = bytearray(good)
    buf[56:60] = size.to_bytes(4, "big")
    _reject(buf, "wrong vma header size", 56)


def test_short_header_data(good: bytes) -> None:
    _reject(good[:12300], "can't read vma header data", 12300)


def test_header_checksum(good: bytes) -> None:
    buf = bytearray(good)
    buf[12288 + 5] ^= 1  # a byte inside the blob buffer
    _reject(buf, "wrong vma header checksum", 32)


def test_wrong_version(good: bytes) -> None:
    buf = bytearray(good)
    buf[4:8] = (2).to_bytes(4, "big")
    rehash_header(buf)
    _reject(buf, "wrong vma version 2", 4)


def test_blob_buffer_offset(good: bytes) -> None:
    buf = bytearray(good)
    buf[48:52] = (12287).to_bytes(4, "big")
    rehash_header(buf)
    _reject(buf, "wrong vma blob buffer offset 12287", 48)


def test_blob_buffer_size(good: bytes) -> None:
    buf = bytearray(good)
    buf[52:56] = (header_end(good) - 12288 + 1).to_bytes(4, "big")
    rehash_header(buf)
    _reject(buf, "wrong vma blob buffer size", 52)


@pytest.mark.parametrize("pointer", ["name-mid-blob", "data-out-of-chain", "name-not-nul"])
def test_invalid_config_pointers(good: bytes, pointer: str) -> None:
    buf = bytearray(good)
    names, datas = fmt.CONFIG_NAMES_OFFSET, fmt.CONFIG_DATA_OFFSET
    if pointer == "name-mid-blob":
        buf[names : names + 4] = (2).to_bytes(4, "big")
    elif pointer == "data-out-of-chain":
        buf[datas : datas + 4] = (5000).to_bytes(4, "big")
    else:
        buf[names : names + 4] = buf[datas : datas + 4]  # the data blob "memory: 512\n" has no NUL
    rehash_header(buf)
    _reject(buf, "vma contains invalid data pointers", names)


def test_half_empty_config_slot_is_skipped(good: bytes) -> None:
    buf = bytearray(good)
    buf[fmt.CONFIG_DATA_OFFSET : fmt.CONFIG_DATA_OFFSET + 4] = bytes(4)
    rehash_header(buf)
    assert VmaReader(io.BytesIO(bytes(buf))).configs == {}


def test_device_with_bad_name_is_ignored_and_its_data_rejected(good: bytes) -> None:
    buf = bytearray(good)
    entry = fmt.DEV_INFO_OFFSET + 32 * 2
    buf[entry : entry + 4] = (3).to_bytes(4, "big")  # not a chain position
    rehash_header(buf)
    reader = VmaReader(io.BytesIO(bytes(buf)))
    assert list(reader.devices) == [1]
    _reject(buf, "got wrong dev id 2", None)


# --- R2: extents -----------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [1, 511])
def test_read_short_extent(good: bytes, extra: int) -> None:
    _reject(good + bytes(extra), f"read short extent ({extra} bytes)", len(good))


def test_trailing_garbage_fails_the_checksum(good: bytes) -> None:
    _reject(good + bytes(512), "wrong vma extent header checksum", len(good))


def test_extent_checksum(good: bytes) -> None:
    buf = bytearray(good)
    buf[header_end(good) + 45] ^= 0x80
    _reject(buf, "wrong vma extent header checksum", header_end(good))


def test_extent_uuid(good: bytes) -> None:
    buf = bytearray(good)
    start = header_end(good)
    buf[start + 8 : start + 24] = UUID(int=1).bytes
    rehash_extent(buf, start)
    _reject(buf, "wrong vma extent uuid", start + 8)


@pytest.mark.parametrize("field", ["magic", "reserved1"])
def test_extent_magic(good: bytes, field: str) -> None:
    buf = bytearray(good)
    start = header_end(good)
    if field == "magic":
        buf[start : start + 4] = b"VMAX"
    else:
        buf[start + 4 : start + 6] = b"\x00\x01"
    rehash_extent(buf, start)
    _reject(buf, "wrong vma extent header magic", start)


def test_short_extent_payload(good: bytes) -> None:
    start = header_end(good)
    cut = len(good) - 512 - 4096  # the final empty extent and one payload block
    _reject(good[:cut], "short vma extent (", start)


def test_block_count_above_maximum() -> None:
    archive = raw_archive([("d", CLUSTER_SIZE)], [RawExtent(block_count=945)])
    _reject(archive, "short vma extent (block_count 945", 12800)


def test_wrong_dev_id() -> None:
    archive = raw_archive([("d", CLUSTER_SIZE)], [RawExtent(slots=[fmt.blockinfo(0, 2, 0)])])
    _reject(archive, "got wrong dev id 2", 12800 + 40)


def test_duplicate_in_one_extent() -> None:
    slots = [fmt.blockinfo(0, 1, 0), fmt.blockinfo(0, 1, 0)]
    archive = raw_archive([("d", CLUSTER_SIZE)], [RawExtent(slots=slots)])
    _reject(archive, "found duplicated cluster 0 for stream d", 12800 + 48)


def test_duplicate_across_extents() -> None:
    extents = [RawExtent(slots=[fmt.blockinfo(0xFFFF, 1, 0)], payload=FULL), RawExtent(slots=[fmt.blockinfo(0, 1, 0)])]
    archive = raw_archive([("d", CLUSTER_SIZE)], extents)
    _reject(archive, "found duplicated cluster 0 for stream d", 12800 + 512 + CLUSTER_SIZE + 40)


def test_vmstate_in_order_is_accepted_and_out_of_order_rejected() -> None:
    devices = [("vmstate", 3 * CLUSTER_SIZE)]
    ok = raw_archive(devices, [RawExtent(slots=[fmt.blockinfo(0, 1, c) for c in (0, 1, 2)])])
    reader, _ = read_disks(ok)
    assert reader.devices[1].is_vmstate
    partial = raw_archive(devices, [RawExtent(slots=[fmt.blockinfo(0, 1, 0)])])
    read_disks(partial)  # a RAM-state stream is not checked for missing clusters
    bad = raw_archive(devices, [RawExtent(slots=[fmt.blockinfo(0, 1, 0), fmt.blockinfo(0, 1, 2)])])
    _reject(bad, "found out of order vmstate data", 12800 + 48)


def test_too_many_blocks() -> None:
    slots = [fmt.blockinfo(0xFFFF, 1, 0)]
    archive = raw_archive([("d", CLUSTER_SIZE)], [RawExtent(slots=slots, payload=bytes(4096 * 15))])
    _reject(archive, "short vma extent - too many blocks", 12800 + 40)
    slots = [fmt.blockinfo(0b111, 1, 0)]
    archive = raw_archive([("d", CLUSTER_SIZE)], [RawExtent(slots=slots, payload=bytes(4096 * 2))])
    _reject(archive, "short vma extent - too many blocks", 12800 + 40)


@pytest.mark.parametrize(
    ("size", "mask", "cluster"),
    [
        (CLUSTER_SIZE, 0, 1),  # a zero slot past the end
        (CLUSTER_SIZE, 0xFFFF, 1),  # a full cluster past the end
        (4096, 0b10, 0),  # a block starting at the end
        (1000, 0b10, 0),  # the end is rounded down to whole sectors
    ],
)
def test_write_beyond_end(size: int, mask: int, cluster: int) -> None:
    payload = bytes(4096 * mask.bit_count())
    archive = raw_archive([("d", size)], [RawExtent(slots=[fmt.blockinfo(mask, 1, cluster)], payload=payload)])
    _reject(archive, "got wrong block address - write beyond end", 12800 + 40)


def test_missing_blocks() -> None:
    slots = [fmt.blockinfo(0b1, 1, 0)]
    archive = raw_archive([("d", CLUSTER_SIZE)], [RawExtent(slots=slots, payload=bytes(4096 * 2))])
    _reject(archive, "vma extent error - missing blocks", 12800)


def test_empty_and_unused_slots_are_fine() -> None:
    slots = [0, fmt.blockinfo(0, 1, 0), 0]
    archive = raw_archive([("d", CLUSTER_SIZE)], [RawExtent(), RawExtent(slots=slots), RawExtent()])
    read_disks(archive)
    read_disks(raw_archive([("d", CLUSTER_SIZE)], [RawExtent(slots=[fmt.blockinfo(0, 1, 0)])]))


# --- R3: coverage ----------------------------------------------------------------------------


def test_missing_cluster(good: bytes) -> None:
    archive = raw_archive([("d", 3 * CLUSTER_SIZE)], [RawExtent(slots=[fmt.blockinfo(0, 1, c) for c in (0, 2)])])
    err = _reject(archive, "detected missing cluster 1 for stream d", len(archive))
    assert isinstance(err, VmaError)
    reader, _ = read_disks(archive, check_missing=False)
    assert reader.first_missing(1) == 1


def test_archive_without_extents_misses_clusters() -> None:
    archive = raw_archive([("d", CLUSTER_SIZE)], [])
    _reject(archive, "detected missing cluster 0 for stream d", len(archive))


def test_reading_twice_is_refused(good: bytes) -> None:
    reader = VmaReader(io.BytesIO(good))
    list(reader.clusters())
    with pytest.raises(VmaError, match="only once"):
        list(reader.clusters())


def test_read_errors_become_vma_errors(good: bytes) -> None:
    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def read(self, n: int) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError(5, "Input/output error")
            return good[: n] if self.calls == 1 else good[12288 : 12288 + n]

    with pytest.raises(VmaError, match="cannot read archive at byte"):
        _read_all_from(Failing())


def _read_all_from(source: object) -> None:
    reader = VmaReader(source)  # type: ignore[arg-type]
    for _ in reader.clusters():
        pass


def test_short_reads_are_assembled(good: bytes) -> None:
    class Dribble:
        def __init__(self) -> None:
            self.pos = 0

        def read(self, n: int) -> bytes:
            chunk = good[self.pos : self.pos + min(n, 777)]
            self.pos += len(chunk)
            return chunk

    _read_all_from(Dribble())


def test_cluster_views_match_clusters() -> None:
    """Full, partial and zero clusters, split across pieces anywhere: same slots, same bytes."""
    disk = disk_image(37 * CLUSTER_SIZE + 4096 * 3, [2, 0, 1, 3, 2, 2, 0, 0])
    archive = write_archive([("drive-a", disk), ("drive-b", FULL * 3)])
    expected = [(c.dev_id, c.cluster_num, c.mask, c.data) for c in VmaReader(io.BytesIO(archive)).clusters()]
    for sizes in [(len(archive),), (70001, 777, 4096 * 5 + 3), (CLUSTER_SIZE,), (12288, 512, CLUSTER_SIZE - 1)]:
        reader = VmaReader(Views(archive, sizes))
        got = [(c.dev_id, c.cluster_num, c.mask, None if c.data is None else bytes(c.data))
               for c in reader.cluster_views()]
        assert got == expected
        assert reader.end_offset == len(archive)
