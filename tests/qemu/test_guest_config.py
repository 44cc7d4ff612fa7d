"""Guest definitions: Proxmox syntax, our [qmpbackup] section, errors naming file and line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from qmpbackup.errors import ConfigError
from qmpbackup.guest_config import format_size, guest_from_running, guest_path, load_guest, parse_guest

GOOD = """\
# Web server
# second line of notes
name: web1
memory: 2048
agent: 1,freeze-fs=0
ostype: l26
scsi0: /var/lib/vms/web1/root.qcow2,format=qcow2,size=32G
virtio1: /var/lib/vms/web1/scratch.raw,backup=0,cache=none
ide2: none,media=cdrom
sata0: /var/lib/vms/web1/old.img

[qmpbackup]
qmp: /run/qemu/web1.qmp
qga: /run/qemu/web1.qga
start: systemctl start 'qemu@web1'
accel: kvm

[snap1]
name: web1
scsi0: /var/lib/vms/web1/root.qcow2,format=qcow2
"""


def test_parse_full_definition(isolated_config: Path) -> None:
    path = guest_path(isolated_config, 100)
    path.parent.mkdir()
    path.write_text(GOOD)
    g = load_guest(isolated_config, 100)
    assert (g.vmid, g.name, g.memory_mib) == (100, "web1", 2048)
    assert g.agent.enabled and not g.agent.freeze_fs
    assert [d.key for d in g.drives] == ["ide2", "sata0", "scsi0", "virtio1"]
    assert [d.key for d in g.disks] == ["sata0", "scsi0", "virtio1"]
    scsi0 = g.drive("scsi0")
    assert scsi0 is not None
    assert (scsi0.format, scsi0.backup, scsi0.line, scsi0.bus, scsi0.index) == ("qcow2", True, 7, "scsi", 0)
    assert scsi0.option("size") == "32G"
    virtio1 = g.drive("virtio1")
    assert virtio1 is not None and not virtio1.backup and virtio1.format == "raw" and virtio1.option("cache") == "none"
    ide2 = g.drive("ide2")
    assert ide2 is not None and ide2.cdrom and ide2.volume is None
    assert g.reach.qmp == Path("/run/qemu/web1.qmp") and g.reach.qga == Path("/run/qemu/web1.qga")
    assert g.reach.start == ("systemctl", "start", "qemu@web1") and g.reach.accel == "kvm"
    # What goes into an archive: the main part only, verbatim, without our section or snapshots.
    assert g.proxmox_text == GOOD.split("\n\n[qmpbackup]")[0] + "\n"
    assert "qmp:" not in g.proxmox_text and "[snap1]" not in g.proxmox_text
    assert g.option("ostype") == "l26"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("name: a\nthis is not a key\n", 2, "expected 'key: value'"),
        ("name: a\nname: b\n", 2, "name is set twice (first on line 1)"),
        ("scsi0: /a.raw,format=qcow3\n", 1, "unknown format 'qcow3'"),
        ("scsi31: /a.raw\n", 1, "scsi drives go up to scsi30"),
        ("virtio0: /a.raw,backup=yes\n", 1, "virtio0 backup must be 0 or 1"),
        ("ide0: /a.raw,media=floppy\n", 1, "media must be disk or cdrom"),
        ("scsi0: /a.raw,,format=raw\n", 1, "empty item"),
        ("scsi0: /a.raw,format=raw,format=qcow2\n", 1, "option 'format' given twice"),
        ("agent: 1,freeze=0\n", 1, "unknown agent option 'freeze'"),
        ("agent: 2\n", 1, "agent enabled must be 0 or 1"),
        ("memory: lots\n", 1, "memory must be a number of MiB"),
        ("name: bad_name!\n", 1, "not a valid DNS name"),
        ("qmp: /run/x.qmp\n", 1, "qmp belongs in the [qmpbackup] section"),
        ("name: a\n\n[qmpbackup]\nqmp: relative.qmp\n", 4, "qmp must be an absolute path"),
        ("[qmpbackup]\nsocket: /x\n", 2, "unknown key 'socket' in [qmpbackup]"),
        ("[qmpbackup]\naccel: hvf\n", 2, "accel must be one of tcg, kvm"),
        ("[qmpbackup]\nstart: 'unclosed\n", 2, "start: cannot split"),
        ("[qmpbackup]\nqmp: /a\n[qmpbackup]\n", 3, "section [qmpbackup] appears twice"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "guests" / "123.conf"
    with pytest.raises(ConfigError) as e:
        parse_guest(text, 123, path)
    assert (e.value.path, e.value.line) == (str(path), line)
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert message in str(e.value)


def test_missing_definition_and_bad_vmid(isolated_config: Path) -> None:
    with pytest.raises(ConfigError, match=r"guests/555.conf: VM 555 has no guest definition"):
        load_guest(isolated_config, 555)
    with pytest.raises(ConfigError, match="out of range 100..999999999"):
        parse_guest("", 99)


@dataclass(frozen=True)
class FakeDisk:
    key: str
    filename: str
    format: str
    size: int
    read_only: bool = False


def test_definition_from_running_vm() -> None:
    disks = [
        FakeDisk("virtio1", "/img/b.raw", "raw", 3 * (1 << 20) + 512),
        FakeDisk("scsi0", "/img/a.qcow2", "qcow2", 32 << 30, read_only=True),
    ]
    g = guest_from_running(105, Path("/run/105.qmp"), Path("/run/105.qga"), disks)
    assert g.reach.qmp == Path("/run/105.qmp") and g.agent.enabled and g.path is None
    assert g.proxmox_text == (
        "agent: 1\n"
        "scsi0: /img/a.qcow2,format=qcow2,ro=1,size=32G\n"
        "virtio1: /img/b.raw,format=raw,size=3146240\n"
    )
    assert [d.key for d in g.disks] == ["scsi0", "virtio1"]
    g2 = guest_from_running(105, Path("/run/105.qmp"), None, disks[:1])
    assert not g2.agent.enabled


@pytest.mark.parametrize(("size", "text"), [(0, "0"), (512, "512"), (4096, "4K"), (3 << 20, "3M"),
                                           (1536 << 20, "1536M"), (2 << 40, "2T")])
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
