"""The capability probe against real QEMU: the flags differ where the versions differ."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qmpbackup.qemu.capabilities import probe
from qmpbackup.qemu.session import QmpSession
from tests.support.qemu import QemuBinaries, RunningQemu

pytestmark = pytest.mark.qemu


async def test_probe_matches_version(qemu: QemuBinaries, qemu_vm: Callable[..., RunningQemu]) -> None:
    vm = qemu_vm()
    async with QmpSession("100", vm.qmp_path) as qmp:
        caps = await probe(qmp)
    assert caps.version[:2] == tuple(int(p) for p in qemu.version.split("."))
    # Present in every supported version (7.2 and later).
    for flag in (
        "has_copy_before_write", "has_cbw_timeout", "has_on_cbw_error", "has_cbw_bitmap",
        "has_snapshot_access", "has_blockdev_backup", "has_backup_x_perf",
        "has_backup_filter_node_name", "has_block_export_add", "has_nbd_export_bitmaps",
        "has_nbd_export_bitmap_node", "has_persistent_bitmaps", "has_blockdev_reopen",
        "has_transaction_blockdev_backup", "has_job_finalize", "has_block_graph_query",
    ):  # fmt: skip
        assert getattr(caps, flag), flag
    newer = caps.version >= (9, 2, 0)
    assert caps.has_backup_discard_source is newer
    assert caps.has_cbw_min_cluster_size is newer
    assert caps.has_backup_min_cluster_size is newer
    assert caps.version_text in caps.summary()
