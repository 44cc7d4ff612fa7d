"""Restore end to end: archives made by ``qmpbackup vma create``, compared with ``qemu-img compare``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qmpbackup.cli.main import main
from qmpbackup.guest_config import load_guest
from tests.restore.helpers import Disk, cli, config_text, make_image, qemu_img_compare, tree, vma_create

VMID = "200"


def images_of(target: Path) -> list[str]:
    return sorted(p.name for p in target.iterdir())


@pytest.mark.parametrize("image_format", ["raw", "qcow2"])
def test_restore_matches_the_source(
    archive: Path, source_disks: list[Disk], tmp_path: Path, isolated_config: Path, image_format: str
) -> None:
    target = tmp_path / "images"
    target.mkdir()
    assert main(["restore", str(archive), VMID, "--target-dir", str(target), "--format", image_format]) == 0
    names = [f"vm-200-disk-{i}.{image_format}" for i in range(3)]
    assert images_of(target) == names  # no work files left
    for disk, name in zip(source_disks, names, strict=True):
        qemu_img_compare(disk.path, target / name, image_format)
    if image_format == "raw":
        for disk, name in zip(source_disks, names, strict=True):
            restored = target / name
            assert restored.stat().st_size == disk.size
            # zeros are never written: allocation is at most the source's data
            assert restored.stat().st_blocks <= disk.path.stat().st_blocks
    guest = load_guest(isolated_config, 200)
    assert [(d.key, d.volume) for d in guest.drives] == [
        ("sata0", str(target / names[2])), ("scsi0", str(target / names[0])), ("virtio1", str(target / names[1])),
    ]
    text = (isolated_config / "guests" / "200.conf").read_text()
    assert "#qmdump#" not in text and "lock:" not in text and "unused0" not in text
    assert "#scsi5: /data/scratch.raw,backup=0" in text
    assert "vmgenid: 3bd2e2a4" not in text and "vmgenid: " in text
    assert "net0: virtio=BC:24:11:12:34:56,bridge=vmbr0" in text  # not --unique
    assert "smbios1: uuid=7d6b1f36-1111-2222-3333-444444444444" in text
    assert sorted(os.listdir(isolated_config / "guests")) == ["200.conf"]


def test_unique_gives_new_identities(archive: Path, tmp_path: Path, isolated_config: Path) -> None:
    assert main(["restore", str(archive), VMID, "--target-dir", str(tmp_path), "--unique"]) == 0
    guest = load_guest(isolated_config, 200)
    net0 = guest.option("net0")
    smbios = guest.option("smbios1")
    assert net0 is not None and net0.startswith("virtio=") and "BC:24:11:12:34:56" not in net0
    assert net0.endswith(",bridge=vmbr0")
    assert smbios is not None and smbios.startswith("uuid=") and "7d6b1f36" not in smbios


@pytest.mark.parametrize("compress", ["zstd", "gzip", "lzo"])
def test_compressed_archives(source_disks: list[Disk], tmp_path: Path, compress: str) -> None:
    disks = source_disks[:1]
    archive = vma_create(tmp_path / "a.vma.x", disks, config_text(disks), compress)
    target = tmp_path / "t"
    target.mkdir()
    assert main(["restore", str(archive), VMID, "--target-dir", str(target)]) == 0
    qemu_img_compare(disks[0].path, target / "vm-200-disk-0.raw", "raw")


def test_restore_from_stdin(archive: Path, source_disks: list[Disk], tmp_path: Path) -> None:
    proc = cli("restore", "-", VMID, "--target-dir", str(tmp_path), input_path=archive)
    assert proc.returncode == 0, proc.stderr
    qemu_img_compare(source_disks[1].path, tmp_path / "vm-200-disk-1.raw", "raw")


def test_storage_places_images_like_proxmox(archive: Path, tmp_path: Path, isolated_config: Path) -> None:
    store = tmp_path / "store"
    (isolated_config / "storage.cfg").write_text(
        f"dir: local\n\tpath {tmp_path / 'local'}\n\tcontent backup\n\n"
        f"dir: images\n\tpath {store}\n\tcontent images,backup\n"
    )
    assert main(["restore", str(archive), VMID, "--storage", "images", "--format", "qcow2"]) == 0
    assert images_of(store / "images" / "200") == [f"vm-200-disk-{i}.qcow2" for i in range(3)]
    # without --storage the map line's storage (empty: local) is used, and local holds no images
    proc = cli("restore", str(archive), "201")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "ERROR: storage 'local' does not support VM images (content has no 'images'); "
        "use --storage ID or --target-dir DIR"
    )
    assert not (tmp_path / "local").exists()


def test_existing_definition_and_images_are_refused_without_force(
    archive: Path, tmp_path: Path, isolated_config: Path
) -> None:
    target = tmp_path / "t"
    target.mkdir()
    assert main(["restore", str(archive), VMID, "--target-dir", str(target)]) == 0
    before = tree(tmp_path)
    proc = cli("restore", str(archive), VMID, "--target-dir", str(target))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ERROR: VM 200 already exists ({isolated_config}")
    assert last.endswith("use --force to replace")
    assert tree(tmp_path) == before
    # an image alone (the definition is gone) is refused too
    (isolated_config / "guests" / "200.conf").unlink()
    before = tree(tmp_path)
    proc = cli("restore", str(archive), VMID, "--target-dir", str(target))
    assert proc.returncode == 2 and "the target images exist" in proc.stderr
    assert tree(tmp_path) == before


def test_force_replaces_and_keeps_the_agent_section(
    archive: Path, source_disks: list[Disk], tmp_path: Path, isolated_config: Path
) -> None:
    guests = isolated_config / "guests"
    guests.mkdir()
    marker = tmp_path / "started"
    (guests / "200.conf").write_text(
        "name: old\nscsi0: /elsewhere/old.raw\n\n[qmpbackup]\nqmp: /nonexistent/qmp.sock\n"
        f"start: touch {marker}\n"
    )
    old_image = tmp_path / "vm-200-disk-0.raw"
    old_image.write_bytes(b"old data")
    assert main(["restore", str(archive), VMID, "--target-dir", str(tmp_path), "--force", "--start"]) == 0
    qemu_img_compare(source_disks[0].path, old_image, "raw")
    guest = load_guest(isolated_config, 200)
    assert guest.name == "testvm" and guest.reach.start == ("touch", str(marker))
    assert marker.exists()  # --start ran the definition's start command
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_start_without_a_start_command_is_refused_before_anything(
    archive: Path, tmp_path: Path, isolated_config: Path
) -> None:
    target = tmp_path / "t"
    target.mkdir()
    proc = cli("restore", str(archive), VMID, "--target-dir", str(target), "--start")
    assert proc.returncode == 2
    assert "--start needs a start command" in proc.stderr
    assert list(target.iterdir()) == []
    assert list((isolated_config / "guests").iterdir()) == []


def test_running_vm_is_not_replaced(archive: Path, tmp_path: Path, isolated_config: Path) -> None:
    import socket

    sock_path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen(1)
    try:
        (isolated_config / "guests").mkdir()
        (isolated_config / "guests" / "200.conf").write_text(f"name: old\n\n[qmpbackup]\nqmp: {sock_path}\n")
        target = tmp_path / "t"
        target.mkdir()
        proc = cli("restore", str(archive), VMID, "--target-dir", str(target), "--force")
    finally:
        server.close()
    assert proc.returncode == 2 and "VM 200 is running" in proc.stderr
    assert list(target.iterdir()) == []


def test_archive_without_map_lines_is_refused(source_disks: list[Disk], tmp_path: Path) -> None:
    archive = vma_create(tmp_path / "a.vma", source_disks[:2], "memory: 512\n#qmdump#map:scsi0:drive-scsi0:::\n")
    target = tmp_path / "t"
    target.mkdir()
    proc = cli("restore", str(archive), VMID, "--target-dir", str(target))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ERROR: found no device mapping information for device 'drive-virtio1'"
    )
    assert list(target.iterdir()) == []


def test_disk_full_leaves_nothing(archive: Path, tmp_path: Path, isolated_config: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    import subprocess

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=768k", "tmpfs", str(mnt)], check=True, timeout=10)
    try:
        (mnt / "keep.txt").write_text("untouched")
        before = tree(mnt)
        proc = cli("restore", str(archive), VMID, "--target-dir", str(mnt))
        assert proc.returncode == 1
        assert "No space left on device" in proc.stderr.strip().splitlines()[-1]
        assert tree(mnt) == before
        assert not (isolated_config / "guests" / "200.conf").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=10)


def test_missing_target_dir_is_a_usage_error(archive: Path, tmp_path: Path) -> None:
    proc = cli("restore", str(archive), VMID, "--target-dir", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"ERROR: target directory {tmp_path / 'nope'} does not exist"
    proc = cli("restore", str(archive), "12")
    assert proc.returncode == 2 and "out of range 100..999999999" in proc.stderr


def test_odd_single_disk_bigger_than_one_extent(tmp_path: Path) -> None:
    disk = Disk("scsi0", make_image(tmp_path / "d.raw", 9 * (1 << 20) + 1536, 42), 9 * (1 << 20) + 1536)
    archive = vma_create(tmp_path / "a.vma", [disk], config_text([disk]))
    target = tmp_path / "t"
    target.mkdir()
    assert main(["restore", str(archive), VMID, "--target-dir", str(target), "--format", "qcow2"]) == 0
    qemu_img_compare(disk.path, target / "vm-200-disk-0.qcow2", "qcow2")


PROXMOX_CONF = """\
#web server
#second line
agent: 1,fstrim_cloned_disks=1
bios: ovmf
boot: order=scsi0;ide2;net0
cores: 2
efidisk0: local-lvm:vm-100-disk-0,efitype=4m,pre-enrolled-keys=1,size=4M
ide2: local:iso/debian-12.iso,media=cdrom,size=628M
memory: 2048
meta: creation-qemu=8.1.5,ctime=1711711711
name: web01
net0: virtio=BC:24:11:5E:7A:01,bridge=vmbr0,firewall=1
numa: 0
ostype: l26
scsi0: local-lvm:vm-100-disk-1,iothread=1,size=32G
scsi1: local-lvm:vm-100-disk-2,backup=0,size=100G
scsihw: virtio-scsi-single
smbios1: uuid=5a3f0b64-1c7e-4d3a-9a4b-0c1d2e3f4a5b
sockets: 1
vmgenid: 3f1d0e2c-4b5a-6c7d-8e9f-0a1b2c3d4e5f
#qmdump#map:efidisk0:drive-efidisk0:local-lvm:raw:
#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:
"""


def test_a_proxmox_config_restores(tmp_path: Path, isolated_config: Path) -> None:
    efi = Disk("efidisk0", make_image(tmp_path / "efi.raw", 540672, 3), 540672)
    root = Disk("scsi0", make_image(tmp_path / "root.raw", 2 << 20, 4), 2 << 20)
    archive = vma_create(tmp_path / "p.vma", [efi, root], PROXMOX_CONF)
    target = tmp_path / "t"
    target.mkdir()
    proc = cli("restore", str(archive), VMID, "--target-dir", str(target), "--unique")
    assert proc.returncode == 0, proc.stderr
    text = (isolated_config / "guests" / "200.conf").read_text()
    assert f"efidisk0: {target}/vm-200-disk-0.raw,efitype=4m,pre-enrolled-keys=1,size=4M\n" in text
    assert f"scsi0: {target}/vm-200-disk-1.raw,iothread=1,size=32G\n" in text
    assert "#scsi1: local-lvm:vm-100-disk-2,backup=0,size=100G\n" in text
    assert "ide2: local:iso/debian-12.iso,media=cdrom,size=628M\n" in text
    assert text.startswith("#web server\n#second line\nagent: 1,fstrim_cloned_disks=1\n")
    assert "BC:24:11:5E:7A:01" not in text and "5a3f0b64" not in text and "3f1d0e2c" not in text
    qemu_img_compare(efi.path, target / "vm-200-disk-0.raw", "raw")
    qemu_img_compare(root.path, target / "vm-200-disk-1.raw", "raw")


def test_force_removes_the_replaced_vms_old_images_whatever_their_format(
    archive: Path, tmp_path: Path, isolated_config: Path
) -> None:
    guests = isolated_config / "guests"
    guests.mkdir()
    target = tmp_path / "t"
    target.mkdir()
    old_qcow2 = target / "vm-200-disk-0.qcow2"  # same disk, other format: not overwritten by the new .raw
    old_extra = target / "vm-200-disk-7.raw"  # a disk the archive does not have
    users = tmp_path / "users-data.raw"  # not named as this VM's volume: the user's, kept
    for path in (old_qcow2, old_extra, users):
        path.write_bytes(b"old")
    (guests / "200.conf").write_text(f"name: old\nscsi0: {old_qcow2},format=qcow2\nscsi7: {old_extra}\n"
                                     f"virtio3: {users}\n")
    proc = cli("restore", str(archive), VMID, "--target-dir", str(target), "--force")
    assert proc.returncode == 0, proc.stderr
    assert not old_qcow2.exists() and not old_extra.exists()
    assert users.exists() and f"kept {users} of the replaced VM" in proc.stderr
    assert (target / "vm-200-disk-0.raw").exists()
