"""The restored config: Proxmox's rewrite rules, line by line."""

from __future__ import annotations

import itertools

import pytest

from qmpbackup.restore.config_rewrite import Generators, random_mac, rewrite_config

NEW = {"scsi0": "/images/vm-200-disk-0.qcow2", "virtio1": "/images/vm-200-disk-1.raw"}


def fixed() -> Generators:
    macs = (f"02:00:00:00:00:{i:02X}" for i in itertools.count(1))
    uuids = (f"00000000-0000-4000-8000-{i:012d}" for i in itertools.count(1))
    return Generators(mac=lambda: next(macs), uuid=lambda: next(uuids))


@pytest.mark.parametrize(
    ("line", "expected", "unique"),
    [
        ("#qmdump#map:scsi0:drive-scsi0:local:raw:", None, False),
        ("#vzdump#something", None, False),
        ("lock: backup", None, False),
        ("parent: snap1", None, False),
        ("unused0: local:200/vm-200-disk-9.raw", None, False),
        ("scsi0: local-lvm:vm-100-disk-0,format=raw,size=32G,discard=on",
         "scsi0: /images/vm-200-disk-0.qcow2,size=32G,discard=on", False),
        ("scsi0: file=/var/lib/a.raw,iothread=1", "scsi0: /images/vm-200-disk-0.qcow2,iothread=1", False),
        ("virtio1: /x/y.qcow2", "virtio1: /images/vm-200-disk-1.raw", False),
        ("scsi2: /data/scratch.raw,backup=0,size=8G", "#scsi2: /data/scratch.raw,backup=0,size=8G", False),
        ("ide2: none,media=cdrom", "ide2: none,media=cdrom", False),
        ("ide2: local:iso/debian.iso,media=cdrom", "ide2: local:iso/debian.iso,media=cdrom", False),
        ("vmgenid: 3bd2e2a4-7b4e-4c5a-9b5e-6a9a3f0e8d21", "vmgenid: 00000000-0000-4000-8000-000000000001", False),
        ("vmgenid: 0", "vmgenid: 0", False),
        ("net0: virtio=BC:24:11:00:00:01,bridge=vmbr0", "net0: virtio=BC:24:11:00:00:01,bridge=vmbr0", False),
        ("net0: virtio=BC:24:11:00:00:01,bridge=vmbr0", "net0: virtio=02:00:00:00:00:01,bridge=vmbr0", True),
        ("net1: e1000,bridge=vmbr0,macaddr=bc:24:11:aa:bb:cc",
         "net1: e1000,bridge=vmbr0,macaddr=02:00:00:00:00:01", True),
        ("net2: virtio,bridge=vmbr0", "net2: virtio,bridge=vmbr0", True),
        ("smbios1: uuid=7d6b1f36-1111-2222-3333-444444444444,manufacturer=QUNNRQ==,base64=1",
         "smbios1: uuid=00000000-0000-4000-8000-000000000001,manufacturer=QUNNRQ==,base64=1", True),
        ("smbios1: uuid=7d6b1f36-1111-2222-3333-444444444444",
         "smbios1: uuid=7d6b1f36-1111-2222-3333-444444444444", False),
        ("smbios1: manufacturer=x", "smbios1: uuid=00000000-0000-4000-8000-000000000001,manufacturer=x", True),
        ("memory: 2048", "memory: 2048", True),
        ("# a description line", "# a description line", True),
    ],
)
def test_line_rules(line: str, expected: str | None, unique: bool) -> None:
    base = "scsi0: a.raw\nvirtio1: b.raw\n"
    out = rewrite_config(base + line + "\n", NEW, unique=unique, generators=fixed()).text.splitlines()
    assert out[:2] == ["scsi0: /images/vm-200-disk-0.qcow2", "virtio1: /images/vm-200-disk-1.raw"]
    assert out[2:] == ([] if expected is None else [expected])


def test_snapshot_sections_are_dropped_and_results_reported() -> None:
    text = (
        "memory: 512\nscsi0: /a.raw\nscsi3: /keep.raw\nscsi4: /skip.raw,backup=0\nvirtio1: /b.raw\n\n"
        "[snap1]\nscsi0: /a.raw\n"
    )
    result = rewrite_config(text, NEW, generators=fixed())
    assert result.text == (
        "memory: 512\nscsi0: /images/vm-200-disk-0.qcow2\nscsi3: /keep.raw\n#scsi4: /skip.raw,backup=0\n"
        "virtio1: /images/vm-200-disk-1.raw\n"
    )
    assert result.commented == ["scsi4"]
    assert result.kept_unmapped == ["scsi3"]


def test_a_mapped_drive_without_a_line_is_added() -> None:
    assert rewrite_config("memory: 512\n", {"scsi0": "/i/d.raw"}).text == "memory: 512\nscsi0: /i/d.raw\n"


def test_random_macs_are_unicast_and_locally_administered() -> None:
    for _ in range(50):
        first = int(random_mac()[:2], 16)
        assert first & 1 == 0 and first & 2 == 2
