"""The #qmdump#map lines against the archive's devices: one to one, or Proxmox's errors."""

from __future__ import annotations

import pytest

from qmpbackup.restore.device_map import map_devices, parse_map_lines
from qmpbackup.restore.errors import DeviceMapError
from qmpbackup.vma.header import DeviceInfo

DEVS = [DeviceInfo(1, "drive-scsi0", 1 << 20), DeviceInfo(2, "drive-virtio1", 3 << 20)]


def test_every_device_gets_its_drive_in_device_order() -> None:
    conf = "#qmdump#map:virtio1:drive-virtio1:local-lvm:qcow2:\n#qmdump#map:scsi0:drive-scsi0:::\n"
    mapped = map_devices(conf, DEVS)
    assert [(m.device.dev_id, m.virtdev, m.storeid, m.format) for m in mapped] == [
        (1, "scsi0", "", ""),
        (2, "virtio1", "local-lvm", "qcow2"),
    ]


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ("#qmdump#map:scsi0:drive-scsi0:::\n", "found no device mapping information for device 'drive-virtio1'"),
        (
            "#qmdump#map:scsi0:drive-scsi0:::\n#qmdump#map:virtio1:drive-virtio1:::\n#qmdump#map:sata0:drive-sata0:::\n",
            "archive does not contain data for drive 'sata0'",
        ),
        (
            "#qmdump#map:scsi0:drive-scsi0:::\n#qmdump#map:scsi0:drive-virtio1:::\n",
            "drive 'scsi0' is mapped twice",
        ),
        (
            "#qmdump#map:scsi0:drive-scsi0:::\n#qmdump#map:scsi1:drive-scsi0:::\n",
            "device 'drive-scsi0' is mapped twice",
        ),
        ("#qmdump#map:floppy0:drive-scsi0:::\n", "unknown drive 'floppy0'"),
        ("", "found no device mapping information for device 'drive-scsi0'"),
    ],
)
def test_mismatches_are_refused_with_proxmox_wording(conf: str, message: str) -> None:
    with pytest.raises(DeviceMapError, match=message):
        map_devices(conf, DEVS)


def test_malformed_map_lines_are_skipped() -> None:
    conf = "#qmdump#map:scsi0:drive-scsi0::\n#qmdump#map:scsi0 :x:::\n#qmdump#map:scsi1:drive-scsi1:local:raw:\n"
    assert [(m.virtdev, m.devname) for m in parse_map_lines(conf)] == [("scsi1", "drive-scsi1")]
