from __future__ import annotations

import pytest

from qmpbackup.backup.archive_config import DiskMap, assemble, vma_device_name

CONFIG = """\
boot: order=scsi0
#a description line
lock: backup
memory: 2048
parent: snap1
scsi0: local-lvm:vm-100-disk-0,size=10G
unused0: local-lvm:vm-100-disk-9
#qmdump#map:scsi0:drive-scsi0:old:raw:

[snap1]
memory: 1024
"""


def test_assemble_drops_what_restore_must_not_see() -> None:
    out = assemble(CONFIG, [DiskMap("scsi0", "drive-scsi0", "local-lvm", "raw")]).decode()
    assert out == (
        "boot: order=scsi0\n#a description line\nmemory: 2048\n"
        "scsi0: local-lvm:vm-100-disk-0,size=10G\n#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:\n"
    )


def test_map_line_with_empty_store_and_format() -> None:
    assert DiskMap("virtio1", "drive-virtio1").line() == "#qmdump#map:virtio1:drive-virtio1:::"
    with pytest.raises(ValueError):
        DiskMap("scsi0", "drive scsi0").line()


def test_device_names() -> None:
    assert vma_device_name("scsi0") == "drive-scsi0"
    assert vma_device_name("tpmstate0") == "drive-tpmstate0-backup"
