"""The real Proxmox-made archive (testdata/proxmox-sample.vma.gz): every fact its README lists."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path
from uuid import UUID

import pytest

from qmpbackup.vma import CLUSTER_SIZE, VmaFormatError, VmaReader, VmaWriter
from qmpbackup.vma import format as fmt
from qmpbackup.vma.header import encode_header
from qmpbackup.vma.listing import list_lines

SAMPLE = Path("/work/shared/testdata/proxmox-sample.vma.gz")
if not SAMPLE.exists():  # the repository may live elsewhere; the knowledge base is beside it
    SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "proxmox-sample.vma.gz"

pytestmark = pytest.mark.skipif(not SAMPLE.exists(), reason="proxmox-sample.vma.gz not available")

CONFIG_SHA_LINES = (
    b"boot: order=scsi0;ide2;net0\n",
    b"#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:\n",
)


@pytest.fixture(scope="module")
def raw() -> bytes:
    packed = SAMPLE.read_bytes()
    assert len(packed) == 65107
    assert hashlib.sha256(packed).hexdigest() == "ae113a05bc263fcff795f6902472821f860b7dabf817215ae79bc29204ba5f0d"
    data = gzip.decompress(packed)
    assert len(data) == 538112
    assert hashlib.sha256(data).hexdigest() == "9c649a8f6ddd65034b6e24f76f104b2ab213f43015fd36a6d49477b9b8841ad4"
    return data


def test_header_facts(raw: bytes) -> None:
    reader = VmaReader(io.BytesIO(raw))
    assert raw[:4] == b"VMA\0" and int.from_bytes(raw[4:8], "big") == 1
    assert reader.uuid == UUID("04fc12eb-0fed-4322-9aaa-f4e412f68096")
    assert reader.ctime == 1635680622
    h = reader.header
    assert (h.blob_buffer_offset, h.blob_buffer_size, h.header_size) == (12288, 453, 12800)
    assert list(reader.configs) == ["qemu-server.conf"]
    config = reader.configs["qemu-server.conf"]
    assert len(config) == 417
    assert config.startswith(CONFIG_SHA_LINES[0]) and config.endswith(CONFIG_SHA_LINES[1])
    # name blob at 1 (length 17 with NUL), data blob at 20, device name blob at 439
    assert int.from_bytes(raw[fmt.CONFIG_NAMES_OFFSET : fmt.CONFIG_NAMES_OFFSET + 4], "big") == 1
    assert raw[12288 + 1 : 12288 + 3] == (17).to_bytes(2, "little")
    assert int.from_bytes(raw[fmt.CONFIG_DATA_OFFSET : fmt.CONFIG_DATA_OFFSET + 4], "big") == 20
    assert int.from_bytes(raw[4096 + 32 : 4096 + 36], "big") == 439
    [dev] = reader.devices.values()
    assert (dev.dev_id, dev.name, dev.size, dev.clusters) == (1, "drive-scsi0", 10737418240, 163840)


def test_list_output(raw: bytes) -> None:
    reader = VmaReader(io.BytesIO(raw))
    assert list_lines(reader) == [
        "CFG: size: 417 name: qemu-server.conf",
        "DEV: dev_id=1 size: 10737418240 devname: drive-scsi0",
        "CTIME: Sun Oct 31 11:43:42 2021",  # TZ=UTC in the test suite
    ]


def test_extents_digests_and_truncation(raw: bytes) -> None:
    reader = VmaReader(io.BytesIO(raw))
    extents = []
    data: dict[int, bytes | None] = {}
    with pytest.raises(VmaFormatError) as err:
        for extent in reader.extents():
            extents.append(extent)
            for cluster in extent.clusters:
                data[cluster.cluster_num] = cluster.data
    assert err.value.rule == "detected missing cluster 23 for stream drive-scsi0"
    assert err.value.offset == len(raw)  # the file ends right after extent 2

    assert [e.offset for e in extents] == [12800, 12800 + 512 + 16 * 4096]
    assert [e.block_count for e in extents] == [16, 112]
    for extent in extents:
        used = [s for s in extent.blockinfo if (s >> 32) & 0xFF]
        assert len(used) == 58 and extent.blockinfo[58] == 0
    first = [c.cluster_num for c in extents[0].clusters]
    assert first == [*range(16), *range(32, 48), *range(64, 90)]
    assert [c.mask for c in extents[0].clusters] == [0xFFFF] + [0] * 57
    second = extents[1].clusters
    assert sorted(c.cluster_num for c in second if c.mask) == list(range(16, 23))
    assert all(c.mask in (0, 0xFFFF) for c in second)
    zero_second = sorted(c.cluster_num for c in second if not c.mask)
    expected_zero = [
        *range(48, 55),
        *range(90, 104),
        *range(112, 120),
        *range(128, 136),
        *range(144, 151),
        *range(160, 167),
    ]
    assert zero_second == expected_zero
    assert [c.cluster_num for c in second] != sorted(c.cluster_num for c in second)  # interleaved

    missing = [c for c in range(167) if c not in data]
    assert len(missing) == 51 and missing[0] == 23
    assert max(data) == 166
    assert reader.seen_clusters(1) == 116

    zero = bytes(CLUSTER_SIZE)
    first_cluster = data[0]
    assert first_cluster is not None
    digest = "cf4adcf1933a8c9a0a3ff5588e1400e6beea8a32212b3a35ba08c7b08e4e6b1f"
    assert hashlib.sha256(first_cluster).hexdigest() == digest
    assert all(data[c] is None for c in range(1, 16))
    mid = b"".join(data[c] or zero for c in range(16, 23))
    assert hashlib.sha256(mid).hexdigest() == "8c989a3aa590795fa919ccb7d1f28651c85f8a0d9ba00ab22cdd9fb760fa7955"
    device = hashlib.sha256()
    for c in range(167):
        device.update(data.get(c) or zero)
    assert device.hexdigest() == "aab5065ff973dd7d21c09e966546635e95c28be6dd1e4e01ae742420a1fbd825"


def test_missing_check_can_be_skipped(raw: bytes) -> None:
    reader = VmaReader(io.BytesIO(raw))
    assert sum(1 for _ in reader.clusters(check_missing=False)) == 116
    assert reader.first_missing(1) == 23


def test_writer_reproduces_the_sample_byte_for_byte(raw: bytes) -> None:
    """Same uuid, ctime, config, device and cluster order: our writer emits Proxmox's exact bytes."""
    reader = VmaReader(io.BytesIO(raw))
    h = reader.header
    header = encode_header(h.uuid, h.ctime, [(n.encode(), d) for n, d in h.configs], [(b"drive-scsi0", 10737418240)])
    assert header == raw[: h.header_size]
    out = io.BytesIO()
    writer = VmaWriter(out, uuid=h.uuid, ctime=h.ctime)
    writer.add_config("qemu-server.conf", reader.configs["qemu-server.conf"])
    writer.add_device("drive-scsi0", 10737418240)
    for cluster in reader.clusters(check_missing=False):
        writer.write_cluster(cluster.dev_id, cluster.cluster_num, cluster.data)
    assert out.getvalue() == raw  # both extents were full (58 slots) and flushed
