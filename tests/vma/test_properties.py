"""Property tests: whatever goes into the writer comes out of the reader, laid out as Proxmox does."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpbackup.vma import BLOCK_SIZE, CLUSTER_SIZE, VmaReader, VmaWriter
from qmpbackup.vma import format as fmt
from tests.vma.archive_builder import TEST_CTIME, TEST_UUID, disk_image, extent_offsets

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.one_of(
    st.just(CLUSTER_SIZE),  # exactly one cluster
    st.integers(1, 8).map(lambda n: n * 512),  # smaller than one cluster
    st.integers(1, 6 * 128).map(lambda n: n * 512),  # up to 6 clusters, any sector count
)
disk = st.tuples(sizes, st.lists(st.integers(0, 3), min_size=1, max_size=8), st.integers(0, 1000))
config_names = st.text(alphabet="abcdefgh.-_", min_size=1, max_size=12).filter(lambda n: n not in (".", ".."))
configs = st.dictionaries(config_names, st.binary(max_size=300), max_size=4)


@st.composite
def archives(draw: st.DrawFn) -> tuple[list[tuple[str, bytes]], dict[str, bytes], list[tuple[int, int]]]:
    specs = draw(st.lists(disk, min_size=1, max_size=5))
    disks = [(f"drive-scsi{i}", disk_image(size, kinds, seed)) for i, (size, kinds, seed) in enumerate(specs)]
    order = [(d, c) for d, (_n, data) in enumerate(disks) for c in range(fmt.cluster_count(len(data)))]
    order = draw(st.permutations(order))
    return disks, draw(configs), order


@SETTINGS
@given(archives())
def test_round_trip(case: tuple[list[tuple[str, bytes]], dict[str, bytes], list[tuple[int, int]]]) -> None:
    disks, config_files, order = case
    out = io.BytesIO()
    writer = VmaWriter(out, uuid=TEST_UUID, ctime=TEST_CTIME)
    for name, data in config_files.items():
        writer.add_config(name, data)
    ids = [writer.add_device(name, len(data)) for name, data in disks]
    for d, c in order:
        writer.write_cluster(ids[d], c, disks[d][1][c * CLUSTER_SIZE : (c + 1) * CLUSTER_SIZE])
    writer.close()
    archive = out.getvalue()

    reader = VmaReader(io.BytesIO(archive))
    assert reader.uuid == TEST_UUID and reader.ctime == TEST_CTIME
    assert reader.configs == config_files
    assert [(dev.name, dev.size) for dev in reader.devices.values()] == [(n, len(d)) for n, d in disks]
    got = {dev_id: bytearray(dev.size) for dev_id, dev in reader.devices.items()}
    seen_order = []
    extents = list(reader.extents())
    for extent in extents:
        used = [s for s in extent.blockinfo if s >> 32 & 0xFF]
        assert 1 <= len(used) <= fmt.WRITER_SLOTS or extent is extents[-1]
        assert extent.blockinfo[: len(used)] == tuple(used)  # used slots are contiguous from slot 0
        for cluster in extent.clusters:
            seen_order.append((cluster.dev_id - 1, cluster.cluster_num))
            original = disks[cluster.dev_id - 1][1][cluster.cluster_num * CLUSTER_SIZE :][:CLUSTER_SIZE]
            for j in range(16):  # a block is stored exactly when it is in the device and not zero
                block = original[j * BLOCK_SIZE : (j + 1) * BLOCK_SIZE]
                assert bool(cluster.mask >> j & 1) == (bool(block) and block != bytes(len(block)))
            if cluster.data is not None:
                start = cluster.cluster_num * CLUSTER_SIZE
                target = got[cluster.dev_id]
                end = min(start + CLUSTER_SIZE, len(target))
                target[start:end] = cluster.data[: end - start]
                assert not any(cluster.data[end - start :])  # past the end: zero
    assert seen_order == list(order)
    for dev_id, (_name, data) in enumerate(disks, start=1):
        assert bytes(got[dev_id]) == data
    full_extents = len(order) // fmt.WRITER_SLOTS
    assert len(extents) == full_extents + 1  # the final flush: the rest, or an empty extent
    assert extent_offsets(archive) == [e.offset for e in extents]
    assert len(archive) == reader.header.header_size + sum(e.size for e in extents)
    assert reader.header.header_size == 12288 + fmt.round_up(reader.header.blob_buffer_size, 512)
