"""Names we create in QEMU: valid node names, recognisable as ours."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpbackup.qemu import naming

NODE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
KEYS = st.one_of(
    st.builds(lambda i: f"ide{i}", st.integers(0, 3)),
    st.builds(lambda i: f"sata{i}", st.integers(0, 5)),
    st.builds(lambda i: f"scsi{i}", st.integers(0, 30)),
    st.builds(lambda i: f"virtio{i}", st.integers(0, 15)),
    st.sampled_from(["efidisk0", "tpmstate0"]),
)
ROLES = st.sampled_from(
    [
        naming.ROLE_CBW,
        naming.ROLE_FLEECE,
        naming.ROLE_FLEECE_FILE,
        naming.ROLE_SNAPSHOT,
        naming.ROLE_SNAPSHOT_TRIM,
        naming.ROLE_TARGET,
        naming.ROLE_TARGET_META,
        naming.ROLE_TARGET_DATA,
        "abcdefghijk",
    ]
)


@given(st.integers(100, 999_999_999), KEYS, ROLES)
def test_node_names_are_valid_and_parse_back(vmid: int, key: str, role: str) -> None:
    name = naming.node_name(vmid, key, role)
    assert NODE_NAME_RE.fullmatch(name), name
    parsed = naming.parse_name(name)
    assert parsed is not None and (parsed.key, parsed.role) == (key, role)
    assert parsed.vmid in (vmid, None)
    assert naming.is_ours(name, vmid)


def test_examples() -> None:
    assert naming.node_name(100, "scsi0", naming.ROLE_CBW) == "qmpbackup-100-scsi0-cbw"
    assert naming.node_name(123456789, "virtio15", naming.ROLE_SNAPSHOT_TRIM) == "qmpbackup-virtio15-snaptrim"
    assert naming.job_id(100, "scsi0") == "qmpbackup-100-scsi0-backup"
    assert naming.export_name(100, "virtio1") == "qmpbackup-100-virtio1-export"
    assert naming.bitmap_name(100, "scsi0", tag="a1b2") == "qmpbackup-100-scsi0-bitmap-a1b2"
    p = naming.parse_name("qmpbackup-100-scsi0-bitmap-a1b2")
    assert p == naming.ParsedName(100, "scsi0", "bitmap", "a1b2")
    assert not naming.is_ours("qmpbackup-101-scsi0-cbw", 100)
    assert naming.parse_name("drive-scsi0") is None and naming.parse_name("#block123") is None


@pytest.mark.parametrize(
    ("vmid", "key", "role"),
    [(-1, "scsi0", "cbw"), (100, "disk0", "cbw"), (100, "scsi0", "Cbw"), (100, "scsi0", "a-b"),
     (100, "scsi0", "abcdefghijkl")],
)
def test_bad_parts_rejected(vmid: int, key: str, role: str) -> None:
    with pytest.raises(ValueError):
        naming.node_name(vmid, key, role)
