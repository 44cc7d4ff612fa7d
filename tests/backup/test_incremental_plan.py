"""The incremental plan's names, job arguments, transaction actions and log lines (no QEMU)."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from qmpbackup.backup.incremental import (
    DriveDecision,
    IncrementalPlan,
    PreviousArchive,
    bitmap_for,
    closing_lines,
)
from qmpbackup.qemu import naming

UUID1 = UUID("0f3c8a52-9d51-4f7e-8a0b-1c2d3e4f5a6b")


def test_bitmap_names_carry_the_archive_uuid_and_parse_back() -> None:
    name = bitmap_for(100, "scsi0", UUID1)
    assert name == "qmpbackup-100-scsi0-bitmap-0f3c8a529d514f7e8a0b1c2d3e4f5a6b"
    parsed = naming.parse_name(name)
    assert parsed is not None and (parsed.vmid, parsed.key, parsed.role, parsed.tag) == (
        100, "scsi0", "bitmap", UUID1.hex)
    assert bitmap_for(100, "scsi0", str(UUID1)) == name


def _plan() -> IncrementalPlan:
    previous = PreviousArchive(Path("/d/vzdump-qemu-100-2026_01_01-00_00_00.vma.zst"), UUID1,
                               {"drive-scsi0": 1 << 30})
    return IncrementalPlan(100, previous, [
        DriveDecision("scsi0", "n0", 1 << 30, "new0", True, "base0"),
        DriveDecision("virtio1", "n1", 1 << 20, "new1", False, None, "drive added (not in x)"),
    ])


def test_job_arguments_keep_the_base_bitmap_and_actions_start_new_ones() -> None:
    plan = _plan()
    assert plan.job_args() == {"scsi0": {"sync": "bitmap", "bitmap": "base0", "bitmap-mode": "never"}}
    assert plan.actions() == [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "n0", "name": "new0", "granularity": 65536, "persistent": True}},
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "n1", "name": "new1", "granularity": 65536, "persistent": False}},
    ]
    assert plan.cbw_bitmap("scsi0") == {"node": "n0", "name": "base0"}
    assert plan.cbw_bitmap("virtio1") is None


def test_log_lines_name_each_reason_once() -> None:
    plan = _plan()
    assert plan.log_lines() == [
        "scsi0: dirty-bitmap status: OK - unchanged clusters from vzdump-qemu-100-2026_01_01-00_00_00.vma.zst",
        "virtio1: dirty-bitmap: full read - drive added (not in x)",
    ]
    assert closing_lines(plan, {"scsi0": 40 << 20, "virtio1": 1 << 20}, {"scsi0": (1 << 30) - (40 << 20)}) == [
        "scsi0: dirty-bitmap: 40.0 MiB of 1.0 GiB changed",
        "read 41.0 MiB from the VM, 984.0 MiB taken from the previous archive",
    ]
    whole_vm = IncrementalPlan(100, None, [DriveDecision("scsi0", "n0", 1, None, False, None, "x")],
                               "no previous archive")
    assert whole_vm.log_lines() == ["dirty-bitmap: full read - no previous archive"]
    assert closing_lines(whole_vm, {"scsi0": 1}, {}) == []
